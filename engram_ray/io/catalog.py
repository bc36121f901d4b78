"""What a store holds: its committed runs, described for people (``list``, ``show``) and for
scripts (``--json``). Only committed runs are listed: a run without its commit marker, a
staging area or a checkpoint is not a run a reader may use."""

from __future__ import annotations

import json
from collections.abc import Mapping

from engram_ray.io.storage import Storage
from engram_ray.io.store import COMMIT_MARKER, Run, open_run, run_exists

__all__ = ["describe_run", "list_runs"]


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


def list_runs(uri: str, storage_options: Mapping | None = None) -> list[dict]:
    """Every committed run directly under the store ``uri``, oldest first."""
    store = Storage(uri, storage_options)
    if not store.exists():
        raise FileNotFoundError(f"store {uri} does not exist")
    out = []
    for name in sorted(store.ls()):
        if name.startswith("_") or not run_exists(store.uri_of(name), storage_options):
            continue
        out.append(describe_run(open_run(store.uri_of(name), storage_options)))
    return sorted(out, key=lambda d: (d["committed_at"] or 0, d["run_id"]))


def _committed_at(run: Run) -> float | None:
    """When the run was committed (its marker says; the reader already verified it)."""
    marker = json.loads(Storage(run.uri, run.storage_options).read_bytes(COMMIT_MARKER))
    return marker.get("committed_at")
