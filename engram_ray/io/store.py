"""A run of engrams on any fsspec URI: payload Parquet files, a manifest, run.json, a commit marker.

Layout of ``<store>/<run_id>/`` (local directory or ``s3://bucket/prefix``)::

    payload/<module>.parquet   one file per module, one row (= one row group) per concept
    manifest.parquet           one row per (concept, module): where the payload is + sha256
    run.json                   config (credentials redacted), fingerprint, versions, warnings
    statistics/<group>.safetensors   the kept Σ (``store.keep_statistics``)
    _COMMITTED                 written last: names the generation and the sha256 of the
                               manifest and of run.json (the manifest names every payload's)

and, beside the runs, the store's reserved names (a run id never starts with ``_``)::

    _staging/<run_id>-<nonce>/ where a writer writes; readers never look here
    _leases/<run_id>           the exclusive lease of the one writer of run_id (``lease.py``)

Commit protocol (the same on local disk and S3, which has no rename):

1. *Lease.* The writer first takes ``_leases/<run_id>`` with an exclusive create (``O_EXCL``
   locally, ``If-None-Match: *`` on S3): a second writer of the same run fails at once with a
   message naming the holder (host, pid, since when). A background heartbeat renews the lease
   while the writer lives; a lease older than ``lease_timeout_s`` is a crashed writer's and is
   broken, and ``store.break_lease: true`` breaks a live-looking one (the documented way out).
2. *Stage.* Payloads (written by solver tasks, which get the staging URI), statistics, the
   manifest and run.json go to ``_staging/<run_id>-<nonce>/``, never to the run's own prefix.
3. *Publish.* The files are moved (locally: renamed; S3: server-side copied) into the run's
   prefix, into file names no committed run uses: the canonical names when they are free,
   else a fresh *generation* ``<run>/v-<nonce>/`` (an ``overwrite`` of a committed run: its
   files stay untouched, and readable, all along).
4. *Commit.* ``_COMMITTED`` is written last, in one atomic step (S3: one PUT; locally: a
   temporary file renamed over it). It is the only switch: a reader trusts nothing but the
   generation, manifest and run.json it names, each checked against its sha256, and payload
   bytes against the manifest's; so a reader sees the old run or the new one, never a mix,
   and a crash at any point before this step leaves the old run (or no run) in force.
5. *Clean up* (best effort, under the lease): the superseded generation, this writer's staging
   and stale staging areas of crashed writers of the same run id; then release the lease.

Why generations and not an in-place replace: S3 cannot rename, so replacing the files in place
would expose a mixed or half-written run for the length of the copy and lose the old run if the
writer died during it. Why staging outside the run prefix: nothing under ``<run_id>/`` exists
until the run is published, so an aborted or crashed writer never leaves a half-run where a
run is expected, and abort only ever removes what this writer created.

Safety of paths: a run id is one safe path component (``config.run_id_problem``), checked for
``store.run_id`` and for the last component of a URI given to the Python API; a target that
exists and holds anything but run files (a data directory, a file) is refused, never removed.
Storage failures surface as one-line :class:`~engram_ray.io.storage.StorageError` naming the
location; an abort after a failure never masks it (cleanup errors are swallowed).

Payload rows (format version 2). Tensors are raw little-endian float32 bytes, row-major, in
``binary`` columns — the safetensors idea inside Parquet: one value per tensor, so writing costs
a copy, where Arrow's list and fixed-shape-tensor types made Parquet encode a repetition level
per float (measured 3× slower for dense rows, 3.5× for factored ones). Shapes live in the
manifest and in each file's schema metadata (``weight_shape``). ``form = "dense"``: ``weight``
is ``W⁺`` in the module's weight shape. ``form = "factored"``: ``W⁺ = A B`` with ``factor_a``
(out × r) and ``factor_b`` (r × in_flat) in the module's (out, in_flat) orientation — ``in_flat``
is ``C·kh·kw`` for Conv2d, and GPT-2's ``Conv1D`` is transposed back to ``[in, out]`` after the
product — and ``rank = r``: a concept with fewer tokens than the layer is wide is kept at
``r ≤ n_c`` instead of ``out × in`` (see ``solve.py``). ``bias``: the bias part of the engram,
when the module's bias was absorbed. Rows are buffered into row groups of about
``ROW_GROUP_BYTES`` (one engram alone when it is larger), and the manifest names each engram's
row group and row: a reader fetching one engram reads at most that much besides it, and small
engrams do not pay Parquet's per-row-group cost each (measured on 1,450 rank-41 engrams: 0.35 s
at one row group each, 0.12 s at one per module).

Readers refuse runs without the commit marker, a marker, manifest or run.json that is invalid or
does not match, and a payload whose sha256 differs from the manifest's: what a reader returns is
what the writer committed. Errors name the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engram_ray.config import run_id_problem
from engram_ray.core.moments import ModuleInfo, Moments, Statistics
from engram_ray.core.solve import EngramRecord, FactoredEngram
from engram_ray.io.lease import Lease, LeaseHeld
from engram_ray.io.storage import Storage, is_remote

__all__ = [
    "COMMIT_FORMAT",
    "PAYLOAD_FORMAT_VERSION",
    "LeaseHeld",
    "Run",
    "RunWriter",
    "open_run",
    "read_row_group",
    "run_exists",
    "run_lease",
    "split_run_uri",
]

PAYLOAD_FORMAT_VERSION = 2  # 2: float32 bytes in binary columns (1: Arrow tensors)
COMMIT_MARKER = "_COMMITTED"
MANIFEST = "manifest.parquet"
RUN_JSON = "run.json"
PAYLOAD_DIR = "payload"
STATISTICS_DIR = "statistics"
COMMIT_FORMAT = 2  # 2: the marker names the generation and the sha256 of manifest and run.json
STAGING_DIR = "_staging"
LEASE_DIR = "_leases"
GENERATION_PREFIX = "v-"
RUN_FILES = (PAYLOAD_DIR, STATISTICS_DIR, MANIFEST, RUN_JSON)  # what one generation holds
_GENERATION = re.compile(r"v-[0-9a-f]{16}")

ROW_GROUP_BYTES = 8 << 20

_MANIFEST_SCHEMA = pa.schema(
    [
        ("concept", pa.string()),
        ("module", pa.string()),
        ("group", pa.string()),
        ("kind", pa.string()),
        ("layer", pa.int32()),
        ("shape", pa.list_(pa.int64())),
        ("form", pa.string()),
        ("rank", pa.int32()),
        ("has_bias", pa.bool_()),
        ("n", pa.int64()),
        ("N", pa.int64()),
        ("rel_norm", pa.float64()),
        ("weight_norm", pa.float64()),
        ("kept", pa.int32()),
        ("payload", pa.string()),
        ("row_group", pa.int32()),
        ("row", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def _f32(x: torch.Tensor | None) -> np.ndarray | None:
    """A tensor as a C-contiguous little-endian float32 array (the payload's byte layout)."""
    return None if x is None else np.ascontiguousarray(x.detach().cpu().numpy(), dtype="<f4")


def _digest(*parts) -> str:
    """sha256 over the payload bytes of each present tensor, in order (arrays or buffers)."""
    h = hashlib.sha256()
    for p in parts:
        if p is not None:
            h.update(memoryview(p).cast("B"))
    return h.hexdigest()


def _payload_schema(info: ModuleInfo) -> pa.Schema:
    return pa.schema(
        [
            ("concept", pa.string()),
            ("form", pa.string()),
            ("weight", pa.binary()),
            ("bias", pa.binary()),
            ("factor_a", pa.binary()),
            ("factor_b", pa.binary()),
            ("rank", pa.int32()),
        ],
        metadata={"payload_format_version": str(PAYLOAD_FORMAT_VERSION),
                  "weight_shape": json.dumps(list(info.weight_shape)),
                  "dtype": "<f4"},
    )


def _blobs(arrays: Sequence[np.ndarray | None]) -> pa.Array:
    """A binary column holding each array's bytes (null where None)."""
    return pa.array([None if x is None else memoryview(x).cast("B") for x in arrays], pa.binary())


class _ModulePayload:
    """Streams one module's rows to ``payload/<module>.parquet`` in row groups of about
    ``ROW_GROUP_BYTES``."""

    def __init__(self, storage: Storage, info: ModuleInfo) -> None:
        self.info = info
        self.rel = f"{PAYLOAD_DIR}/{info.name}.parquet"
        self.schema = _payload_schema(info)
        self._file = storage.open(self.rel, "wb")
        # Dictionary encoding and statistics only for the small string columns: float bytes
        # neither repeat nor compress, and a dictionary attempt on them is pure cost.
        self._writer = pq.ParquetWriter(
            self._file, self.schema, use_dictionary=["concept", "form"],
            write_statistics=["concept", "form"], compression="none")
        self._buffer: list[tuple] = []
        self._bytes = 0
        self.row_groups = 0

    def write(self, rec: EngramRecord) -> dict:
        bias = _f32(rec.bias)
        factored = rec.factors
        if factored is None:
            weight, a, b = _f32(rec.weight), None, None
            digest = _digest(weight, bias)
        else:
            weight, a, b = None, _f32(factored.a), _f32(factored.b)
            digest = _digest(a, b, bias)
        form = "dense" if factored is None else "factored"
        rank = None if a is None else int(a.shape[1])
        row = {
            "concept": rec.concept,
            "module": rec.module,
            "group": self.info.group,
            "kind": self.info.kind,
            "layer": self.info.layer,
            "shape": list(self.info.weight_shape),
            "form": form,
            "rank": rank,
            "has_bias": bias is not None,
            "n": rec.n,
            "N": rec.n_total,
            "rel_norm": rec.rel_norm,
            "weight_norm": rec.weight_norm,
            "kept": rec.kept,
            "payload": self.rel,
            "row_group": self.row_groups,
            "row": len(self._buffer),
            "sha256": digest,
        }
        self._buffer.append((rec.concept, form, weight, bias, a, b, rank))
        self._bytes += sum(x.nbytes for x in (weight, bias, a, b) if x is not None)
        if self._bytes >= ROW_GROUP_BYTES:
            self._flush()
        return row

    def _flush(self) -> None:
        if not self._buffer:
            return
        cols = list(zip(*self._buffer))
        arrays = [pa.array(cols[0]), pa.array(cols[1]), *map(_blobs, cols[2:6]),
                  pa.array(cols[6], pa.int32())]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self.row_groups += 1
        self._buffer, self._bytes = [], 0

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self._writer.close()
            self._file.close()

    def discard(self) -> None:
        """Drop the file after a failure without finishing it: no footer, no upload (S3: a
        multipart upload is aborted), no network call to a store that may be gone."""
        if isinstance(self._file, fsspec.spec.AbstractBufferedFile):
            _best_effort(self._file.discard)
            self._file.closed = True
        else:
            _best_effort(self._file.close)
        _best_effort(self._writer.close)  # fails on the closed sink: only marks it closed


def split_run_uri(uri: str) -> tuple[str, str]:
    """``(store URI, run id)`` of a run URI; the run id (its last component) must be one safe
    path component (``config.run_id_problem``), checked before any normalization."""
    text = uri.rstrip("/")
    last = re.split(r"[/\\]", text)[-1] if text else ""
    problem = run_id_problem(last)
    if problem is not None:
        raise ValueError(f"run URI {uri!r}: its last component (the run id) {problem}")
    if is_remote(text):
        if "/" not in text.split("://", 1)[1]:
            raise ValueError(f"run URI {uri!r} names a bucket: a run needs a key below it")
        return text.rsplit("/", 1)[0], last
    return os.path.dirname(os.path.abspath(os.path.expanduser(text))), last


def run_lease(uri: str, storage_options=None, *, timeout_s: float = 3600.0,
              break_lease: bool = False, what: str | None = None,
              how_to_break: str = "store.break_lease: true, or --set store.break_lease=true"
              ) -> Lease:
    """Take the exclusive lease on the run (or any output directory) at ``uri``: the object
    ``<parent>/_leases/<name>`` (``lease.py``; ``name`` must be a safe run id). A live lease of
    another holder raises :class:`LeaseHeld` naming it and ``how_to_break`` it; ``break_lease``
    removes it first. Storage failures raise a one-line ``StorageError``."""
    store_uri, name = split_run_uri(uri)
    lease = Lease(Storage(store_uri, storage_options).child(LEASE_DIR, name),
                  timeout_s=timeout_s, what=what or uri.rstrip("/"))
    try:
        with lease.storage.errors("taking the lease", keep=(LeaseHeld,)):
            if break_lease:
                lease.break_()
            return lease.acquire()
    except LeaseHeld as e:
        raise LeaseHeld(f"{e} ({how_to_break}, breaks it)") from None


class _Heartbeat:
    """Renews a lease every quarter of its timeout while its writer lives (a daemon thread):
    a live writer's lease never expires, a dead one's does."""

    def __init__(self, lease: Lease) -> None:
        self.lease, self._stop = lease, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="engram-lease")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(1.0, self.lease.timeout_s / 4)):
            try:
                _renew(self.lease, self._stop)
            except Exception:  # storage briefly unreachable: try again next beat
                pass

    def stop(self) -> None:
        """Stop renewing, waiting (a little) for a renewal in flight: a renewal landing after
        the release would resurrect the lease."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _lease_body(lease: Lease) -> dict | None:
    try:
        return json.loads(lease.storage.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def _renew(lease: Lease, stopped: threading.Event) -> None:
    """Push the lease's expiry forward if it is still ours (atomically: S3 PUT, local rename)."""
    body = _lease_body(lease)
    if not body or body.get("token") != lease.token or stopped.is_set():
        return
    body["expires"] = time.time() + lease.timeout_s
    data = json.dumps(body).encode()
    if lease.storage.remote:
        lease.storage.write_bytes("", data)
    else:
        tmp = f"{lease.storage.root}.renew-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, lease.storage.root)


