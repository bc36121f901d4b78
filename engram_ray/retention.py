"""Retention of superseded runs: ``engram-ray gc STORE --keep N``.

A store that a scheduled tick extends every night grows one run a night, each a full copy of
the kept Σ. ``gc`` deletes the runs that are *provably superseded*, and nothing else:

- A committed run ``A`` of the store is superseded when another committed run ``B`` of the
  same store *extends* it: ``B``'s run.json names ``A`` under ``"extends"`` (``extract
  --extend A``, or a tick: ``B`` is ``A``'s Σ plus the shards ``A`` had not counted,
  re-solved, with every concept of ``A``). Nothing else proves a run superseded: a run no
  committed run extends (a lineage's newest run, a one-off extraction, a run whose extension
  is still being written or lives in another store) is always kept.
- Its *depth* is 0 for a run nothing extends, else 1 + the smallest depth of the runs that
  extend it (the number of extensions between it and the newest run of its lineage).
  ``--keep N`` (N ≥ 1) keeps every run of depth < N: the newest N runs of each lineage.
- A run named by a queue's ``state.json`` (``--queue QUEUE``: the run the next tick extends;
  ``queue.yaml``'s ``run`` before the first tick) is kept whatever its depth.
- Only what a committed run is made of is deleted: the run's prefix must hold nothing but
  run files (``payload/``, ``statistics/``, ``manifest.parquet``, ``run.json``, generations
  ``v-…``, the commit marker); a prefix holding anything else is skipped and reported, as is
  anything unreadable. Staging areas, leases, Σ checkpoints (``_…``) are never touched.

Each deletion runs under the run's own lease (``io.store.run_lease``: the lease every writer
of that run id takes), so a writer overwriting the run and ``gc`` never interleave; a run whose
lease is held is skipped and reported. Under the lease the run is checked again (same commit
marker, its extension still committed), then its commit marker is removed *first*, in one
step: from then on readers refuse it as uncommitted (never a half-deleted run that looks
committed); then its files; then the lease is released. A ``gc`` killed in between leaves an
uncommitted prefix that ``list`` does not show and no reader opens.

Dry run is the default: ``gc`` prints what it would delete and deletes nothing; ``--delete``
deletes. Why: deletion cannot be undone, and the dry run's list is exactly what ``--delete``
then removes (unless a run is committed or extended in between).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping

from engram_ray.io.catalog import describe_run
from engram_ray.io.storage import Location, Storage, as_storage, location_uri
from engram_ray.io.store import (
    COMMIT_MARKER,
    GENERATION_PREFIX,
    RUN_FILES,
    LeaseHeld,
    open_run,
    run_exists,
    run_lease,
)

__all__ = ["GcResult", "gc", "plan_gc"]

# What a committed run's prefix may hold (io/store.py's layout, taken from it so the two never
# drift): one generation's files, superseded generations, the marker. Anything else is not ours.
RUN_NAMES = frozenset({*RUN_FILES, COMMIT_MARKER})


@dataclasses.dataclass
class GcResult:
    """What ``gc`` decided and did. ``delete``: the runs it deletes (dry run: would delete);
    ``keep``: committed runs kept; ``skipped``: ``{uri: why}`` for runs left alone."""

    store: str
    keep_n: int
    dry_run: bool
    delete: list[str] = dataclasses.field(default_factory=list)
    keep: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    extended_by: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"store": self.store, "keep": self.keep_n, "dry_run": self.dry_run,
                           "deleted" if not self.dry_run else "would_delete": self.delete,
                           "kept": self.keep, "skipped": self.skipped}, sort_keys=True)


def _norm(uri: str) -> str:
    """A run URI in one spelling: remote URIs without a trailing ``/``, local paths absolute
    and resolved (``file://`` stripped), so ``extends`` compares with the store's listing."""
    uri = uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        return uri
    return os.path.realpath(os.path.abspath(os.path.expanduser(uri)))


def _committed_runs(store: Storage, skipped: dict[str, str]) -> dict[str, dict]:
    """``{normalized uri: description}`` of every readable committed run below ``store``."""
    runs = {}
    for name in sorted(store.ls()):
        uri = store.uri_of(name)
        if name.startswith("_") or not run_exists(store.child(name)):
            continue  # reserved names, and anything that is not a committed run
        try:
            runs[_norm(uri)] = describe_run(open_run(store.child(name)))
        except Exception as e:  # noqa: BLE001 - unreadable: neither deleted nor a proof
            skipped[uri] = f"unreadable, kept: {type(e).__name__}: {e}"
    return runs


def _children(runs: Mapping[str, dict]) -> dict[str, list[str]]:
    """``{run: the runs of ``runs`` that extend it}`` (normalized URIs)."""
    children: dict[str, list[str]] = {u: [] for u in runs}
    for uri, d in runs.items():
        base = d.get("extends")
        if base and _norm(base) in runs and _norm(base) != uri:
            children[_norm(base)].append(uri)
    return children


def _depths(children: Mapping[str, list[str]]) -> dict[str, int]:
    """Each run's distance to the newest run of its lineage (0: nothing extends it)."""
    depth: dict[str, int] = {}

    def of(uri: str, seen: frozenset) -> int:
        if uri not in depth:
            kids = [k for k in children[uri] if k not in seen]  # a cycle proves nothing
            depth[uri] = 1 + min(of(k, seen | {uri}) for k in kids) if kids else 0
        return depth[uri]

    for uri in children:
        of(uri, frozenset())
    return depth


def _queue_runs(queues: Iterable[str], storage_options) -> set[str]:
    """The run each queue's next tick extends (``state.json``, else ``queue.yaml``)."""
    import yaml

    out = set()
    for q in queues:
        store = Storage(q, storage_options)
        if store.exists("state.json"):
            state = store.read_json("state.json")
        elif store.exists("queue.yaml"):
            state = yaml.safe_load(store.read_bytes("queue.yaml")) or {}
        else:
            raise FileNotFoundError(f"--queue {q}: neither {store.uri_of('state.json')} nor "
                                    f"{store.uri_of('queue.yaml')} exists")
        if not isinstance(state, Mapping) or not isinstance(state.get("run"), str):
            raise ValueError(f"--queue {q}: its state names no run (key 'run')")
        out.add(_norm(state["run"]))
    return out


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"--keep must be an integer ≥ 1 (the newest runs of each lineage "
                         f"to keep), got {keep!r}")


