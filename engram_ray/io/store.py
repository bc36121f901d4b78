"""A run on any fsspec URI: per-group statistics, a manifest, run.json, a commit marker.

Layout of ``<store>/<run_id>/`` (local directory or ``s3://bucket/prefix``)::

    statistics/<group>.safetensors   per input group: Σ_total's eigenvalues and eigenvectors
                               (float64), and Σ_total itself when ``store.keep_statistics``
    payload/<group>.parquet    per input group, one row per concept: its feature rows X_c
                               (in the dtype captured) or its Σ_c block (packed float64)
    manifest.parquet           one row per (concept, module): norms, form, rank, where the
                               concept's statistics are, and the sha256 of every byte its
                               engram is formed from (payload row, spectrum file, weight)
    run.json                   config (credentials redacted), fingerprint, versions, warnings
    _COMMITTED                 written last: names the generation and the sha256 of the
                               manifest and of run.json (the manifest names every other file's)

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

Format 3: statistics, not engrams. A run does not store the (concept, module) engrams: every
module of an input group shares one Σ_total⁺ and each concept's rows, and the weight is in the
base model, so ``W⁺_c = (W X_cᵀ)(X_c Σ⁺)`` (or ``W Σ_c Σ⁺``) is formed on read (``core/solve.py``)
by :class:`Run`, bound to the base model (``engram_ray.runs``), each weight checked against the
digest recorded at extraction (``weight_sha256``: the module's (out, D) float64 matrix). Payload
cells are raw little-endian bytes, row-major, in ``binary`` columns (one value per tensor: a
copy to write, where Arrow's list types encode a repetition level per float) with their dtype
(``<f4``, ``<f8``, ``<f2``, or ``bf16`` as raw 16-bit patterns: a bf16 model's activations are
bf16, so keeping them so is lossless and halves the bytes). Rows are buffered into row groups
of about ``ROW_GROUP_BYTES``, and the manifest names each concept's row group and row: a reader
fetching one concept reads at most that much besides it. Runs of format 2 (stored engrams) are
refused in one line naming the format: re-extract them.

Readers refuse runs without the commit marker, a marker, manifest or run.json that is invalid or
does not match, and a payload whose sha256 differs from the manifest's: what a reader returns is
what the writer committed. Errors name the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engram_ray.config import SolverConfig, run_id_problem
from engram_ray.core.moments import (
    ModuleInfo,
    Moments,
    Statistics,
    pack_symmetric,
    unpack_symmetric,
)
from engram_ray.core.solve import (
    GroupSolution,
    apply_right,
    inverse_from_spectrum,
    row_factors,
    to_weight_shape,
    union_right,
    weight_layout,
)
from engram_ray.io.heartbeat import Heartbeat
from engram_ray.io.lease import DEFAULT_TIMEOUT_S, Lease, LeaseHeld
from engram_ray.io.storage import (
    Location,
    Storage,
    StorageError,
    as_storage,
    is_remote,
    location_uri,
)

__all__ = [
    "COMMIT_FORMAT",
    "PAYLOAD_FORMAT_VERSION",
    "LeaseHeld",
    "Run",
    "RunWriter",
    "held_lease",
    "open_run",
    "read_row_group",
    "run_exists",
    "run_lease",
    "split_run_uri",
    "weight_digest",
]

PAYLOAD_FORMAT_VERSION = 3  # 3: per-group statistics (2: per-engram float32 bytes; 1: Arrow tensors)
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
CACHE_BYTES = 2 << 30  # per cache of a Run: spectra, Σ⁺, unions' group halves

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
        ("dtype", pa.string()),
        ("spectrum", pa.string()),
        ("spectrum_sha256", pa.string()),
        ("weight_sha256", pa.string()),
    ]
)


# Tensor bytes as stored: little-endian, row-major; numpy has no bfloat16, so bfloat16 goes as
# its raw 16-bit patterns (lossless: the activations of a bf16 model are bf16).
_DTYPES = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2",
           torch.bfloat16: "bf16"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor's payload bytes (a C-contiguous array) and the dtype name they decode with."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in _DTYPES:
        t = t.float()
    name = _DTYPES[t.dtype]
    arr = t.view(torch.int16).numpy() if name == "bf16" else t.numpy()
    return np.ascontiguousarray(arr).view(np.uint8).reshape(-1), name


def _bytes_tensor(buf, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_tensor_bytes` (a writable copy)."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"unknown payload dtype {dtype!r}")
    raw = torch.frombuffer(bytearray(memoryview(buf).cast("B")), dtype=torch.uint8)
    return raw.view(_TORCH_DTYPES[dtype]).reshape(shape)


def _digest(*parts) -> str:
    """sha256 over the payload bytes of each present tensor, in order (arrays or buffers)."""
    h = hashlib.sha256()
    for p in parts:
        if p is not None:
            h.update(memoryview(p).cast("B"))
    return h.hexdigest()


def weight_digest(matrix: torch.Tensor) -> str:
    """sha256 of a module's (out, D) weight matrix (bias column included): which
    weights a run's engrams were computed with; checked whenever an engram is formed on read."""
    # Hashed in float32: exact for bf16, fp16 and fp32 weights, half the bytes of the float64
    # matrix (the digest is taken once per module at extraction and on every bind).
    arr = np.ascontiguousarray(matrix.detach().float().cpu().numpy())
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


