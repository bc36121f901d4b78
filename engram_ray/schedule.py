"""Scheduled edits: one ``tick`` of a queue folder (local or ``s3://``), safe to run on a timer.

A queue is a prefix that people (or upstream jobs) drop work into::

    QUEUE/queue.yaml                 written by ``engram-ray queue init`` (:func:`init_queue`):
                                     {config: EXTRACT-CONFIG-URI, run: FIRST-RUN-URI,
                                      trust_factory: pkg.module:callable (only if trusted)}
    QUEUE/shards/                    new concept shards (optional): merged into the kept Σ
    QUEUE/requests/NAME.jsonl        request files, rows as for ``engram-ray batch`` (``run``
                                     may be left out: the queue's current run is used)
    QUEUE/results/NAME.parquet       written by a tick: the outcome of every request of NAME
    QUEUE/state.json                 written by a tick: the current run, ticks so far

A tick takes the queue's lease (an exclusive create: see ``io/lease.py``), extends the current
run's kept Σ with the shards it has not counted (exactly ``extract --extend``: the result
equals one pass over every shard), runs every request file that has no result yet as one batch,
records each outcome next to its request, moves ``state.json`` on and releases the lease.
Ticks are idempotent (a tick with nothing new does nothing) and two concurrent ticks never both
work (the second says so and exits 0).

Why the lease is short and renewed: a tick's lease lives ``lease_timeout_s`` (60 s) unless
renewed, and a :class:`~engram_ray.io.heartbeat.Heartbeat` renews it every quarter of that
while the tick works, however long its extraction takes. So a live tick is never broken (an
hour-long extension included), a tick killed on this host frees the queue at once (its PID is
gone: :func:`engram_ray.io.lease.holder_gone`), and one lost with its node within a minute. A
tick that finds it lost its lease (stalled past its expiry) publishes nothing more.

Queues are data, and a queue's config is read by whoever runs the tick: a config naming a
model ``factory`` ("pkg.module:callable") would make every tick import and run that code. So
a tick refuses a factory unless the queue trusts it: ``engram-ray queue init … --trust-factory``
records the one factory the config names at that moment in ``queue.yaml`` (a later config
naming another factory is refused again). The same trust covers requests whose run was built
with that factory; the factories shipped with engram-ray
(:data:`engram_ray.apply.BUILTIN_FACTORIES`) need none. Whoever can write ``queue.yaml`` can
grant it: keep the queue's root writable by its owners only, and requests/ and shards/ by the
people who drop work.

Bad input stays local: a request file that cannot be read (bad JSON, a bad row) is recorded as
failed in ``results/`` with its error and the other files run; it is tried again once its
content changes. A missing queue, or a ``queue.yaml`` that is not one, fails the tick in one
line naming the file and key, before anything is created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from engram_ray.io.lease import DEFAULT_TIMEOUT_S
from engram_ray.io.storage import Location, Storage, as_storage, location_uri

__all__ = ["QUEUE_YAML", "STATE", "QueueSpec", "TickResult", "extension_id", "init_queue",
           "read_queue", "tick"]

STATE, QUEUE_YAML = "state.json", "queue.yaml"
# Errors of reading one request file (bad JSON or Parquet, a bad row, the file gone since it
# was listed): recorded as that file's failure; anything else fails the tick.
_FILE_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, pa.ArrowException)


@dataclasses.dataclass(frozen=True)
class QueueSpec:
    """A queue's ``queue.yaml``: the extraction config, the first run, and the one model
    factory its ticks may import (``None``: none but the built-in ones)."""

    config: str
    run: str
    trust_factory: str | None = None

    def to_yaml(self) -> bytes:
        head = ("# engram-ray queue: written by `engram-ray queue init`. trust_factory names "
                "the one model\n# factory a tick may import and run (absent: none).\n")
        return (head + yaml.safe_dump({k: v for k, v in dataclasses.asdict(self).items()
                                       if v is not None}, sort_keys=False)).encode()


@dataclasses.dataclass
class TickResult:
    """What a tick did: ``worked`` is False when another tick held the lease;
    ``failed_files``: request files that could not be read (recorded in results/)."""

    worked: bool
    run: str | None = None
    extended: bool = False
    request_files: list[str] = dataclasses.field(default_factory=list)
    failed_files: list[str] = dataclasses.field(default_factory=list)
    message: str = ""


def read_queue(queue: Location, storage_options: Mapping | None = None) -> QueueSpec:
    """The validated ``queue.yaml`` of ``queue``. A queue without one is missing
    (``FileNotFoundError`` naming it and how to create it); a malformed one is a
    ``ValueError`` naming the file and the key."""
    store = as_storage(queue, storage_options)
    where = store.uri_of(QUEUE_YAML)
    if not store.exists(QUEUE_YAML):
        raise FileNotFoundError(
            f"queue {store.uri} does not exist (no {where}); create it with: engram-ray "
            f"queue init {store.uri} --config EXTRACT-CONFIG --run FIRST-RUN")
    try:
        raw = yaml.safe_load(store.read_bytes(QUEUE_YAML))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"{where} is not valid YAML{line}: "
                         f"{getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    return _spec(where, raw)


def _spec(where: str, raw) -> QueueSpec:
    """``raw`` (parsed YAML) checked key by key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping with keys config and run, got "
                         f"{type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(QueueSpec)]
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
    for key in ("config", "run"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ValueError(f"{where}: key {key!r} must be a URI (a non-empty string), got "
                             f"{raw.get(key)!r}")
    trusted = raw.get("trust_factory")
    if trusted is not None and not _is_factory(trusted):
        raise ValueError(f"{where}: key 'trust_factory' must name the one trusted factory as "
                         f"'pkg.module:callable' (as `engram-ray queue init --trust-factory` "
                         f"records it), got {trusted!r}")
    return QueueSpec(raw["config"], raw["run"], trusted)


def _is_factory(name) -> bool:
    """Whether ``name`` is a factory as a config's ``model.factory`` may name one."""
    from engram_ray.config import ModelSpec

    try:
        ModelSpec(factory=name)
    except (TypeError, ValueError):
        return False
    return True


def init_queue(queue: str, config: str, run: str, *, trust_factory: bool = False,
               force: bool = False, storage_options: Mapping | None = None) -> QueueSpec:
    """Create ``queue`` (``engram-ray queue init``): check the config (it loads and
    validates) and the run (committed), and write ``queue.yaml`` with ``requests/`` and
    ``shards/``. A config whose model is a factory other than the built-in ones is refused
    unless ``trust_factory``, which records that factory as the one the ticks may run. An
    existing ``queue.yaml`` is replaced only with ``force`` (state, requests and results are
    kept)."""
    from engram_ray.apply import BUILTIN_FACTORIES
    from engram_ray.config import absolute_uri, load_config
    from engram_ray.io.store import open_run

    store = Storage(absolute_uri(queue, "QUEUE"), storage_options)
    config, run = absolute_uri(config, "--config"), absolute_uri(run, "--run")
    if store.exists(QUEUE_YAML) and not force:
        raise FileExistsError(f"queue {store.uri} already exists ({store.uri_of(QUEUE_YAML)}); "
                              "pass --force to replace its queue.yaml (its state, requests and "
                              "results are kept)")
    factory = load_config(config).model.factory
    open_run(run, storage_options)  # committed and intact, or a one-line error naming it
    custom = factory if factory is not None and factory not in BUILTIN_FACTORIES else None
    if custom is not None and not trust_factory:
        raise PermissionError(
            f"config {config} builds its model with factory {custom!r}: every tick of queue "
            f"{store.uri} would import and run that code; pass --trust-factory if you trust it")
    spec = QueueSpec(config, run, custom if trust_factory else None)
    if not store.remote:  # object stores have no folders (and s3fs would create a bucket)
        for folder in ("requests", "shards"):
            store.makedirs(folder)
    store.write_bytes(QUEUE_YAML, spec.to_yaml())
    return spec


def tick(queue: Location, *, extract: Callable, map_fn: Callable | None = None,
         storage_options: Mapping | None = None, lease_timeout_s: float = DEFAULT_TIMEOUT_S,
         break_lease: bool = False) -> TickResult:
    """One tick of ``queue``. ``extract(cfg) -> run URI`` runs an extraction (the Ray or the
    local executor); ``map_fn`` runs the batch's requests (see ``requests.run_batch``).
    ``break_lease`` removes another holder's lease first (a holder known to be gone)."""
    from engram_ray.io.heartbeat import Heartbeat
    from engram_ray.io.lease import Lease, LeaseHeld

    store = as_storage(queue, storage_options)  # the queue's one Storage for the whole tick
    queue = location_uri(queue)
    spec = read_queue(store)  # a missing queue is not created by its lease
    lease = Lease(store.child("_lease"), timeout_s=lease_timeout_s, what=f"queue {queue}")
    try:
        if break_lease:
            lease.break_()
        lease.acquire()
    except LeaseHeld as e:
        return TickResult(worked=False, message=f"another tick is working on {queue}: {e}")
    try:
        with Heartbeat(lease) as beat:
            return _work(store, spec, extract, map_fn, store.options, beat)
    finally:
        lease.release()


def _work(store: Storage, spec: QueueSpec, extract, map_fn, storage_options,
          beat) -> TickResult:
    """The tick's work under its lease: check the factory, extend, run requests, save."""
    from engram_ray.config import load_config

    state = _state(store, spec)
    cfg = load_config(spec.config)
    _check_factory(cfg.model.factory, spec, store.uri)
    result = TickResult(worked=True, run=state["run"])
    new_run = _extend(store, state, cfg, extract)
    runs = {}
    if new_run is not None:
        result.run, result.extended = new_run.uri, True
        runs[new_run.uri] = new_run
    beat.check()
    _run_requests(store, state, result, spec, map_fn, storage_options, runs)
    beat.check()  # a tick that lost its lease does not move the queue on
    _save_state(store, result.run, state)
    failed = (f", {len(result.failed_files)} unreadable request file(s) recorded as failed "
              f"({', '.join(result.failed_files)})" if result.failed_files else "")
    result.message = (f"tick on {store.uri}: run {result.run}"
                      + (" (extended with new shards)" if result.extended else "")
                      + f", {len(result.request_files)} request file(s) done{failed}")
    return result


def _check_factory(factory: str | None, spec: QueueSpec, queue: str) -> None:
    """Refuse a config factory the queue does not trust (see the module docstring)."""
    from engram_ray.apply import BUILTIN_FACTORIES

    if factory is None or factory in BUILTIN_FACTORIES or factory == spec.trust_factory:
        return
    trusted = (f"it trusts only {spec.trust_factory!r}" if spec.trust_factory
               else "it trusts no factory")
    raise PermissionError(
        f"config {spec.config} builds its model with factory {factory!r}, which this tick "
        f"would import and run, and queue {queue} does not trust it ({trusted}); if you trust "
        f"it: engram-ray queue init {queue} --config {spec.config} --run {spec.run} "
        "--trust-factory --force")


def _state(store: Storage, spec: QueueSpec) -> dict:
    """The queue's current state (``state.json``, else the first run named in queue.yaml)."""
    if not store.exists(STATE):
        return {"run": spec.run, "ticks": 0}
    state = store.read_json(STATE)
    if not isinstance(state, dict) or not isinstance(state.get("run"), str):
        raise ValueError(f"{store.uri_of(STATE)}: key 'run' (the queue's current run) is "
                         "missing; fix or remove the file (queue.yaml's run is used then)")
    return state


def _extend(store: Storage, state: dict, cfg, extract: Callable) -> Storage | None:
    """Extend the current run with the queue's uncounted shards; the new run's Storage (the
    requests of this tick use it), ``None`` when no shard is new.

    The new run's id is a digest of the base run and the new shards (:func:`extension_id`),
    so a tick killed after the extension committed but before ``state.json`` moved on adopts
    that run when it is rerun instead of extracting a second copy, and one killed during the
    extraction redoes it under the same id (the run's own lease and staging take care of the
    dead writer's leftovers): a rerun converges to what an uninterrupted tick makes."""
    from engram_ray.incremental import prepare_extension
    from engram_ray.io.store import run_exists

    if not store.exists("shards") or not store.ls("shards"):
        return None
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, paths=[store.uri_of("shards")]),
        store=dataclasses.replace(cfg.store, run_id=None, keep_statistics=True,
                                  extend=state["run"]))
    try:
        extension = prepare_extension(cfg)
    except ValueError as e:
        if "nothing to add" in str(e):
            return None
        raise
    run_id = extension_id(state["run"], extension.new_files)
    cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, run_id=run_id))
    run = as_storage(cfg.store.run_uri(run_id), cfg.store.storage_options)
    if run_exists(run):
        return run  # committed by a tick that was killed before it saved the state
    made = extract(cfg)  # its own operation (on Ray, its own driver): builds its locations
    return run if made.rstrip("/") == run.uri else as_storage(made, run.options)


