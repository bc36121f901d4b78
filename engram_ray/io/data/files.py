"""Data files: which files a config names, their format, their columns, their rows.

:func:`resolve_paths` expands ``cfg.paths`` (files, directories, globs; local or ``s3://``)
into data files; :func:`read_table` reads one file's needed columns, :func:`read_schema` and
:func:`count_file_rows` read as little as they can (a Parquet footer, the first JSON lines).
Why here and separate from encoding: the Ray path (:mod:`engram_ray.distributed.ingest`) reads
with these same functions inside Ray Data read tasks (a Parquet file cut into pieces of row
groups, :func:`parquet_row_groups`), and checks every file's schema on the driver first, so
that a missing column or an unreadable file fails with a :class:`DataError` naming it.

Files: Parquet, or JSON lines (``.jsonl`` / ``.json`` / ``.ndjson``; a ``.json`` file holding
one top-level array is accepted too). Every location goes through
:class:`engram_ray.io.storage.Storage`: :func:`resolve_files` builds one per configured path
and returns each file found as a location sharing its filesystems; the readers take a file's
URI or that ``Storage`` (an operation passes the ``Storage`` and builds nothing again).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from engram_ray.config import DataConfig
from engram_ray.io.storage import Location, Storage, as_storage, location_uri

__all__ = [
    "DataError",
    "check_concepts",
    "count_file_rows",
    "count_rows",
    "file_format",
    "parquet_row_groups",
    "read_schema",
    "read_table",
    "resolve_paths",
]

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json",
               ".ndjson": "json"}
_GLOB_CHARS = "*?["
# Failures of a read (pyarrow, I/O, JSON decoding, rows that are not objects) reported as
# DataError naming the file.
_READ_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, AttributeError)
# Bytes read from a JSON file to learn its columns without reading all of it.
_JSON_HEAD_BYTES = 1 << 20


class DataError(ValueError):
    """A data file cannot be read or lacks a column the config needs."""


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


def _expand(uri: str, cfg: DataConfig) -> list[Storage]:
    """The data files ``uri`` names (a file, a directory, a glob), as locations sharing the
    one ``Storage`` of ``uri``."""
    storage = as_storage(uri, cfg.storage_options)
    fs, target = storage.fs, storage.root
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
    return [storage.at(p) for p in files]


def resolve_files(cfg: DataConfig) -> list[Storage]:
    """Every data file named by ``cfg.paths`` (files, directories, globs), sorted by URI,
    unique, each a ``Storage`` (one built per configured path, the files sharing it)."""
    files: dict[str, Storage] = {}
    for uri in cfg.paths:
        for f in _expand(uri, cfg):
            files.setdefault(f.uri, f)
    return [files[u] for u in sorted(files)]


def resolve_paths(cfg: DataConfig) -> list[str]:
    """Every data file named by ``cfg.paths`` (files, directories, globs), sorted, unique."""
    return [f.uri for f in resolve_files(cfg)]


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


def _located(path: Location, cfg: DataConfig) -> tuple[Storage, str]:
    """A data file's ``Storage`` (the one given, or built from its URI) and its URI."""
    return as_storage(path, cfg.storage_options), location_uri(path)