_PAYLOAD_SCHEMA = pa.schema(
    [("concept", pa.string()), ("form", pa.string()), ("data", pa.binary()),
     ("dtype", pa.string()), ("rows", pa.int32())],
    metadata={"payload_format_version": str(PAYLOAD_FORMAT_VERSION)})


class _GroupPayload:
    """Streams one input group's concept statistics to ``payload/<group>.parquet`` (a row per
    concept: its feature rows, or its Σ_c block as a packed float64 upper triangle), in row
    groups of about ``ROW_GROUP_BYTES``."""

    def __init__(self, storage: Storage, group: str) -> None:
        self.rel = f"{PAYLOAD_DIR}/{group}.parquet"
        self._file = storage.open(self.rel, "wb")
        # Dictionary encoding and statistics only for the small string columns: float bytes
        # neither repeat nor compress, and a dictionary attempt on them is pure cost.
        self._writer = pq.ParquetWriter(
            self._file, _PAYLOAD_SCHEMA, use_dictionary=["concept", "form", "dtype"],
            write_statistics=["concept", "form"], compression="none")
        self._buffer: list[tuple] = []
        self._bytes = 0
        self.row_groups = 0

    def write(self, concept: str, form: str, tensor: torch.Tensor) -> dict:
        """Buffer one concept's statistics; returns where it lands, its dtype and sha256."""
        data, dtype = _tensor_bytes(tensor)
        rows = int(tensor.shape[0]) if form == "rows" else None
        where = {"payload": self.rel, "row_group": self.row_groups, "row": len(self._buffer),
                 "sha256": _digest(data), "dtype": dtype}
        self._buffer.append((concept, form, memoryview(data), dtype, rows))
        self._bytes += data.nbytes
        if self._bytes >= ROW_GROUP_BYTES:
            self._flush()
        return where

    def _flush(self) -> None:
        if not self._buffer:
            return
        cols = list(zip(*self._buffer))
        arrays = [pa.array(cols[0]), pa.array(cols[1]), pa.array(cols[2], pa.binary()),
                  pa.array(cols[3]), pa.array(cols[4], pa.int32())]
        table = pa.Table.from_arrays(arrays, schema=_PAYLOAD_SCHEMA)
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


def _spectrum_bytes(group: str, moments: Moments, solution: GroupSolution,
                    keep_total: bool) -> bytes:
    """``statistics/<group>.safetensors``: Σ_total's eigenvalues and eigenvectors (float64, as
    ``eigh`` gave them: every solver option is applied on read), Σ_total itself (packed) when
    the run keeps its statistics, and the counts an extension merges with."""
    from safetensors.torch import save

    tensors = {"eigenvalues": solution.evals.cpu().contiguous(),
               "eigenvectors": solution.evecs.cpu().contiguous()}
    if keep_total:
        tensors["total"] = pack_symmetric(moments.total.cpu())
    meta = {"format_version": str(PAYLOAD_FORMAT_VERSION), "group": group,
            "dim": str(moments.dim), "n_total": str(moments.n_total),
            "max_rows": str(moments.max_rows),
            "counts": json.dumps(dict(sorted(moments.counts.items()))),
            "sources": json.dumps(sorted(moments.sources))}
    return save(tensors, metadata=meta)


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