def extension_id(base_run: str, new_shards) -> str:
    """The run id of ``base_run`` extended with ``new_shards``: ``tick-`` and 16 hex digits of
    their sha256, the same for the same extension whenever it is attempted."""
    key = json.dumps([base_run.rstrip("/"), sorted(new_shards)]).encode()
    return "tick-" + hashlib.sha256(key).hexdigest()[:16]


def _pending(store: Storage, state: dict) -> list[str]:
    """Request files without a result, and failed ones whose content changed since."""
    if not store.exists("requests"):
        return []
    failed = state.get("failed_files") or {}
    todo = []
    for name in sorted(store.ls("requests")):
        if name.startswith((".", "_")):
            continue
        if not store.exists(_result_of(name)):
            todo.append(name)
        elif name in failed and _sha256(store, name) != failed[name]:
            todo.append(name)  # fixed since it was recorded as unreadable: try again
    return todo


def _run_requests(store: Storage, state: dict, result: TickResult, spec: QueueSpec, map_fn,
                  storage_options, runs: Mapping[str, Storage]) -> None:
    """Every pending request file as one batch; each file's outcome beside it. A file that
    cannot be read is recorded as failed (with its sha256 in the state) and skipped."""
    from engram_ray.requests import read_requests, write_summary

    failed = dict(state.get("failed_files") or {})
    if not store.remote:
        store.makedirs("results")
    for name in _pending(store, state):
        try:
            requests = read_requests(store.child("requests", name), default_run=result.run)
        except _FILE_ERRORS as e:
            failed[name] = _sha256(store, name)
            # The state first: a tick killed before its end still knows the file failed (and
            # retries it once changed); killed before the result, the file is still pending.
            _write_state(store, {**state, "failed_files": failed})
            _write_failed(store, name, e)
            result.failed_files.append(name)
            continue
        failed.pop(name, None)
        rows = _run_trusted(requests, spec, map_fn, storage_options, runs)
        _publish(store, _result_of(name), lambda dest, rows=rows, requests=requests:
                 write_summary(rows, dest.uri, requests, store.options))  # its one build
        result.request_files.append(name)
    state["failed_files"] = failed