def _is_run_entry(name: str) -> bool:
    """A name a run's prefix holds (current or superseded generation, marker, temp marker)."""
    return (name in RUN_FILES or name == COMMIT_MARKER or name.startswith(COMMIT_MARKER + ".")
            or name.startswith(GENERATION_PREFIX))


def _entries(storage: Storage) -> list[str] | None:
    """Names directly below ``storage`` (None when nothing is there; a file is its own name)."""
    if not storage.exists():
        return None
    with storage.errors("listing"):
        if not storage.fs.isdir(storage.root):
            return [storage.root.rstrip("/").rsplit("/", 1)[-1]]
    return storage.ls()


def _run_of(staging_uri: str) -> str:
    """``<store>/<run_id>`` of a staging URI ``<store>/_staging/<run_id>-<nonce>`` (for
    messages; any other URI is returned as is)."""
    parent, _, name = staging_uri.rstrip("/").rpartition("/")
    store, _, area = parent.rpartition("/")
    if area != STAGING_DIR or "-" not in name:
        return staging_uri
    return f"{store}/{name.rsplit('-', 1)[0]}"


def _best_effort(fn, *args) -> None:
    """Cleanup that must never mask the error being reported (nor fail a committed run)."""
    try:
        fn(*args)
    except Exception:
        pass


