"""What a store holds: its committed runs, described for people (``list``, ``show``) and for
scripts (``--json``). Only committed runs are listed: a run without its commit marker, a
staging area or a checkpoint is not a run a reader may use.

A run whose marker is there but whose files fail the reader's checks (an edited ``run.json``,
a manifest that does not match its marker, an unreadable marker) is listed too, marked with
the reason and nothing else: one bad run must not hide the good ones, nor pass for one."""

from __future__ import annotations

from collections.abc import Mapping

from engram_ray.io.storage import Location, as_storage, location_uri
from engram_ray.io.store import Run, open_run, run_exists

__all__ = ["BAD_RUN_ERRORS", "describe_run", "list_runs"]


def describe_run(run: Run) -> dict:
    """A run's summary: concepts, modules, engram forms and ranks, model, provenance."""
    forms = run.manifest.column("form").to_pylist()
    ranks = sorted(r for r in run.manifest.column("rank").to_pylist() if r is not None)
    info = run.info
    return {
        "uri": run.uri,
        "run_id": info.get("run_id") or run.uri.rstrip("/").rsplit("/", 1)[-1],
        "concepts": list(run.concepts),
        "modules": len(run.modules),
        "engrams": {"dense": forms.count("dense"), "factored": len(ranks),
                    "rank_median": ranks[len(ranks) // 2] if ranks else None,
                    "rank_max": ranks[-1] if ranks else None},
        "model_fingerprint": (info.get("model") or {}).get("fingerprint"),
        "mode": info.get("mode"),
        "extends": info.get("extends"),
        "committed_at": _committed_at(run),
        "timings": info.get("timings", {}),
        "engram_ray_version": info.get("engram_ray_version"),
    }


# What a run that fails its checks raises from open_run (tampering, truncation, a marker of
# another format) or from reading it (a file gone, storage refusing one object).
BAD_RUN_ERRORS = (ValueError, KeyError, OSError)


def list_runs(uri: Location, storage_options: Mapping | None = None) -> list[dict]:
    """Every committed run directly under the store ``uri``, oldest first, each with
    ``error: None``; a run that fails its checks is ``{uri, run_id, committed_at, error}``
    with the reason, listed after the good ones. Each run is reached as a child of the
    store's one :class:`Storage`."""
    store = as_storage(uri, storage_options)
    uri = location_uri(uri)
    if not store.exists():
        raise FileNotFoundError(f"store {uri} does not exist")
    if not store.fs.isdir(store.root):
        raise ValueError(f"store {uri} is a file, not a store (a folder of runs)")
    good, bad = [], []
    for name in sorted(store.ls()):
        run_uri, run = store.uri_of(name), store.child(name)
        if name.startswith("_") or not run_exists(run):
            continue
        try:
            good.append({**describe_run(open_run(run)), "error": None})
        except BAD_RUN_ERRORS as e:
            reason = (str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
            bad.append({"uri": run_uri, "run_id": name, "committed_at": None,
                        "error": (reason.strip().splitlines() or [type(e).__name__])[0]})
    return sorted(good, key=lambda d: (d["committed_at"] or 0, d["run_id"])) + bad


def _committed_at(run: Run) -> float | None:
    """When the run was committed (its marker says: the one the reader read and verified)."""
    return run.marker.get("committed_at")