def _run_trusted(requests: list, spec: QueueSpec, map_fn, storage_options,
                 runs: Mapping[str, Storage]) -> list[dict]:
    """``run_batch`` with the queue's trust: requests of runs built with the trusted factory
    in one batch with ``trust_factory``, the others in one without; rows in request order."""
    from engram_ray.requests import run_batch

    runs = dict(runs)
    trusted = _trusted_runs({r.run for r in requests}, spec, storage_options, runs)
    rows: list = [None] * len(requests)
    for trust in (True, False):
        idx = [i for i, r in enumerate(requests) if (r.run in trusted) == trust]
        if idx:
            done = run_batch([requests[i] for i in idx], storage_options=storage_options,
                             trust_factory=trust, map_fn=map_fn, runs=runs)
            for i, row in zip(idx, done):
                rows[i] = row
    return rows


def _trusted_runs(runs: set[str], spec: QueueSpec, storage_options,
                  built: dict[str, Storage]) -> set[str]:
    """The runs whose recorded model factory is the one the queue trusts. Each run's Storage
    goes into ``built`` (the batch then reuses it)."""
    from engram_ray.io.store import open_run

    if spec.trust_factory is None:
        return set()
    out = set()
    for uri in runs:
        try:
            if uri not in built:
                built[uri] = as_storage(uri, storage_options)
            model = (open_run(built[uri]).info.get("config") or {}).get("model")
        except (ValueError, KeyError, OSError):
            continue  # the batch reports it, without trust
        if (model or {}).get("factory") == spec.trust_factory:
            out.add(uri)
    return out