@contextmanager
def _reading(storage: Storage, path: str, cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """Open one data file (``storage``, at URI ``path``) as ``(format, binary file)``; read
    failures become a DataError naming the file. Column checks belong after the ``with`` block
    (a DataError inside is re-wrapped)."""
    fmt = file_format(path, cfg)
    try:
        with storage.open() as f:
            yield fmt, f
    except FileNotFoundError as e:
        raise DataError(f"data file does not exist: {path}") from e
    except _READ_ERRORS as e:
        raise DataError(f"cannot read {fmt} file {path}: {e}") from e


def read_table(path: Location, cfg: DataConfig,
               row_groups: Sequence[int] | None = None) -> pa.Table:
    """One data file as a table holding only the columns ``cfg`` needs (checked, named errors);
    ``row_groups``: only these row groups of a Parquet file (a piece of a large file).

    Every row is checked here, where the file is known (the encoder sees only rows): a null or
    non-text prompt/answer/text value, a null feature vector, or a string that is not valid
    UTF-8 is a :class:`DataError` naming the file, the row (0-based, in the file) and the
    column."""
    columns = cfg.needed_columns()
    table, rows = None, None
    storage, path = _located(path, cfg)
    with _reading(storage, path, cfg) as (fmt, f):
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            present = pf.schema_arrow.names
            if set(columns) <= set(present):
                table = pf.read(columns=columns) if row_groups is None \
                    else pf.read_row_groups(list(row_groups), columns=columns)
                rows = _file_rows(pf.metadata, row_groups)
        else:
            table = _read_json_bytes(f.read())
            present = table.column_names
    _check_columns(path, present, cfg)
    table = table.select(columns)
    _check_values(path, table, cfg, rows or (lambda i: i))
    return table


def _file_rows(meta, row_groups: Sequence[int] | None):
    """Row ``i`` of a read of ``row_groups`` → its row in the file (errors name file rows)."""
    if row_groups is None:
        return None
    starts = [0]
    for g in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(g).num_rows)
    spans = [(starts[g], meta.row_group(g).num_rows) for g in row_groups]

    def row(i: int) -> int:
        for start, n in spans:
            if i < n:
                return start + i
            i -= n
        return i

    return row


def _is_text(typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def _check_values(path: str, table: pa.Table, cfg: DataConfig, row) -> None:
    """The checks of :func:`read_table`: text columns hold text in every row; no string is
    invalid UTF-8 (pyarrow's JSON and Parquet readers keep such bytes, and decoding them later
    fails with no file named); concept labels may be null (reference rows)."""
    for key, column in cfg.data_columns().items():
        col = table.column(column)
        where = f"{path}: column {column!r} ({key})"
        if key != "concept_column" and col.null_count:
            first = pc.index(pc.is_null(col), True).as_py()
            what = "feature vector" if key == "features_column" else "text"
            raise DataError(f"{where}, row {row(first)}: null (every row needs its {what})")
        if key not in ("concept_column", "features_column") and len(col) \
                and not _is_text(col.type):
            raise DataError(f"{where}: expected text (strings), got {col.type}")
        if key == "features_column" and len(col):
            _check_features(where, col, row)
        if _is_text(col.type):
            bad = _first_invalid_utf8(col)
            if bad is not None:
                raise DataError(f"{where}, row {row(bad)}: not valid UTF-8 text (re-encode "
                                "the file as UTF-8)")


def _check_features(where: str, col: pa.ChunkedArray, row) -> None:
    """A features column holds lists of numbers, all of one length (in this file)."""
    typ = col.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)
            or pa.types.is_fixed_size_list(typ)) or not (
            pa.types.is_integer(typ.value_type) or pa.types.is_floating(typ.value_type)):
        raise DataError(f"{where}: expected a list of numbers per row, got {typ}")
    lengths = pc.list_value_length(col)
    first = lengths[0].as_py()
    differs = pc.index(pc.not_equal(lengths, first), True).as_py()
    if differs >= 0:
        raise DataError(f"{where}, row {row(differs)}: a feature vector of length "
                        f"{lengths[differs].as_py()}, row {row(0)} has {first}")


def _first_invalid_utf8(col: pa.ChunkedArray) -> int | None:
    """Index of the first string that is not valid UTF-8 (Arrow's full validation finds
    whether a chunk has one; the failing chunk is then scanned for it), else ``None``."""
    offset = 0
    for chunk in col.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i in range(len(chunk)):
                try:
                    chunk[i].as_py()
                except UnicodeDecodeError:
                    return offset + i
        offset += len(chunk)
    return None