def run_lease(uri: Location, storage_options=None, *, timeout_s: float = 3600.0,
              break_lease: bool = False, what: str | None = None,
              how_to_break: str = "store.break_lease: true, or --set store.break_lease=true"
              ) -> Lease:
    """Take the exclusive lease on the run (or any output directory) at ``uri``: the object
    ``<parent>/_leases/<name>`` (``lease.py``; ``name`` must be a safe run id). A live lease of
    another holder raises :class:`LeaseHeld` naming it and ``how_to_break`` it; ``break_lease``
    removes it first. Storage failures raise a one-line ``StorageError``. ``uri`` may be the
    run's ``Storage``: the lease then shares its filesystems."""
    _, name = split_run_uri(location_uri(uri))
    lease = Lease(as_storage(uri, storage_options).parent().child(LEASE_DIR, name),
                  timeout_s=timeout_s, what=what or location_uri(uri).rstrip("/"))
    try:
        with lease.storage.errors("taking the lease", keep=(LeaseHeld,)):
            if break_lease:
                lease.break_()
            return lease.acquire()
    except LeaseHeld as e:
        raise LeaseHeld(f"{e} ({how_to_break}, breaks it)") from None


@contextmanager
def held_lease(uri: Location, storage_options=None, *, what: str | None = None,
               how_to_break: str = "remove its lease file once no writer is alive"):
    """The exclusive lease on ``uri`` (:func:`run_lease`, default timeout), renewed by a
    heartbeat while the block runs and released after: one writer of an output at a time."""
    lease = run_lease(uri, storage_options, timeout_s=DEFAULT_TIMEOUT_S, what=what,
                      how_to_break=how_to_break)
    beat = Heartbeat(lease).start()
    try:
        yield lease
    finally:
        beat.stop()
        _best_effort(lease.release)


