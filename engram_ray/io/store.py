"""A run of engrams on any fsspec URI: payload Parquet files, a manifest, run.json, a commit marker.

Layout of ``<run>/`` (local directory or ``s3://bucket/prefix``)::

    payload/<module>.parquet   one file per module, one row (= one row group) per concept
    manifest.parquet           one row per (concept, module): where the payload is + sha256
    run.json                   config, model fingerprint, versions, timings
    _COMMITTED                 written last; names the manifest's sha256

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

Readers refuse runs without the commit marker, a manifest that does not match it, and a payload
whose sha256 differs from the manifest's: what a reader returns is what the writer committed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engram_ray.core.moments import ModuleInfo, Moments, Statistics
from engram_ray.core.solve import EngramRecord, FactoredEngram
from engram_ray.io.storage import Storage

__all__ = [
    "PAYLOAD_FORMAT_VERSION",
    "Run",
    "RunWriter",
    "open_run",
    "run_exists",
]

PAYLOAD_FORMAT_VERSION = 2  # 2: float32 bytes in binary columns (1: Arrow tensors)
COMMIT_MARKER = "_COMMITTED"
MANIFEST = "manifest.parquet"
RUN_JSON = "run.json"
PAYLOAD_DIR = "payload"
STATISTICS_DIR = "statistics"

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


class RunWriter:
    """Writes a run; nothing is visible to readers until :meth:`commit` writes the marker.

    A run that already committed at ``uri`` is never overwritten (pass ``overwrite=True`` to
    replace it); leftovers of an uncommitted attempt are removed first. Solver tasks that write
    payloads into a run the driver prepared use ``attach=True``, which touches nothing.
    """

    def __init__(
        self, uri: str, storage_options=None, *, overwrite: bool = False, attach: bool = False
    ) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.storage = Storage(self.uri, storage_options)
        if attach:
            return
        if self.storage.exists(COMMIT_MARKER) and not overwrite:
            raise FileExistsError(f"a committed run already exists at {self.uri}; "
                                  "choose another run_id or pass overwrite")
        if self.storage.exists():
            self.storage.rm()
        self.storage.makedirs(PAYLOAD_DIR)

    def write_records(
        self, infos: Mapping[str, ModuleInfo], records: Iterable[EngramRecord]
    ) -> list[dict]:
        """Stream records (dense or factored) into per-module payload files; return their
        manifest rows."""
        writers: dict[str, _ModulePayload] = {}
        rows = []
        try:
            for rec in records:
                w = writers.get(rec.module)
                if w is None:
                    w = writers[rec.module] = _ModulePayload(self.storage, infos[rec.module])
                rows.append(w.write(rec))
        finally:
            for w in writers.values():
                w.close()
        return rows

    def commit(self, manifest_rows: Sequence[dict], run_info: Mapping) -> str:
        """Write manifest.parquet, run.json and, last, the commit marker; return the URI."""
        rows = sorted(manifest_rows, key=lambda r: (r["concept"], r["module"]))
        keys = [(r["concept"], r["module"]) for r in rows]
        if len(set(keys)) != len(keys):
            raise ValueError("manifest has duplicate (concept, module) rows")
        table = pa.Table.from_pylist(rows, schema=_MANIFEST_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        manifest = sink.getvalue().to_pybytes()
        self.storage.write_bytes(MANIFEST, manifest)
        info = dict(run_info)
        info.setdefault("payload_format_version", PAYLOAD_FORMAT_VERSION)
        run_json = json.dumps(info, indent=2, sort_keys=True, default=str)
        self.storage.write_bytes(RUN_JSON, run_json.encode())
        marker = {"manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                  "committed_at": time.time()}
        self.storage.write_bytes(COMMIT_MARKER, json.dumps(marker).encode())
        return self.uri

    def write_statistics(self, group: str, moments: Moments) -> str:
        """Keep one input group's Σ in the run (``statistics/<group>.safetensors``), so a later
        run can merge new shards into it and re-solve without re-reading these."""
        rel = f"{STATISTICS_DIR}/{group}.safetensors"
        self.storage.makedirs(STATISTICS_DIR)
        self.storage.write_bytes(rel, moments.to_bytes())
        return rel

    def abort(self) -> None:
        """Remove everything written so far (best effort): no half-written run stays behind."""
        try:
            if self.storage.exists():
                self.storage.rm()
        except OSError:
            pass


def run_exists(uri: str, storage_options=None) -> bool:
    """True when a committed run is at ``uri``."""
    return Storage(uri, storage_options).exists(COMMIT_MARKER)


class Run:
    """A committed run, read lazily: ``engram(concept, module)`` fetches one row group."""

    def __init__(self, uri: str, storage_options=None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self._storage = Storage(self.uri, storage_options)
        if not self._storage.exists(COMMIT_MARKER):
            raise FileNotFoundError(
                f"{self.uri} is not a committed engram run (no {COMMIT_MARKER} marker): "
                "the extraction did not finish, or this is not a run directory"
            )
        marker = json.loads(self._storage.read_bytes(COMMIT_MARKER))
        manifest = self._storage.read_bytes(MANIFEST)
        if hashlib.sha256(manifest).hexdigest() != marker["manifest_sha256"]:
            raise ValueError(f"{self.uri}: manifest.parquet does not match the commit marker")
        self.info = json.loads(self._storage.read_bytes(RUN_JSON))
        version = self.info.get("payload_format_version")
        if version != PAYLOAD_FORMAT_VERSION:
            raise ValueError(
                f"{self.uri}: payload format version {version!r} is not readable by this "
                f"engram-ray (reads version {PAYLOAD_FORMAT_VERSION}); re-extract the run with "
                "this version, or read it with the engram-ray that wrote it"
            )
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
        path = self._storage.uri_of(rel)
        with self._storage.open(rel, "rb") as f:
            pf = pq.ParquetFile(f)
            version = (pf.schema_arrow.metadata or {}).get(b"payload_format_version", b"?")
            if version != str(PAYLOAD_FORMAT_VERSION).encode():
                raise ValueError(f"{path}: unknown payload format version {version.decode()!r}")
            if not 0 <= index < pf.num_row_groups:
                raise ValueError(f"{path}: has {pf.num_row_groups} row groups, the manifest "
                                 f"names row group {index}")
            return pf.read_row_group(index)


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
