"""Scheduled edits: one ``tick`` of a queue folder (local or ``s3://``), safe to run on a timer.

A queue is a prefix that people (or upstream jobs) drop work into::

    QUEUE/queue.yaml                 {config: EXTRACT-CONFIG-URI, run: FIRST-RUN-URI}
    QUEUE/shards/                    new concept shards (optional): merged into the kept Σ
    QUEUE/requests/NAME.jsonl        request files, rows as for ``engram-ray batch`` (``run``
                                     may be left out: the queue's current run is used)
    QUEUE/results/NAME.parquet       written by a tick: the outcome of every request of NAME
    QUEUE/state.json                 written by a tick: the current run, ticks so far

A tick takes the queue's lease (an exclusive create: see ``io/lease.py``), extends the current
run's kept Σ with the shards it has not counted (exactly ``extract --extend``: the result
equals one pass over every shard), runs every request file that has no result yet as one batch,
records each outcome next to its request, moves ``state.json`` on and releases the lease.
Ticks are idempotent (a tick with nothing new does nothing), two concurrent ticks never both
work (the second says so and exits 0), and a crashed tick's lease expires after
``lease_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import TextIO

import yaml

from engram_ray.io.storage import Storage

__all__ = ["TickResult", "tick"]

STATE, QUEUE_YAML = "state.json", "queue.yaml"


@dataclasses.dataclass
class TickResult:
    """What a tick did: ``worked`` is False when another tick held the lease."""

    worked: bool
    run: str | None = None
    extended: bool = False
    request_files: list[str] = dataclasses.field(default_factory=list)
    message: str = ""


def tick(queue: str, *, extract: Callable, map_fn: Callable | None = None,
         storage_options: Mapping | None = None, lease_timeout_s: float = 3600.0,
         log: TextIO | None = None) -> TickResult:
    """One tick of ``queue``. ``extract(cfg) -> run URI`` runs an extraction (the Ray or the
    local executor); ``map_fn`` runs the batch's requests (see ``requests.run_batch``)."""
    from engram_ray.io.lease import Lease, LeaseHeld

    store = Storage(queue, storage_options)
    try:
        lease = Lease(store.child("_lease"), timeout_s=lease_timeout_s)
        lease.acquire()
    except LeaseHeld as e:
        return TickResult(worked=False, message=f"another tick is working on {queue}: {e}")
    try:
        state = _state(store)
        result = TickResult(worked=True, run=state["run"])
        new_run = _extend(store, state, extract, storage_options, log)
        if new_run is not None:
            result.run, result.extended = new_run, True
        result.request_files = _run_requests(store, result.run, map_fn, storage_options)
        _save_state(store, result.run, state)
        result.message = (f"tick on {queue}: run {result.run}"
                          + (" (extended with new shards)" if result.extended else "")
                          + f", {len(result.request_files)} request file(s) done")
        return result
    finally:
        lease.release()


def _state(store: Storage) -> dict:
    """The queue's current state (``state.json``, else the first run named in queue.yaml)."""
    if store.exists(STATE):
        return json.loads(store.read_bytes(STATE))
    spec = yaml.safe_load(store.read_bytes(QUEUE_YAML)) or {}
    if not isinstance(spec, Mapping) or "run" not in spec or "config" not in spec:
        raise ValueError(f"{store.uri_of(QUEUE_YAML)} must name `config` (an extraction "
                         "config with store.keep_statistics) and `run` (its first run)")
    return {"run": spec["run"], "config": spec["config"], "ticks": 0}


def _extend(store: Storage, state: dict, extract: Callable, storage_options,
            log) -> str | None:
    """Extend the current run with the queue's uncounted shards; ``None`` when none is new."""
    from engram_ray.config import load_config
    from engram_ray.incremental import prepare_extension

    if not store.exists("shards") or not store.ls("shards"):
        return None
    cfg = load_config(state["config"], [f"store.extend={state['run']}"])
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, paths=[store.uri_of("shards")]),
        store=dataclasses.replace(cfg.store, run_id=None, keep_statistics=True))
    try:
        prepare_extension(cfg)
    except ValueError as e:
        if "nothing to add" in str(e):
            return None
        raise
    return extract(cfg)


def _run_requests(store: Storage, run: str, map_fn, storage_options) -> list[str]:
    """Every request file without a result, as one batch; each file's outcome beside it."""
    from engram_ray.requests import read_requests, run_batch, write_summary

    if not store.exists("requests"):
        return []
    done = []
    for name in sorted(store.ls("requests")):
        stem = name.rsplit(".", 1)[0]
        result = f"results/{stem}.parquet"
        if store.exists(result):
            continue
        requests = read_requests(store.uri_of("requests", name), storage_options,
                                 default_run=run)
        rows = run_batch(requests, storage_options=storage_options, map_fn=map_fn)
        store.makedirs("results")
        write_summary(rows, store.uri_of(result), requests, storage_options)
        done.append(name)
    return done


def _save_state(store: Storage, run: str, state: dict) -> None:
    new = {**state, "run": run, "ticks": int(state.get("ticks", 0)) + 1,
           "last_tick": time.time()}
    store.write_bytes(STATE, json.dumps(new, indent=2, sort_keys=True).encode())
