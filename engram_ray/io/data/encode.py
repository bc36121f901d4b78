"""Encoding rows into tokens and token masks, and collating them into batches.

Why one encoding for both paths: the distributed pipeline is checked against the single-process
one, so both must turn a data row into exactly the same tokens and the same token mask.
:func:`encode_rows` is that one per-row encoding; the single-process path calls it from
:func:`iter_batches`, Ray Data calls it inside ``map_batches``
(:mod:`engram_ray.distributed.ingest`). This module is pure pyarrow + tokenizer: it never
imports ``ray``, and torch only in :func:`collate` (a read or encode worker that imports this
module for :func:`encode_rows` is spared torch's ~2 s import).

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
:class:`EmptyMaskWarning` giving their count.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from engram_ray.config import DataConfig
from engram_ray.io.data.files import DataError, check_concepts, read_table, resolve_files

if TYPE_CHECKING:
    from engram_ray.core.batch import Batch

__all__ = [
    "ENCODED_COLUMNS",
    "EmptyMaskWarning",
    "collate",
    "encode_rows",
    "iter_batches",
    "pad_token_id",
    "to_arrow",
    "tokenizer_from",
]

ENCODED_COLUMNS = {
    "text": ("input_ids", "token_mask", "n_tokens", "concept"),
    "prompt_answer": ("input_ids", "token_mask", "n_tokens", "concept"),
    "features": ("features", "concept"),
}


class EmptyMaskWarning(UserWarning):
    """Rows were dropped because no token of theirs counts (e.g. answer truncated away)."""


def tokenizer_from(tokenizer_or_dir):
    """A tokenizer object as is, or ``AutoTokenizer.from_pretrained`` on a local directory
    (never running code the directory ships: ``trust_remote_code=False``)."""
    if tokenizer_or_dir is None or not isinstance(tokenizer_or_dir, str):
        return tokenizer_or_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_or_dir, trust_remote_code=False)


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
    import torch  # here, not at import: the read and encode workers never build a Batch

    from engram_ray.core.batch import Batch

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


def _rows(encoded: Mapping[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    names = list(encoded)
    for values in zip(*(encoded[n] for n in names)):
        yield dict(zip(names, values))


def iter_batches(cfg: DataConfig, tokenizer=None, files: Sequence | None = None
                 ) -> Iterator[Batch]:
    """Batches of ``cfg.batch_size`` rows (the last may be smaller), in a deterministic order.

    Files are read in sorted path order and rows in file order; batches span file boundaries.
    ``tokenizer``: a tokenizer or a local HF directory; not needed for ``features_column``.
    Rows with no counted token are dropped and reported once at the end (EmptyMaskWarning).
    Data in which no row names a concept is refused before any batch (:func:`check_concepts`).
    ``files``: ``cfg``'s files already resolved (their ``Storage``, ``resolve_files``'s), so
    that an operation opens each file through the one ``Storage`` it built.
    """
    tokenizer = tokenizer_from(tokenizer)
    pad_id = pad_token_id(tokenizer) if tokenizer is not None else 0
    stats: dict[str, int] = {}
    buffer: list[dict[str, Any]] = []
    paths = resolve_files(cfg) if files is None else list(files)
    check_concepts(cfg, paths)
    for path in paths:
        table = read_table(path, cfg)
        buffer.extend(_rows(encode_rows(table, cfg, tokenizer, stats=stats)))
        while len(buffer) >= cfg.batch_size:
            yield collate(buffer[: cfg.batch_size], pad_id)
            del buffer[: cfg.batch_size]
    if buffer:
        yield collate(buffer, pad_id)
    if stats.get("empty"):
        _warn_empty(stats["empty"], stats["rows"], dropped=True)