def plan_gc(store_uri: Location, keep: int, *, queues: Iterable[str] = (),
            storage_options=None) -> GcResult:
    """What ``gc`` would delete: committed runs of depth ≥ ``keep`` not named by a queue."""
    _check_keep(keep)
    store = as_storage(store_uri, storage_options)
    if not store.exists():
        raise FileNotFoundError(f"store {location_uri(store_uri)} does not exist")
    result = GcResult(store=store.uri, keep_n=keep, dry_run=True)
    runs = _committed_runs(store, result.skipped)
    children = _children(runs)
    depth = _depths(children)
    protected = _queue_runs(queues, store.options)
    for uri, d in sorted(runs.items(), key=lambda kv: (kv[1]["committed_at"] or 0, kv[0])):
        if depth[uri] >= keep and uri not in protected:
            result.delete.append(d["uri"])
            result.extended_by[d["uri"]] = [runs[c]["uri"] for c in children[uri]]
        else:
            result.keep.append(d["uri"])
    return result


def gc(store_uri: Location, keep: int, *, delete: bool = False, queues: Iterable[str] = (),
       storage_options=None, lease_timeout_s: float = 3600.0) -> GcResult:
    """Delete (``delete=True``; else only plan) the superseded runs of ``store_uri`` beyond
    the newest ``keep`` of each lineage, each under its lease (module docstring). The store's
    :class:`Storage` is built once; every run is reached as its child."""
    _check_keep(keep)  # before the store is touched
    store = as_storage(store_uri, storage_options)
    result = plan_gc(store, keep, queues=queues)
    if not delete:
        return result
    result.dry_run = False
    done = []
    for uri in result.delete:
        why = _delete_run(store, uri, result.extended_by[uri], lease_timeout_s)
        if why is None:
            done.append(uri)
        else:
            result.skipped[uri] = why
            result.keep.append(uri)
    result.delete = done
    return result


def _foreign(run: Storage) -> list[str]:
    return sorted(n for n in run.ls() if n not in RUN_NAMES
                  and not n.startswith(GENERATION_PREFIX)
                  and not n.startswith(COMMIT_MARKER + "."))


def _below(store: Storage, uri: str) -> Storage:
    """The run ``uri`` of ``store``'s listing (``store.uri_of(name)``) as the store's child."""
    return store.child(uri.rstrip("/").rsplit("/", 1)[-1])


def _delete_run(store: Storage, uri: str, extended_by: list[str],
                lease_timeout_s: float) -> str | None:
    """Delete the committed run at ``uri`` (of ``store``) under its lease; ``None``, or why
    it was kept. ``extended_by``: the committed runs of ``store`` that extended it when gc
    planned (one must still be committed: an overwrite re-commits a run and may change what
    it extends)."""
    run = _below(store, uri)
    try:
        marker = run.read_bytes(COMMIT_MARKER)
    except FileNotFoundError:
        return "no longer a committed run"
    if not any(_extends(_below(store, child), uri) for child in extended_by):
        return "no committed run extends it any more, kept"
    try:
        lease = run_lease(run, timeout_s=lease_timeout_s,
                          what=f"run {uri} (gc)", how_to_break="rerun gc later")
    except LeaseHeld as e:
        return f"in use, kept: {e}"
    try:
        if not run.exists(COMMIT_MARKER) or run.read_bytes(COMMIT_MARKER) != marker:
            return "re-committed while gc ran, kept"
        foreign = _foreign(run)
        if foreign:
            return f"holds files that are not run files ({foreign[:5]}), kept"
        names = run.ls()
        run.rm(COMMIT_MARKER, recursive=False)  # first: from here on no reader opens it
        for name in names:
            if name != COMMIT_MARKER:
                run.rm(name)
        if not run.remote and os.path.isdir(run.root) and not os.listdir(run.root):
            os.rmdir(run.root)
        return None
    finally:
        lease.release()


def _extends(child: Storage, uri: str) -> bool:
    """``child`` is (still) a committed run whose run.json extends ``uri``."""
    try:
        info = open_run(child).info
    except Exception:  # noqa: BLE001 - gone or unreadable: proves nothing
        return False
    return bool(info.get("extends")) and _norm(info["extends"]) == _norm(uri)
