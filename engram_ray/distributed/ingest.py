"""Ray Data ingestion: the same rows and the same encoding as the single-process reader.

:func:`read_dataset` reads the files :func:`engram_ray.io.data.resolve_paths` finds with the
single-process reader (:func:`engram_ray.io.data.read_table`) inside Ray Data read tasks, one
per file or per run of Parquet row groups (``_FilesDatasource``), after checking every file's
schema on the driver so a missing column or an unreadable file fails up front with an error
naming it, instead of deep inside a read task. :func:`encoded_dataset` then runs
:func:`engram_ray.io.data.encode_rows` in ``map_batches`` with a callable class, so each worker
loads the tokenizer once from the model's local directory.

S3: Ray workers never see environment changes made after ``ray.init``, so the endpoint and
credentials travel inside ``cfg`` (``storage_options``, pickled into the read tasks) and each
task opens its piece through :class:`engram_ray.io.storage.Storage`, as ``--local`` does.

The encoded dataset holds the columns of :func:`engram_ray.io.data.encode_rows` as plain Arrow
lists (see :func:`engram_ray.io.data.to_arrow`); :func:`engram_ray.io.data.collate` turns any batch
of them (numpy, pyarrow or a list of rows) into a :class:`engram_ray.core.batch.Batch`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
from ray.data.block import BlockMetadata

from engram_ray.distributed.cluster import normal_priority
from engram_ray.io.data import (
    DataConfig,
    DataError,
    EmptyMaskWarning,
    count_rows,
    encode_rows,
    file_format,
    pad_token_id,
    parquet_row_groups,
    read_schema,
    read_table,
    resolve_files,
    to_arrow,
    tokenizer_from,
)
from engram_ray.io.storage import Location, location_uri

# count_rows (Parquet footers; JSON lines counted; no Ray) is re-exported for the pipeline, which
# compares it with the rows it accumulated to check that each row was counted exactly once.
__all__ = ["count_rows", "encoded_dataset", "read_dataset", "tokenizer_pad_id", "validate_files"]

# Rows per map_batches call: big enough to amortise the tokenizer call, small enough to stream.
ENCODE_BATCH_ROWS = 256


def _map_files(fn, paths: list[str], max_workers: int = 16) -> list:
    """``fn`` over ``paths`` on a thread pool (S3 metadata reads are latency bound)."""
    if len(paths) <= 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(paths))) as pool:
        return list(pool.map(fn, paths))


def validate_files(cfg: DataConfig, files: Sequence[Location] | None = None
                   ) -> tuple[list[str], str]:
    """Resolve the files, check each one's schema, and return them with their common format.
    ``files``: ``cfg``'s files already resolved (their Storages, ``io.data.resolve_files``'s),
    read through as they are.

    Raises :class:`engram_ray.io.data.DataError` naming the file (unreadable) or the column and
    the file (missing column), or when the files mix Parquet and JSON without ``cfg.format``.
    """
    found = resolve_files(cfg) if files is None else list(files)
    paths = [location_uri(f) for f in found]
    formats = {file_format(p, cfg) for p in paths}
    if len(formats) > 1:
        raise DataError(f"files mix formats {sorted(formats)}; read them separately or set format")
    _map_files(lambda f: read_schema(f, cfg), found)
    return paths, formats.pop()


# Rows per read task at most: a Parquet file is cut into pieces of whole row groups of about
# this many rows, so a large file streams as several blocks (bounded memory per task, reads in
# parallel) while small files stay one task each. Encoding re-batches by ENCODE_BATCH_ROWS.
PIECE_ROWS = 65_536


@dataclass(frozen=True)
class _Piece:
    """What one read task reads: a file, or some of a Parquet file's row groups."""

    path: str
    row_groups: tuple[int, ...] | None  # None: the whole file
    rows: int | None  # known from a Parquet footer
    nbytes: int | None  # uncompressed, from the footer


def _pieces(path: Location, fmt: str, cfg: DataConfig) -> list[_Piece]:
    """A file as read pieces: JSON whole; Parquet as runs of row groups of ≤ PIECE_ROWS rows
    (a larger row group alone). ``path``: a URI or its Storage (read tasks get the URI)."""
    where, path = path, location_uri(path)
    if fmt != "parquet":
        return [_Piece(path, None, None, None)]
    out: list[_Piece] = []
    run: list[int] = []
    rows = nbytes = 0
    for i, (n, size) in enumerate(parquet_row_groups(where, cfg)):
        if run and rows + n > PIECE_ROWS:
            out.append(_Piece(path, tuple(run), rows, nbytes))
            run, rows, nbytes = [], 0, 0
        run.append(i)
        rows += n
        nbytes += size
    if run:
        out.append(_Piece(path, tuple(run), rows, nbytes))
    return out or [_Piece(path, None, 0, 0)]  # no row group: an empty file, one empty block


def _read_piece(cfg: DataConfig, piece: _Piece) -> list:
    """A read task's body: the piece through the single-process reader (same rows, columns
    and errors as ``--local``)."""
    return [read_table(piece.path, cfg, piece.row_groups)]


