"""Data ingestion shared by the single-process engine and Ray Data: read, encode, collate.

Why one module for both paths: the distributed pipeline is checked against the single-process
engine, so both must turn a data row into exactly the same tokens and the same token mask.
:func:`encode_rows` is that one per-row encoding; the single-process path calls it from
:func:`iter_batches`, Ray Data calls it inside ``map_batches``
(:mod:`engram_ray.distributed.ingest`). This module is pure pyarrow + tokenizer: it never
imports ``ray``.

Input rows carry a concept label (``concept_column``; null or ``""`` → ``None``, a
reference-only row) and exactly one of:

- ``text_column``: every real token counts (special tokens added, truncated to ``max_length``);
- ``prompt_column`` + ``answer_column``: prompt tokenized with special tokens, answer without,
  concatenated and truncated to ``max_length``; only answer tokens count (ai-engram's
  convention);
- ``features_column``: a ``list<float>`` vector per row (for non-token models).

Encoded layout (the output of :func:`encode_rows`, one entry per kept row):

- token modes: ``input_ids`` (object array of 1-D ``int64`` arrays, variable length, unpadded),
  ``token_mask`` (object array of 1-D ``bool`` arrays, same lengths), ``n_tokens`` (``int64``,
  the number of counted tokens), ``concept`` (object array of ``str`` / ``None``);
- features mode: ``features`` (``float32`` array ``(N, D)``), ``concept``.

Rows are padded only by :func:`collate`, to the longest row of each batch. Rows with no counted
token (e.g. the answer was truncated away) are dropped and reported with an
:class:`EmptyMaskWarning` giving their count. Files: Parquet, or JSON lines (``.jsonl`` /
``.json``; a ``.json`` file holding one top-level array is accepted too).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import torch

from engram_ray.config import DataConfig
from engram_ray.core.batch import Batch
from engram_ray.io.storage import filesystem, is_remote, strip_protocol

__all__ = [
    "ENCODED_COLUMNS",
    "DataConfig",
    "DataError",
    "EmptyMaskWarning",
    "collate",
    "count_file_rows",
    "count_rows",
    "encode_rows",
    "file_format",
    "iter_batches",
    "load_tokenizer",
    "pad_token_id",
    "read_schema",
    "read_table",
    "resolve_paths",
    "to_arrow",
]

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json",
               ".ndjson": "json"}
_GLOB_CHARS = "*?["
# Failures of a read (pyarrow, I/O, JSON decoding, rows that are not objects) reported as
# DataError naming the file.
_READ_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, AttributeError)
# Bytes read from a JSON file to learn its columns without reading all of it.
_JSON_HEAD_BYTES = 1 << 20

ENCODED_COLUMNS = {
    "text": ("input_ids", "token_mask", "n_tokens", "concept"),
    "prompt_answer": ("input_ids", "token_mask", "n_tokens", "concept"),
    "features": ("features", "concept"),
}


class DataError(ValueError):
    """A data file cannot be read or lacks a column the config needs."""


class EmptyMaskWarning(UserWarning):
    """Rows were dropped because no token of theirs counts (e.g. answer truncated away)."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def file_format(path: str, cfg: DataConfig) -> str:
    """``cfg.format``, else the format implied by the file extension."""
    if cfg.format is not None:
        return cfg.format
    fmt = _format_by_extension(path)
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path} from its extension; "
            f"use one of {sorted(_EXTENSIONS)} or set format"
        )
    return fmt