def check_concepts(cfg: DataConfig, paths: Sequence[Location] | None = None) -> None:
    """Refuse data in which no row names a concept (``concept_column`` null or ``""`` in every
    row of every file): such data would commit a run with no engram and exit 0. Reads only
    the concept column, and stops at the first file holding a concept (a Parquet file row
    group by row group), so good data costs one small read.

    Raises :class:`DataError` naming the column and the files."""
    paths = resolve_files(cfg) if paths is None else list(paths)
    found = []
    for p in paths:
        found.append(_has_concept(p, cfg))
        if found[-1] is True:
            return
    if all(f is None for f in found):
        return  # no rows at all: that is its own error ("holds no rows"), raised later
    shown = ", ".join(map(location_uri, paths[:3])) + (
        f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    raise DataError(f"column {cfg.concept_column!r} (concept_column) is null or empty in every "
                    f"row of {shown}: no row names a concept, so there is no engram to "
                    "extract (check concept_column)")


def _has_concept(path: Location, cfg: DataConfig) -> bool | None:
    """Whether the file names a concept in some row (None: it has no rows)."""
    column = cfg.concept_column
    storage, path = _located(path, cfg)
    with _reading(storage, path, cfg) as (fmt, f):
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            present = pf.schema_arrow.names
            if pf.metadata.num_rows == 0:
                return None
            if column in present:
                return any(_any_concept(pf.read_row_group(g, columns=[column]).column(0))
                           for g in range(pf.num_row_groups))
        else:
            table = _read_json_bytes(f.read())
            present = table.column_names
            if table.num_rows == 0:
                return None
            if column in present:
                return _any_concept(table.column(column))
    raise _missing_column_error(path, "concept_column", column, present)


def _any_concept(col: pa.ChunkedArray) -> bool:
    """Whether a concept column names a concept in some row (null and "" do not)."""
    if col.null_count == len(col):
        return False
    if not _is_text(col.type):
        return True  # labels of another type (class ids): any non-null value is a concept
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return bool(pc.any(pc.not_equal(col, "")).as_py())


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


def read_schema(path: Location, cfg: DataConfig) -> list[str]:
    """Column names of one file, cheaply (Parquet footer; the first JSON lines), checked.

    Raises :class:`DataError` naming the file when it cannot be read, or naming the column and
    the file when a needed column is absent.
    """
    storage, path = _located(path, cfg)
    with _reading(storage, path, cfg) as (fmt, f):
        if fmt == "parquet":
            present = pq.read_schema(f).names
        else:
            present = _read_json_bytes(_json_head(f)).column_names
    _check_columns(path, present, cfg)
    return present


def parquet_row_groups(path: Location, cfg: DataConfig) -> list[tuple[int, int]]:
    """``(rows, uncompressed bytes)`` of each row group of one Parquet file, from its footer,
    its columns checked like :func:`read_schema`: what a reader needs to cut the file into
    pieces without reading any data."""
    storage, path = _located(path, cfg)
    with _reading(storage, path, cfg) as (_, f):
        meta = pq.ParquetFile(f).metadata
        present = meta.schema.to_arrow_schema().names
        groups = [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size)
                  for i in range(meta.num_row_groups)]
    _check_columns(path, present, cfg)
    return groups


def count_file_rows(path: Location, cfg: DataConfig) -> int:
    """Rows in one file: Parquet footer metadata; JSON lines counted (arrays parsed)."""
    storage, path = _located(path, cfg)
    with _reading(storage, path, cfg) as (fmt, f):
        if fmt == "parquet":
            return pq.ParquetFile(f).metadata.num_rows
        data = f.read()
        if data.lstrip()[:1] == b"[":
            return len(json.loads(data))
        return sum(1 for line in data.splitlines() if line.strip())


def count_rows(cfg: DataConfig, max_workers: int = 16,
               files: Sequence[Location] | None = None) -> int:
    """Total input rows over all files (before encoding drops any), files read concurrently.
    ``files``: the files (their ``Storage``, as :func:`resolve_files` gave them), when the
    caller already resolved ``cfg``."""
    paths = resolve_files(cfg) if files is None else list(files)
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(paths)))) as pool:
        return sum(pool.map(lambda p: count_file_rows(p, cfg), paths))