class RunWriter:
    """Writes a run (module docstring: lease, staging, publish, marker last); nothing is
    visible to readers until :meth:`commit` writes the marker.

    A committed run at ``uri`` is replaced only with ``overwrite=True``, and stays readable
    until the new one is committed; a target holding anything but run files is refused.
    ``staging_uri`` is where payloads go: solver tasks write there with ``attach=True``
    (``uri`` = the staging URI), which takes no lease and touches nothing else.
    """

    def __init__(self, uri: str, storage_options=None, *, overwrite: bool = False,
                 attach: bool = False, lease_timeout_s: float = 3600.0,
                 break_lease: bool = False) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.lease: Lease | None = None
        self._published: list[str] = []
        self._marker: dict | None = None
        self._released = False
        if attach:
            self.storage = Storage(self.uri, storage_options)
            return
        store_uri, self.run_id = split_run_uri(self.uri)
        self.final = Storage(self.uri, storage_options)
        self.lease = run_lease(self.uri, storage_options, timeout_s=lease_timeout_s,
                               break_lease=break_lease, what=f"run {self.uri}")
        self._heartbeat = _Heartbeat(self.lease)
        try:
            self._check_target(overwrite)
            self._store = Storage(store_uri, storage_options)
            self.storage = self._store.child(STAGING_DIR,
                                             f"{self.run_id}-{secrets.token_hex(8)}")
            self.storage.makedirs(PAYLOAD_DIR)
        except BaseException:
            self._release()
            raise

    @property
    def staging_uri(self) -> str:
        """Where this run's files are written before they are published."""
        return self.storage.uri

    def _check_target(self, overwrite: bool) -> None:
        names = _entries(self.final)
        if names is None:
            return
        if COMMIT_MARKER in names and not overwrite:
            raise FileExistsError(f"a committed run already exists at {self.uri}; "
                                  "choose another run_id or pass overwrite")
        foreign = sorted(n for n in names if not _is_run_entry(n))
        if foreign:
            raise FileExistsError(
                f"{self.uri} exists and is not an engram run (it holds {foreign[:5]}); the "
                "writer never replaces what it did not write: choose another run_id")

    def write_records(
        self, infos: Mapping[str, ModuleInfo], records: Iterable[EngramRecord]
    ) -> list[dict]:
        """Stream records (dense or factored) into per-module payload files; return their
        manifest rows."""
        writers: dict[str, _ModulePayload] = {}
        rows = []
        with self.storage.errors(f"writing payloads of run {_run_of(self.storage.uri)} to"):
            try:
                for rec in records:
                    w = writers.get(rec.module)
                    if w is None:
                        w = writers[rec.module] = _ModulePayload(self.storage, infos[rec.module])
                    rows.append(w.write(rec))
                for w in writers.values():
                    w.close()
            except BaseException:
                for w in writers.values():
                    w.discard()
                raise
        return rows

    def commit(self, manifest_rows: Sequence[dict], run_info: Mapping) -> str:
        """Stage manifest.parquet and run.json, publish, write the commit marker last, clean
        up and release the lease; return the run's URI."""
        manifest = _manifest_bytes(manifest_rows)
        info = dict(run_info)
        info.setdefault("payload_format_version", PAYLOAD_FORMAT_VERSION)
        run_json = json.dumps(info, indent=2, sort_keys=True, default=str).encode()
        self.storage.write_bytes(MANIFEST, manifest)
        self.storage.write_bytes(RUN_JSON, run_json)
        self._check_lease()
        generation = self._free_generation()
        self._publish(generation)
        self._marker = {"commit_format": COMMIT_FORMAT, "generation": generation,
                        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                        "run_json_sha256": hashlib.sha256(run_json).hexdigest(),
                        "writer": self.storage.uri.rsplit("-", 1)[-1],
                        "committed_at": time.time()}
        _write_atomic(self.final, COMMIT_MARKER, json.dumps(self._marker).encode())
        _best_effort(self._collect, generation)
        self._release()
        return self.uri

    def _check_lease(self) -> None:
        body = _lease_body(self.lease)
        if not body or body.get("token") != self.lease.token:
            holder = (body or {}).get("holder", "nobody")
            raise LeaseHeld(f"lost the lease on run {self.uri} (now held by {holder}): another "
                            "writer broke it; nothing was committed")

    def _free_generation(self) -> str:
        """The canonical names when no file of a run uses them, else a fresh ``v-<nonce>``."""
        names = set(_entries(self.final) or ())
        return "" if not names & set(RUN_FILES) else f"{GENERATION_PREFIX}{secrets.token_hex(8)}"

    def _publish(self, generation: str) -> None:
        """Move every staged file below the run's prefix (S3: server-side copies)."""
        target = self.final.child(generation) if generation else self.final
        staged = self.storage.ls()
        self._published = [generation] if generation else list(staged)
        with target.errors("publishing into"):
            if not self.final.remote:
                os.makedirs(target.root, exist_ok=True)
                for name in staged:
                    shutil.move(self.storage.path(name), target.path(name))
                return
            fs, root = self.storage.fs, self.storage.root
            sources = fs.find(root)
            fs.copy(sources, [target.path(p[len(root):].lstrip("/")) for p in sources])

    def _collect(self, generation: str) -> None:
        """After the commit: drop superseded run files, this staging area and stale staging
        areas of crashed writers of this run id (all ours: we hold the lease)."""
        for name in _entries(self.final) or ():
            if name == COMMIT_MARKER or name == generation:
                continue
            stale = (name.startswith(GENERATION_PREFIX) or name.startswith(COMMIT_MARKER + ".")
                     or (generation != "" and name in RUN_FILES))
            if stale:
                self.final.rm(name)
        areas = self._store.child(STAGING_DIR)
        for name in _entries(areas) or ():
            tail = name[len(self.run_id) + 1:]
            if name.startswith(self.run_id + "-") and re.fullmatch(r"[0-9a-f]{16}", tail):
                _best_effort(areas.rm, name)

    def write_statistics(self, group: str, moments: Moments) -> str:
        """Keep one input group's Σ in the run (``statistics/<group>.safetensors``), so a later
        run can merge new shards into it and re-solve without re-reading these."""
        rel = f"{STATISTICS_DIR}/{group}.safetensors"
        self.storage.makedirs(STATISTICS_DIR)
        self.storage.write_bytes(rel, moments.to_bytes())
        return rel

    def abort(self) -> None:
        """Remove what this writer wrote (its staging area, files it published before the
        marker) and release the lease. Best effort: it never raises, so the error that caused
        the abort is the one reported. Never touches a committed run."""
        if self.lease is None or self._released:
            return  # attached (the driver's writer owns the staging area), or done
        final, staging = _quick(self.final), _quick(self.storage)
        if not self._committed_by_us():
            for name in self._published:
                _best_effort(final.rm, name)
        _best_effort(staging.rm)
        self.lease.storage = _quick(self.lease.storage)  # the store may be gone: don't linger
        self._release()

    def _committed_by_us(self) -> bool:
        """True when the marker at the run names this writer (a marker write whose reply was
        lost): its files are the committed run and must stay."""
        if self._marker is None:
            return False
        try:
            return json.loads(_quick(self.final).read_bytes(COMMIT_MARKER)) == self._marker
        except Exception:
            return False

    def _release(self) -> None:
        if self.lease is not None and not self._released:
            self._released = True
            self._heartbeat.stop()
            _best_effort(self.lease.release)