def _format_by_extension(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return None


def _is_data_file(path: str, cfg: DataConfig) -> bool:
    """Files picked up from directories and globs: known extensions, no hidden/marker files."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith((".", "_")):
        return False
    fmt = _format_by_extension(path)
    return fmt is not None and (cfg.format is None or fmt == cfg.format)


def _with_protocol(uri: str, found: str) -> str:
    """Put the ``s3://`` scheme back on paths returned by an fsspec listing."""
    if is_remote(uri) and "://" not in found:
        return uri.split("://", 1)[0] + "://" + found
    return found


def _fs_path(uri: str) -> str:
    return uri.split("://", 1)[1] if is_remote(uri) else uri


def _expand(uri: str, cfg: DataConfig) -> list[str]:
    fs = filesystem(uri, cfg.storage_options)
    target = strip_protocol(uri)
    if any(c in target for c in _GLOB_CHARS):
        found = [p for p in fs.glob(target) if fs.isfile(p)]
        files = [p for p in found if _is_data_file(p, cfg)]
    elif fs.isdir(target):
        files = [p for p in fs.find(target) if _is_data_file(p, cfg)]
    elif fs.isfile(target):
        files = [target]
    else:
        raise DataError(f"data path does not exist: {uri}")
    if not files:
        raise DataError(f"no data files match {uri}")
    return [_with_protocol(uri, p) for p in files]


def resolve_paths(cfg: DataConfig) -> list[str]:
    """Every data file named by ``cfg.paths`` (files, directories, globs), sorted, unique."""
    files: set[str] = set()
    for uri in cfg.paths:
        files.update(_expand(uri, cfg))
    return sorted(files)


def _missing_column_error(path: str, key: str, column: str, present: Sequence[str]) -> DataError:
    return DataError(
        f"column {column!r} ({key}) not found in {path}; columns present: {list(present)}"
    )


def _check_columns(path: str, present: Sequence[str], cfg: DataConfig) -> None:
    for key, column in cfg.data_columns().items():
        if column not in present:
            raise _missing_column_error(path, key, column, present)


def _read_json_bytes(data: bytes) -> pa.Table:
    """JSON lines via pyarrow; a file holding one top-level JSON array via ``json``."""
    if data.lstrip()[:1] == b"[":
        return pa.Table.from_pylist(json.loads(data))
    if not data.strip():
        return pa.table({})
    return pajson.read_json(io.BytesIO(data))


@contextmanager
def _reading(path: str, cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """Open one data file as ``(format, binary file)``; read failures become a DataError naming
    the file. Column checks belong after the ``with`` block (a DataError inside is re-wrapped)."""
    fmt = file_format(path, cfg)
    fs = filesystem(path, cfg.storage_options)
    try:
        with fs.open(_fs_path(path), "rb") as f:
            yield fmt, f
    except FileNotFoundError as e:
        raise DataError(f"data file does not exist: {path}") from e
    except _READ_ERRORS as e:
        raise DataError(f"cannot read {fmt} file {path}: {e}") from e


def read_table(path: str, cfg: DataConfig) -> pa.Table:
    """One data file as a table holding only the columns ``cfg`` needs (checked, named errors)."""
    columns = cfg.needed_columns()
    table = None
    with _reading(path, cfg) as (fmt, f):
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            present = pf.schema_arrow.names
            if set(columns) <= set(present):
                table = pf.read(columns=columns)
        else:
            table = _read_json_bytes(f.read())
            present = table.column_names
    _check_columns(path, present, cfg)
    return table.select(columns)


def _json_head(f) -> bytes:
    """The first complete JSON lines of an open file (the whole file if it is one array)."""
    head = f.read(_JSON_HEAD_BYTES)
    if head.lstrip()[:1] == b"[":
        return head + f.read()
    if len(head) < _JSON_HEAD_BYTES:
        return head
    while b"\n" not in head:
        more = f.read(_JSON_HEAD_BYTES)
        if not more:
            return head
        head += more
    return head[: head.rfind(b"\n") + 1]


def read_schema(path: str, cfg: DataConfig) -> list[str]:
    """Column names of one file, cheaply (Parquet footer; the first JSON lines), checked.

    Raises :class:`DataError` naming the file when it cannot be read, or naming the column and
    the file when a needed column is absent.
    """
    with _reading(path, cfg) as (fmt, f):
        if fmt == "parquet":
            present = pq.read_schema(f).names
        else:
            present = _read_json_bytes(_json_head(f)).column_names
    _check_columns(path, present, cfg)
    return present


def count_file_rows(path: str, cfg: DataConfig) -> int:
    """Rows in one file: Parquet footer metadata; JSON lines counted (arrays parsed)."""
    with _reading(path, cfg) as (fmt, f):
        if fmt == "parquet":
            return pq.ParquetFile(f).metadata.num_rows
        data = f.read()
        if data.lstrip()[:1] == b"[":
            return len(json.loads(data))
        return sum(1 for line in data.splitlines() if line.strip())


def count_rows(cfg: DataConfig, max_workers: int = 16) -> int:
    """Total input rows over all files (before encoding drops any), files read concurrently."""
    paths = resolve_paths(cfg)
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(paths)))) as pool:
        return sum(pool.map(lambda p: count_file_rows(p, cfg), paths))


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_or_dir):
    """A tokenizer object as is, or ``AutoTokenizer.from_pretrained`` on a local directory."""
    if tokenizer_or_dir is None or not isinstance(tokenizer_or_dir, str):
        return tokenizer_or_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_or_dir)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _column(data, name: str) -> list:
    """One column of a pyarrow Table or a mapping of columns, as a Python list."""
    col = data.column(name) if isinstance(data, pa.Table) else data[name]
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_pylist()
    return list(col)