def _result_of(name: str) -> str:
    return f"results/{name.rsplit('.', 1)[0]}.parquet"


def _sha256(store: Storage, name: str) -> str | None:
    try:
        return hashlib.sha256(store.read_bytes(f"requests/{name}")).hexdigest()
    except FileNotFoundError:
        return None


def _write_failed(store: Storage, name: str, error: BaseException) -> None:
    """The result of a request file that could not be read: one failed row with the error."""
    message = (str(error.args[0]) if isinstance(error, KeyError) and error.args
               else str(error)).strip().splitlines() or [type(error).__name__]
    table = pa.table({"request_id": pa.array([None], pa.string()), "status": ["failed"],
                      "out": pa.array([None], pa.string()), "seconds": [0.0],
                      "error": [message[0]], "requests_file": [store.uri_of("requests", name)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    _publish(store, _result_of(name), lambda dest: dest.write_bytes("", data))


def _publish(store: Storage, rel: str, write: Callable[[Storage], object]) -> None:
    """Write ``rel`` whole or not at all with ``write(location)`` (a child of ``store``, sharing
    its filesystems): a result or state that a killed
    tick left half-written would be taken for done (a result) or fail every later tick (the
    state). An object store's PUT is atomic; locally the file is written beside its name and
    renamed over it."""
    if store.remote:
        write(store.child(rel))
        return
    tmp = f"{rel}.tmp-{secrets.token_hex(4)}"
    try:
        write(store.child(tmp))
        os.replace(store.path(tmp), store.path(rel))
    finally:
        if os.path.exists(store.path(tmp)):
            os.unlink(store.path(tmp))


def _save_state(store: Storage, run: str, state: dict) -> None:
    _write_state(store, {**state, "run": run, "ticks": int(state.get("ticks", 0)) + 1,
                         "last_tick": time.time()})


def _write_state(store: Storage, state: dict) -> None:
    data = json.dumps(state, indent=2, sort_keys=True).encode()
    _publish(store, STATE, lambda dest: dest.write_bytes("", data))