def _lease_body(lease: Lease) -> dict | None:
    try:
        return json.loads(lease.storage.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


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

    def __init__(self, uri: Location, storage_options=None, *, overwrite: bool = False,
                 attach: bool = False, lease_timeout_s: float = 3600.0,
                 break_lease: bool = False) -> None:
        location = as_storage(uri, storage_options)  # the run's (attach: the staging area's)
        self.uri = location_uri(uri).rstrip("/")
        self.storage_options = location.options
        self.lease: Lease | None = None
        self._published: list[str] = []
        self._marker: dict | None = None
        self._released = False
        if attach:
            self.storage = location
            return
        _, self.run_id = split_run_uri(self.uri)
        self.final = location
        self.lease = run_lease(self.final, timeout_s=lease_timeout_s,
                               break_lease=break_lease, what=f"run {self.uri}")
        self._heartbeat = Heartbeat(self.lease).start()  # renews every timeout/4
        try:
            self._check_target(overwrite)
            self._store = self.final.parent()
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

    def write_group(self, members: Sequence[ModuleInfo], moments: Moments,
                    solution: GroupSolution, weight_digests: Mapping[str, str], *,
                    keep_total: bool = False) -> list[dict]:
        """Stage one solved input group (its spectrum file and its concepts' statistics) and
        return its manifest rows, one per (concept, module), carrying the norms and the sha256
        of every byte an engram of theirs is formed from."""
        group = members[0].group
        spec_rel = f"{STATISTICS_DIR}/{group}.safetensors"
        blob = _spectrum_bytes(group, moments, solution, keep_total)
        run = _run_of(self.storage.uri)
        with self.storage.errors(f"writing statistics of run {run} to"):
            try:
                if not self.storage.remote:  # object stores have no directories to create
                    self.storage.makedirs(STATISTICS_DIR)
                self.storage.write_bytes(spec_rel, blob)
            except StorageError as e:  # name the run, not only its staging area
                raise StorageError(f"writing statistics of run {run}: {e}") from e.__cause__
            payload = _GroupPayload(self.storage, group)
            try:
                stored = {}
                for c in sorted({r.concept for r in solution.records}):
                    form, t = (("rows", moments.rows[c]) if c in moments.rows
                               else ("block", pack_symmetric(moments.concepts[c].cpu())))
                    stored[c] = payload.write(c, form, t)
                payload.close()
            except BaseException:
                payload.discard()
                raise
        infos = {m.name: m for m in members}
        common = {"spectrum": spec_rel, "spectrum_sha256": hashlib.sha256(blob).hexdigest()}
        return [{"concept": r.concept, "module": r.module, "group": group,
                 "kind": infos[r.module].kind, "layer": infos[r.module].layer,
                 "shape": list(infos[r.module].weight_shape), "form": r.form, "rank": r.rank,
                 "has_bias": infos[r.module].bias, "n": r.n, "N": r.n_total,
                 "rel_norm": r.rel_norm, "weight_norm": r.weight_norm, "kept": r.kept,
                 "weight_sha256": weight_digests[r.module], **stored[r.concept], **common}
                for r in solution.records]

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


def run_exists(uri: Location, storage_options=None) -> bool:
    """True when a committed run is at ``uri``."""
    return as_storage(uri, storage_options).exists(COMMIT_MARKER)


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
    """A committed run, read lazily. Engrams are formed on read (format 3): ``engram(c, m)``
    reads concept c's statistics and its group's spectrum (each sha256-checked against the
    manifest) and the base weight ``W_m`` from the model the run is bound to (checked against
    the weight digest recorded at extraction).

    A run is bound to a model by :meth:`bind` (``engram_ray.open_run`` does it, lazily, with
    the model the run recorded or the one given); ``show``, ``list`` and statistics need none.
    ``solver`` overrides the run's solver options (the spectrum is stored, so any ``rtol``,
    ``condition_cap``, ``rank_fraction`` or ``ridge`` can be applied at edit time).
    """

    def __init__(self, uri: Location, storage_options=None, *,
                 solver: SolverConfig | None = None, binder=None) -> None:
        root = as_storage(uri, storage_options)
        self.uri = location_uri(uri).rstrip("/")
        self.storage_options = root.options
        self.location = root  # the run's prefix (``_storage``: its committed generation)
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
        self.run_solver = SolverConfig(**(self.info.get("solver") or {}))
        self.solver = solver if solver is not None else self.run_solver
        self._binder, self._weights = binder, None
        self._caches()

    def _caches(self) -> None:
        # Caches bounded by bytes, not count: a spectrum and its Σ⁺ are D×D float64 (1 MB at
        # D = 384, 512 MB at D = 8192), a union's group half X_U Σ⁺ is n_U×D. An edit walks
        # the modules of a layer's ~4 input groups in turn, a batch every request at each
        # module: small groups all stay, large ones a few at a time. A module's weight matrix
        # can be vocabulary-sized: one is kept.
        self._spectrum = _ByteCache(self._read_spectrum, CACHE_BYTES)
        self._pinv = _ByteCache(self._inverse, CACHE_BYTES)
        self._right = _ByteCache(self._right_uncached, CACHE_BYTES)
        self._matrix = lru_cache(maxsize=1)(self._weight_matrix)
        self._load = lru_cache(maxsize=2)(self._load_uncached)
        self._row_group = lru_cache(maxsize=2)(self._read_row_group)

    def __repr__(self) -> str:
        return f"Run({self.uri!r}, {len(self.concepts)} concepts, {len(self.modules)} modules)"

    def __reduce__(self):
        # Ray tasks receive a run by URI and reopen it (the commit checks run again there); the
        # binder (a module-level function and the model as data) travels with it.
        return (_reopen, (self.uri, self.storage_options, self.solver, self._binder))

    # --- binding and options ----------------------------------------------------------------
    def bind(self, weights) -> Run:
        """Use ``weights`` (anything with ``matrix(module) -> (out, D)`` float64 tensor) as the
        base model's weights; returns the run."""
        self._weights = weights
        self._matrix.cache_clear()
        self._load.cache_clear()
        return self

    def with_solver(self, solver: SolverConfig | None) -> Run:
        """This run with other solver options (None: the run's own), sharing its binding."""
        if solver is None or solver == self.solver:
            return self
        other = object.__new__(Run)
        other.__dict__.update(self.__dict__)
        other.solver = solver
        other._caches()
        other._spectrum = self._spectrum  # the spectrum does not depend on the options
        return other

    @property
    def binder(self):
        """What binds this run to its base model on first use (``runs.ModelBinder``), or None
        for a run opened unbound or bound to weights directly."""
        return self._binder

    @property
    def weights(self):
        if self._weights is None:
            if self._binder is None:
                raise ValueError(
                    f"run {self.uri} holds statistics, not engrams: forming an engram needs the "
                    "base model's weights; open it with engram_ray.open_run(uri, model=...) or "
                    "pass --model")
            self._weights = self._binder(self)
        return self._weights

    # --- manifest -----------------------------------------------------------------------------
    def record(self, concept: str, module: str) -> dict:
        try:
            return self._rows[(concept, module)]
        except KeyError:
            what = "concept" if concept not in self.concepts else "module"
            known = self.concepts if what == "concept" else self.modules
            bad = concept if what == "concept" else module
            raise KeyError(f"{what} {bad!r} is not in run {self.uri} (known: {known[:10]})") from None

    def module_info(self, module: str) -> dict:
        """Kind, shape, layer, group, ‖W‖ and bias flag of a module (from any concept's row)."""
        return self.record(self.concepts[0], module)

    # --- statistics ---------------------------------------------------------------------------
    def statistics(self) -> Statistics:
        """The Σ this run kept (``store.keep_statistics``), with its modules' metadata."""
        modules = {n: ModuleInfo.from_dict(d) for n, d in self.info.get("modules", {}).items()}
        groups = {g: self.group_statistics(g) for g in sorted({m.group for m in modules.values()})}
        return Statistics(modules=modules, groups=groups)

    def group_statistics(self, group: str) -> Moments:
        """One input group's kept Σ (what a solver task of an extending run merges into):
        Σ_total from the spectrum file, every concept's rows or block from the payload."""
        tensors, meta = self._spectrum(group)
        if "total" not in tensors:
            raise FileNotFoundError(
                f"run {self.uri} kept no statistics for input group {group!r}; extract with "
                "store.keep_statistics: true to make a run extendable")
        dim = int(meta["dim"])
        rows, blocks = {}, {}
        for c in self.concepts:
            first = self._group_row(c, group)
            form, t = self._concept(c, first["module"])
            if form == "rows":
                rows[c] = t
            else:
                blocks[c] = t
        return Moments(dim=dim, total=unpack_symmetric(tensors["total"], dim),
                       n_total=int(meta["n_total"]), concepts=blocks,
                       counts={c: int(n) for c, n in json.loads(meta["counts"]).items()},
                       sources=frozenset(json.loads(meta["sources"])), rows=rows,
                       max_rows=int(meta["max_rows"]))

    def _group_row(self, concept: str, group: str) -> dict:
        for m in self.modules:
            row = self._rows.get((concept, m))
            if row is not None and row["group"] == group:
                return row
        raise KeyError(f"concept {concept!r} has no statistics in input group {group!r} of "
                       f"run {self.uri}")

    def _read_spectrum(self, group: str) -> tuple[dict, dict]:
        from safetensors.torch import load

        row = next(r for r in self._rows.values() if r["group"] == group)
        with self._committed_files():
            blob = self._storage.read_bytes(row["spectrum"])
        if hashlib.sha256(blob).hexdigest() != row["spectrum_sha256"]:
            raise ValueError(f"{self._storage.uri_of(row['spectrum'])} fails its sha256 check: "
                             "the file was modified after the run was committed")
        return load(blob), _safetensors_metadata(blob)

    def _inverse(self, group: str) -> tuple[torch.Tensor, int]:
        """Σ⁺ under this run's solver options, float64, on the device the bound weights are
        on (a GPU model: the edit is formed there, and only what is written goes to the host)."""
        tensors, _ = self._spectrum(group)
        dev = getattr(self.weights, "device", "cpu") if self._has_weights() else "cpu"
        return inverse_from_spectrum(tensors["eigenvalues"].to(dev),
                                     tensors["eigenvectors"].to(dev), self.solver)

    def _has_weights(self) -> bool:
        return self._weights is not None or self._binder is not None

    def _concept(self, concept: str, module: str) -> tuple[str, torch.Tensor]:
        """(form, tensor) of a concept's statistics in ``module``'s group: its rows in their
        stored dtype, or its Σ_c block (float64), after the sha256 check."""
        row = self.record(concept, module)
        path = self._storage.uri_of(row["payload"])
        t = self._row_group(row["payload"], row["row_group"]).slice(row["row"], 1)
        if t.num_rows != 1 or t.column("concept")[0].as_py() != concept:
            raise ValueError(f"{path}: row group {row['row_group']} row {row['row']} is not "
                             f"concept {concept!r}")
        data = t.column("data")[0].as_buffer()
        if _digest(data) != row["sha256"]:
            raise ValueError(
                f"payload {path} (concept {concept!r}, input group {row['group']!r}) fails its "
                "sha256 check: the file was modified after the run was committed")
        dim = self._dim(row)
        if row["form"] == "factored":
            return "rows", _bytes_tensor(data, row["dtype"], (row["rank"], dim))
        return "block", unpack_symmetric(_bytes_tensor(data, row["dtype"], (-1,)), dim)

    @staticmethod
    def _dim(row: dict) -> int:
        """The input width D of a manifest row's module (bias column included)."""
        shape = row["shape"]
        width = {"conv1d": shape[0], "conv2d": math.prod(shape[1:])}.get(row["kind"], shape[-1])
        return int(width) + (1 if row["has_bias"] else 0)

    # --- engrams on read ----------------------------------------------------------------------
    def _weight_matrix(self, module: str) -> torch.Tensor:
        """``W_m`` as an (out, D) float64 matrix from the bound model, checked against the
        digest recorded at extraction: an engram formed with other weights is refused."""
        row = self.module_info(module)
        w = self.weights.matrix(module, row["has_bias"]).double()
        if w.shape[1] != self._dim(row):
            raise ValueError(f"module {module!r}: weight width {w.shape[1] - row['has_bias']} "
                             f"does not match run {self.uri} ({self._dim(row) - row['has_bias']})")
        if not getattr(self.weights, "allow_other", False) \
                and weight_digest(w) != row["weight_sha256"]:
            where = getattr(self.weights, "where", "the bound model")
            raise ValueError(
                f"module {module!r} of {where} is not the weight run {self.uri} was extracted "
                "from (its sha256 differs): engrams formed with other weights would be wrong; "
                "bind the model the run recorded, or pass --allow-other-weights with --model")
        return w

    def engram(self, concept: str, module: str) -> torch.Tensor:
        """The paper's ``W⁺_c`` in the module's weight shape, float32."""
        return self._load(concept, module)[0]

    def bias(self, concept: str, module: str) -> torch.Tensor | None:
        return self._load(concept, module)[1]

    def _load_uncached(self, concept: str, module: str):
        return self.union([concept], module)

    def union(self, concepts: Sequence[str], module: str
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``Σ_{c∈U} W⁺_c`` (weight in the module's layout, bias or None), float32, formed once
        from the union's statistics (``core.solve.group_update``), never concept by concept.
        The bias is ``A (B's bias column)`` for factors: the very product an adapter uses."""
        info = self._info(module)
        a, b = self.union_parts(concepts, module)
        if b is None:
            w, bias = to_weight_shape(a, info)
        else:
            w = weight_layout(a @ (b[:, :-1] if info.bias else b), info.kind, info.weight_shape)
            bias = a @ b[:, -1] if info.bias else None
        return w.float(), None if bias is None else bias.float()

    def union_parts(self, concepts: Sequence[str], module: str, factors: bool = False):
        """``(W X_Uᵀ, X_U Σ⁺)`` (float64, rank n_U) while the union is rows only and narrower
        than D/2 (or rows only at all, with ``factors``), else ``(dense (out, D), None)``.
        The group's half (``X_U Σ⁺`` or ``Σ_U Σ⁺``) is formed once for every module of the
        group (``core.solve.union_right``, cached); each module adds its ``W_m``."""
        concepts = tuple(dict.fromkeys(concepts))
        rows = [self.record(c, module) for c in concepts]
        # The form follows from the manifest alone (so both spellings share one cache entry):
        # factors iff every concept is kept as rows and (asked for, or n_U < D/2).
        low = all(r["form"] == "factored" for r in rows) and (
            factors or 2 * sum(r["rank"] for r in rows) < self._dim(rows[0]))
        right = self._right(rows[0]["group"], concepts, low)
        return apply_right(self._matrix(module), right)

    def _right_uncached(self, group: str, concepts: tuple[str, ...], factors: bool):
        rows, blocks = [], []
        for c in concepts:
            form, t = self._concept(c, self._group_row(c, group)["module"])
            (rows if form == "rows" else blocks).append(t)
        return union_right(rows, blocks, self._pinv(group)[0], factors=factors)

    def factors(self, concept: str, module: str):
        """``(A (out × r), B (r × in_flat), bias | None)``, float32, of a concept kept as rows
        (``W⁺_c = A B`` in (out, in_flat) orientation); None for a block."""
        form, x = self._concept(concept, module)
        if form != "rows":
            return None
        pinv = self._pinv(self.record(concept, module)["group"])[0]
        a, b = row_factors(self._matrix(module), x, pinv)
        info = self._info(module)
        bias = (a @ b[:, -1]).float().cpu() if info.bias else None
        right = (b[:, :-1] if info.bias else b).float().cpu().contiguous()
        return a.float().cpu().contiguous(), right, bias

    def _info(self, module: str) -> ModuleInfo:
        row = self.module_info(module)
        return ModuleInfo(name=module, kind=row["kind"], group=row["group"],
                          weight_shape=tuple(row["shape"]), bias=row["has_bias"],
                          layer=row["layer"])

    def _read_row_group(self, rel: str, index: int) -> pa.Table:
        with self._committed_files():
            return read_row_group(self._storage, rel, index)

    @contextmanager
    def _committed_files(self):
        """A file the commit marker named and that is gone: the run was overwritten (or
        removed) while it was read; say so, naming the run, instead of a bare ``[Errno 2]``."""
        try:
            yield
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"run {self.uri} changed while it was read: {e.filename or e} is gone (the run "
                "was overwritten or removed after it was opened); open it again") from None


class _ByteCache:
    """``fn(*key)`` memoized, least recently used first out once the cached tensors exceed
    ``budget`` bytes (the newest entry always stays)."""

    def __init__(self, fn, budget: int) -> None:
        self.fn, self.budget = fn, budget
        self._held: dict[tuple, tuple[object, int]] = {}
        self._bytes = 0

    def __call__(self, *key):
        if key in self._held:
            self._held[key] = self._held.pop(key)  # most recently used last
            return self._held[key][0]
        value = self.fn(*key)
        size = _nbytes(value)
        self._held[key] = (value, size)
        self._bytes += size
        while self._bytes > self.budget and len(self._held) > 1:
            self._bytes -= self._held.pop(next(iter(self._held)))[1]
        return value

    def cache_clear(self) -> None:
        self._held, self._bytes = {}, 0


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _reopen(uri: Location, storage_options, solver, binder) -> Run:
    return Run(uri, storage_options, solver=solver, binder=binder)


def _safetensors_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of an in-memory safetensors blob (its 8-byte length, then JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__", {})


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


def open_run(uri: Location, storage_options=None) -> Run:
    """Open a committed run (local path or ``s3://`` URI), bound to no model: its manifest,
    metadata and statistics; ``engram_ray.open_run`` binds the base model for engrams."""
    return Run(uri, storage_options)