def _column_length(data, name: str) -> int:
    return data.num_rows if isinstance(data, pa.Table) else len(data[name])


def _concepts(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = None if v is None or v == "" else str(v)
    return out


def _texts(values: list, column: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"column {column!r} row {i}: expected a string, got {v!r}")
    return values


def _token_rows(data, cfg: DataConfig, tokenizer) -> tuple[list[list[int]], list[np.ndarray]]:
    """Per row: token ids, and the mask of the tokens that count."""
    if _column_length(data, cfg.concept_column) == 0:
        return [], []
    if cfg.mode == "text":
        texts = _texts(_column(data, cfg.text_column), cfg.text_column)
        enc = tokenizer(texts, add_special_tokens=True, truncation=True,
                        max_length=cfg.max_length)["input_ids"]
        return enc, [np.ones(len(ids), dtype=bool) for ids in enc]
    prompts = _texts(_column(data, cfg.prompt_column), cfg.prompt_column)
    answers = _texts(_column(data, cfg.answer_column), cfg.answer_column)
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    ids, masks = [], []
    for p, a in zip(p_ids, a_ids):
        row = (list(p) + list(a))[: cfg.max_length]
        mask = np.zeros(len(row), dtype=bool)
        mask[len(p):] = True
        ids.append(row)
        masks.append(mask)
    return ids, masks


def _features(values: list, column: str) -> np.ndarray:
    if not values:
        return np.zeros((0, 0), dtype=np.float32)
    rows = []
    for i, v in enumerate(values):
        if v is None:
            raise DataError(f"column {column!r} row {i}: null feature vector")
        rows.append(np.asarray(v, dtype=np.float32).reshape(-1))
    dims = {r.shape[0] for r in rows}
    if len(dims) != 1:
        raise DataError(f"column {column!r}: feature vectors of different lengths {sorted(dims)}")
    return np.stack(rows)


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def encode_rows(data, cfg: DataConfig, tokenizer=None, *, drop_empty: bool = True,
                stats: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Encode rows (a pyarrow Table or a mapping of columns) into the layout in the module doc.

    Rows with no counted token are dropped (``drop_empty=True``) or kept with ``n_tokens == 0``.
    With ``stats`` (a dict) the counts ``rows`` / ``empty`` are accumulated there and the caller
    reports them; without it an :class:`EmptyMaskWarning` is issued here when rows are empty.
    """
    concepts = _concepts(_column(data, cfg.concept_column))
    if cfg.mode == "features":
        feats = _features(_column(data, cfg.features_column), cfg.features_column)
        _tally(stats, len(concepts), 0)
        return {"features": feats, "concept": concepts}
    if tokenizer is None:
        raise ValueError(f"a tokenizer is needed to encode {cfg.mode!r} rows")
    ids, masks = _token_rows(data, cfg, tokenizer)
    n_tokens = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    empty = int((n_tokens == 0).sum())
    _tally(stats, len(ids), empty)
    if stats is None and empty:
        _warn_empty(empty, len(ids), dropped=drop_empty)
    keep = np.flatnonzero(n_tokens > 0) if drop_empty else np.arange(len(ids))
    return {
        "input_ids": _object_array([np.asarray(ids[i], dtype=np.int64) for i in keep]),
        "token_mask": _object_array([masks[i] for i in keep]),
        "n_tokens": n_tokens[keep],
        "concept": concepts[keep],
    }


def _tally(stats: dict[str, int] | None, rows: int, empty: int) -> None:
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + rows
        stats["empty"] = stats.get("empty", 0) + empty


def _warn_empty(empty: int, rows: int, *, dropped: bool) -> None:
    what = "dropped" if dropped else "kept"
    warnings.warn(
        f"{empty} of {rows} row(s) have no counted token (e.g. the answer was truncated away "
        f"by max_length) and were {what}",
        EmptyMaskWarning,
        stacklevel=3,
    )


def to_arrow(encoded: Mapping[str, np.ndarray]) -> pa.Table:
    """The encoded columns as a pyarrow Table with plain ``list<>`` columns.

    Ray Data stores ragged numpy columns as tensor extension types, whose shapes differ between
    blocks; plain Arrow lists concatenate across blocks whatever the row lengths.
    """
    cols: dict[str, pa.Array] = {}
    for name, values in encoded.items():
        if name == "input_ids":
            cols[name] = pa.array(list(values), type=pa.list_(pa.int64()))
        elif name == "token_mask":
            cols[name] = pa.array(list(values), type=pa.list_(pa.bool_()))
        elif name == "features":
            cols[name] = pa.array(list(values), type=pa.list_(pa.float32()))
        elif name == "concept":
            cols[name] = pa.array(list(values), type=pa.string())
        else:
            cols[name] = pa.array(values)
    return pa.table(cols)


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------


def _as_columns(encoded) -> dict[str, list]:
    """Columns from a mapping of columns, a pyarrow Table, or a sequence of row mappings."""
    if isinstance(encoded, pa.Table):
        return {name: encoded.column(name).to_pylist() for name in encoded.column_names}
    if isinstance(encoded, Mapping):
        return {name: list(values) for name, values in encoded.items()}
    rows = list(encoded)
    if not rows:
        raise ValueError("cannot collate an empty batch")
    return {name: [row[name] for row in rows] for name in rows[0]}


def collate(encoded, pad_id: int = 0) -> Batch:
    """Right-pad encoded rows to the longest row of the batch and build a :class:`Batch`.

    ``encoded``: the output of :func:`encode_rows` (or a slice of it), a pyarrow Table of it, or
    a sequence of row dicts (e.g. from Ray Data). Token rows give ``inputs = {"input_ids",
    "attention_mask"}`` (``long``, ``(B, T)``) and ``mask`` (``bool``, ``(B, T)``); feature rows
    give ``inputs`` = ``float32`` ``(B, D)`` and ``mask=None``.
    """
    cols = _as_columns(encoded)
    concepts = [None if c is None or c == "" else str(c) for c in cols["concept"]]
    if "features" in cols:
        feats = np.stack([np.asarray(v, dtype=np.float32) for v in cols["features"]])
        return Batch(inputs=torch.from_numpy(feats), concepts=concepts, mask=None)
    ids_rows = [np.asarray(v, dtype=np.int64) for v in cols["input_ids"]]
    mask_rows = [np.asarray(v, dtype=bool) for v in cols["token_mask"]]
    n, t = len(ids_rows), max((len(r) for r in ids_rows), default=0)
    ids = np.full((n, t), pad_id, dtype=np.int64)
    attn = np.zeros((n, t), dtype=np.int64)
    mask = np.zeros((n, t), dtype=bool)
    for i, (row, m) in enumerate(zip(ids_rows, mask_rows)):
        ids[i, : len(row)] = row
        attn[i, : len(row)] = 1
        mask[i, : len(m)] = m
    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn)}
    return Batch(inputs=inputs, concepts=concepts, mask=torch.from_numpy(mask))


# ---------------------------------------------------------------------------------------------
# Single-process iteration
# ---------------------------------------------------------------------------------------------


def _rows(encoded: Mapping[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    names = list(encoded)
    for values in zip(*(encoded[n] for n in names)):
        yield dict(zip(names, values))


def iter_batches(cfg: DataConfig, tokenizer=None) -> Iterator[Batch]:
    """Batches of ``cfg.batch_size`` rows (the last may be smaller), in a deterministic order.

    Files are read in sorted path order and rows in file order; batches span file boundaries.
    ``tokenizer``: a tokenizer or a local HF directory; not needed for ``features_column``.
    Rows with no counted token are dropped and reported once at the end (EmptyMaskWarning).
    """
    tokenizer = load_tokenizer(tokenizer)
    pad_id = pad_token_id(tokenizer) if tokenizer is not None else 0
    stats: dict[str, int] = {}
    buffer: list[dict[str, Any]] = []
    for path in resolve_paths(cfg):
        table = read_table(path, cfg)
        buffer.extend(_rows(encode_rows(table, cfg, tokenizer, stats=stats)))
        while len(buffer) >= cfg.batch_size:
            yield collate(buffer[: cfg.batch_size], pad_id)
            del buffer[: cfg.batch_size]
    if buffer:
        yield collate(buffer, pad_id)
    if stats.get("empty"):
        _warn_empty(stats["empty"], stats["rows"], dropped=True)