def _quick(storage: Storage) -> Storage:
    """The location with few retries, for cleanup after a failure: best effort, and a store
    that is gone must not hold the original error back for minutes."""
    if not storage.remote:
        return storage
    opts = dict(storage.options or {})
    opts["config_kwargs"] = {**(opts.get("config_kwargs") or {}),
                             "retries": {"max_attempts": 2, "mode": "standard"},
                             "connect_timeout": 5}
    quick = Storage(storage.uri, opts)
    quick.options = storage.options  # pickles and reports as the original
    return quick


def _manifest_bytes(manifest_rows: Sequence[dict]) -> bytes:
    rows = sorted(manifest_rows, key=lambda r: (r["concept"], r["module"]))
    keys = [(r["concept"], r["module"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("manifest has duplicate (concept, module) rows")
    table = pa.Table.from_pylist(rows, schema=_MANIFEST_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_atomic(storage: Storage, rel: str, data: bytes) -> None:
    """One object written whole or not at all: S3 PUTs are; locally, a renamed temp file."""
    if storage.remote:
        storage.write_bytes(rel, data)
        return
    tmp = f"{rel}.tmp-{secrets.token_hex(4)}"
    storage.write_bytes(tmp, data)
    os.replace(storage.path(tmp), storage.path(rel))


def run_exists(uri: str, storage_options=None) -> bool:
    """True when a committed run is at ``uri``."""
    return Storage(uri, storage_options).exists(COMMIT_MARKER)


def _read_marker(root: Storage) -> dict:
    """The commit marker, checked: valid JSON, this commit format, a sane generation."""
    uri = root.uri_of(COMMIT_MARKER)
    if not root.exists(COMMIT_MARKER):
        raise FileNotFoundError(
            f"{root.uri} is not a committed engram run (no {COMMIT_MARKER} marker): "
            "the extraction did not finish, or this is not a run directory")
    marker = root.read_json(COMMIT_MARKER)
    if not isinstance(marker, dict) or "manifest_sha256" not in marker:
        raise ValueError(f"{uri} is not a commit marker (no manifest_sha256)")
    if "run_json_sha256" not in marker:
        raise ValueError(f"{uri} does not cover run.json (written by an engram-ray before "
                         f"commit format {COMMIT_FORMAT}): re-extract the run")
    gen = marker.get("generation", "")
    if gen != "" and not (isinstance(gen, str) and _GENERATION.fullmatch(gen)):
        raise ValueError(f"{uri} names an invalid generation {gen!r}")
    return marker


class Run:
    """A committed run, read lazily: ``engram(concept, module)`` fetches one row group."""

    def __init__(self, uri: str, storage_options=None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        root = Storage(self.uri, storage_options)
        self.marker = _read_marker(root)
        gen = self.marker.get("generation", "")
        self._storage = root.child(gen) if gen else root  # the committed generation's files
        manifest = self._storage.read_bytes(MANIFEST)
        raw_info = self._storage.read_bytes(RUN_JSON)
        self.info = _check_info(self._storage, raw_info, self.marker)
        if hashlib.sha256(manifest).hexdigest() != self.marker["manifest_sha256"]:
            raise ValueError(f"{self.uri}: manifest.parquet does not match the commit marker "
                             f"({self._storage.uri_of(MANIFEST)} was modified after the commit)")
        self.manifest = pq.read_table(pa.BufferReader(manifest))
        rows = self.manifest.to_pylist()
        self._rows = {(r["concept"], r["module"]): r for r in rows}
        self.concepts: list[str] = sorted({r["concept"] for r in rows})
        self.modules: list[str] = sorted({r["module"] for r in rows})
        # Small caches: engram() then bias() of one engram read it once, and the engrams of
        # consecutive concepts of one module usually share a row group. Bounded by count, and
        # an engram can be as large as its weight (a vocab-sized lm_head): keep them few.
        self._load = lru_cache(maxsize=2)(self._load_uncached)
        self._row_group = lru_cache(maxsize=2)(self._read_row_group)

    def __repr__(self) -> str:
        return f"Run({self.uri!r}, {len(self.concepts)} concepts, {len(self.modules)} modules)"

    def __reduce__(self):
        # Ray tasks receive a run by URI and reopen it (the commit checks run again there).
        return (Run, (self.uri, self.storage_options))

    def record(self, concept: str, module: str) -> dict:
        try:
            return self._rows[(concept, module)]
        except KeyError:
            what = "concept" if concept not in self.concepts else "module"
            known = self.concepts if what == "concept" else self.modules
            bad = concept if what == "concept" else module
            raise KeyError(f"{what} {bad!r} is not in run {self.uri} (known: {known[:10]})") from None

    def statistics(self) -> Statistics:
        """The Σ this run kept (``store.keep_statistics``), with its modules' metadata."""
        modules = {n: ModuleInfo.from_dict(d) for n, d in self.info.get("modules", {}).items()}
        groups = {g: self.group_statistics(g) for g in sorted({m.group for m in modules.values()})}
        return Statistics(modules=modules, groups=groups)

    def group_statistics(self, group: str) -> Moments:
        """One input group's kept Σ (what a solver task of an extending run merges into)."""
        rel = f"{STATISTICS_DIR}/{group}.safetensors"
        try:
            return Moments.from_bytes(self._storage.read_bytes(rel), what=f"{self.uri}/{rel}")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"run {self.uri} kept no statistics for input group {group!r}; extract with "
                "store.keep_statistics: true to make a run extendable") from None

    def module_info(self, module: str) -> dict:
        """Kind, shape, layer, group, ‖W‖ and bias flag of a module (from any concept's row)."""
        return self.record(self.concepts[0], module)

    def engram(self, concept: str, module: str) -> torch.Tensor:
        """The paper's ``W⁺_c`` in the module's weight shape, float32."""
        return self._load(concept, module)[0]

    def bias(self, concept: str, module: str) -> torch.Tensor | None:
        return self._load(concept, module)[1]

    def _load_uncached(self, concept: str, module: str):
        row = self.record(concept, module)
        path = self._storage.uri_of(row["payload"])
        t = self._row_group(row["payload"], row["row_group"]).slice(row["row"], 1)
        if t.num_rows != 1 or t.column("concept")[0].as_py() != concept:
            raise ValueError(f"{path}: row group {row['row_group']} row {row['row']} is not "
                             f"concept {concept!r}")
        dense = row["form"] == "dense"
        cells = {k: _cell(t, k) for k in ("weight", "bias", "factor_a", "factor_b")}
        order = ("weight", "bias") if dense else ("factor_a", "factor_b", "bias")
        if _digest(*(cells[k] for k in order)) != row["sha256"]:
            raise ValueError(
                f"payload {path} (concept {concept!r}, module {module!r}) fails its sha256 check: "
                "the file was modified after the run was committed"
            )
        bias = None if cells["bias"] is None else _floats(cells["bias"], (-1,))
        if dense:
            weight = torch.from_numpy(_floats(cells["weight"], tuple(row["shape"])))
        else:
            r = row["rank"]
            weight = FactoredEngram(
                torch.from_numpy(_floats(cells["factor_a"], (-1, r))),
                torch.from_numpy(_floats(cells["factor_b"], (r, -1))),
                row["kind"], tuple(row["shape"])).weight()
        return weight, None if bias is None else torch.from_numpy(bias)

    def _read_row_group(self, rel: str, index: int) -> pa.Table:
        return read_row_group(self._storage, rel, index)


def read_row_group(storage: Storage, rel: str, index: int) -> pa.Table:
    """Row group ``index`` of the payload file ``rel``, after checking its format version."""
    path = storage.uri_of(rel)
    with storage.open(rel, "rb") as f:
        pf = pq.ParquetFile(f)
        version = (pf.schema_arrow.metadata or {}).get(b"payload_format_version", b"?")
        if version != str(PAYLOAD_FORMAT_VERSION).encode():
            raise ValueError(f"{path}: unknown payload format version {version.decode()!r}")
        if not 0 <= index < pf.num_row_groups:
            raise ValueError(f"{path}: has {pf.num_row_groups} row groups, the manifest "
                             f"names row group {index}")
        return pf.read_row_group(index)


def _check_info(storage: Storage, raw: bytes, marker: Mapping) -> dict:
    """run.json parsed and checked: its payload format first (a format this reader does not
    know may commit differently), then its sha256 against the marker."""
    uri = storage.uri_of(RUN_JSON)
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{uri} is not valid JSON ({e}): the file is truncated or was "
                         "edited") from None
    if not isinstance(info, dict):
        raise ValueError(f"{uri} is not a run description (a JSON object)")
    version = info.get("payload_format_version")
    if version != PAYLOAD_FORMAT_VERSION:
        raise ValueError(
            f"{storage.uri}: payload format version {version!r} is not readable by this "
            f"engram-ray (reads version {PAYLOAD_FORMAT_VERSION}); re-extract the run with "
            "this version, or read it with the engram-ray that wrote it")
    if hashlib.sha256(raw).hexdigest() != marker["run_json_sha256"]:
        raise ValueError(f"{uri} does not match the commit marker (sha256): it was modified "
                         "after the run was committed; refusing to trust it")
    return info


def _cell(table: pa.Table, column: str) -> pa.Buffer | None:
    """The bytes of a payload cell (None for a null cell)."""
    value = table.column(column)[0]
    return value.as_buffer() if value.is_valid else None


def _floats(buf: pa.Buffer, shape: tuple[int, ...]) -> np.ndarray:
    """Payload bytes (checked against the manifest's sha256 first) as a writable float32 array."""
    return np.frombuffer(buf, dtype="<f4").reshape(shape).astype(np.float32)


def open_run(uri: str, storage_options=None) -> Run:
    """Open a committed run (local path or ``s3://`` URI)."""
    return Run(uri, storage_options)