class _FilesDatasource(ray.data.Datasource):
    """The config's files as a Ray Data source, one read task per piece.

    Why not ``ray.data.read_parquet`` / ``read_json``: those plan a read by sampling files in
    remote tasks (2-3 s of worker start-up on the driver's critical path, for sizes a footer
    already gives) and read through a second implementation of the formats; this source cuts
    files from their footers alone and reads with :func:`engram_ray.io.data.read_table`, so the
    Ray path reads exactly the rows the single-process path reads.
    """

    def __init__(self, cfg: DataConfig, pieces: list[_Piece]) -> None:
        self.cfg, self.pieces = cfg, pieces

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [p.nbytes for p in self.pieces]
        return None if None in sizes else sum(sizes)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list:
        # One task per piece whatever ``parallelism`` asks: pieces are the unit that keeps
        # Parquet row groups whole; Ray Data splits or coalesces the blocks downstream.
        return [ray.data.ReadTask(
            functools.partial(_read_piece, self.cfg, p),
            BlockMetadata(num_rows=p.rows, size_bytes=p.nbytes, exec_stats=None,
                          input_files=(p.path,)),
            per_task_row_limit=per_task_row_limit)
            for p in self.pieces]


def read_dataset(cfg: DataConfig, *, num_cpus: float | None = None,
                 files: Sequence[Location] | None = None) -> ray.data.Dataset:
    """The raw rows of ``cfg``'s files as a Ray Dataset, holding only the needed columns,
    read by :class:`_FilesDatasource` after every file's schema was checked here (through
    ``files``, their Storages, when given; each read task opens its piece by URI: once per
    task, in its own process)."""
    found = resolve_files(cfg) if files is None else list(files)
    _, fmt = validate_files(cfg, found)
    pieces = [p for ps in _map_files(lambda f: _pieces(f, fmt, cfg), found) for p in ps]
    return ray.data.read_datasource(_FilesDatasource(cfg, pieces), num_cpus=num_cpus)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(tokenizer_dir: str | None):
    # One tokenizer per worker process and directory: Ray reuses task workers across blocks
    # (and across runs of one session), so the load is paid once, not once per block. The
    # worker runs at normal priority from then on: a starved encoder starves the stages.
    normal_priority()
    return tokenizer_from(tokenizer_dir)


@ray.remote
def tokenizer_pad_id(tokenizer_dir: str) -> int:
    """The pad id the single-process path pads with (pad, else EOS, else 0), found where the
    tokenizer is loaded anyway: in a worker that then encodes blocks with it cached. The
    driver and the stage actors never import a tokenizer; this task also starts the first
    encode worker while the stage actors load their slices."""
    return pad_token_id(_cached_tokenizer(tokenizer_dir))


def _encode_block(table, cfg: DataConfig, tokenizer_dir: str | None, drop_empty: bool):
    """``map_batches`` function: encode one block with the (cached) tokenizer."""
    stats: dict[str, int] = {}
    encoded = encode_rows(table, cfg, _cached_tokenizer(tokenizer_dir), drop_empty=drop_empty,
                          stats=stats)
    if stats.get("empty"):
        what = "dropped" if drop_empty else "kept"
        msg = f"{stats['empty']} of {stats['rows']} row(s) have no counted token; {what}"
        warnings.warn(msg, EmptyMaskWarning, stacklevel=2)
    return to_arrow(encoded)


def encoded_dataset(
    cfg: DataConfig,
    tokenizer_dir: str | None = None,
    *,
    drop_empty: bool = True,
    num_cpus: float = 1.0,
    concurrency: int | None = None,
    read_num_cpus: float | None = None,
    files: Sequence[Location] | None = None,
) -> ray.data.Dataset:
    """``read_dataset(cfg)`` encoded by :func:`engram_ray.io.data.encode_rows` in Ray tasks.

    ``tokenizer_dir``: the model's local HF directory, loaded with ``AutoTokenizer`` once per
    worker process (``None`` only for ``features_column``). Tasks rather than an actor pool:
    an actor pool starts fresh processes (torch + transformers imports, seconds each) for every
    dataset, while task workers are reused.
    ``drop_empty=False`` keeps rows with no counted token (``n_tokens == 0``), so a caller can
    count them against :func:`count_rows`. Each encode task reserves ``num_cpus``;
    ``concurrency`` caps how many run at once (None: as many as resources allow). ``files``:
    as :func:`read_dataset`'s.
    """
    if tokenizer_dir is None and cfg.mode != "features":
        raise ValueError(f"tokenizer_dir is needed to encode {cfg.mode!r} rows")
    ds = read_dataset(cfg, num_cpus=read_num_cpus, files=files)
    return ds.map_batches(
        _encode_block,
        fn_args=(cfg, tokenizer_dir, drop_empty),
        # Blocks of a few micro-batches: enough blocks that every replica's split gets rows
        # even for small datasets, and bounded memory per block for long texts.
        batch_size=min(ENCODE_BATCH_ROWS, 4 * cfg.batch_size),
        batch_format="pyarrow",
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
    )
