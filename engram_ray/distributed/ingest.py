"""Ray Data ingestion: the same rows and the same encoding as the single-process reader.

:func:`read_dataset` reads the files :func:`engram_ray.io.data.resolve_paths` finds with
``ray.data.read_parquet`` / ``ray.data.read_json``, after checking every file's schema on the
driver so a missing column or an unreadable file fails up front with an error naming it,
instead of deep inside a read task. :func:`encoded_dataset` then runs
:func:`engram_ray.io.data.encode_rows` in ``map_batches`` with a callable class, so each worker
loads the tokenizer once from the model's local directory.

S3: Ray workers never see environment changes made after ``ray.init``, and pyarrow ignores
``AWS_ENDPOINT_URL`` anyway, so the endpoint and credentials travel inside ``cfg``
(``storage_options``) and become an explicit ``pyarrow.fs.S3FileSystem``
(``Storage.arrow``, :class:`engram_ray.io.storage.Storage`), which is pickled into the read
tasks.

The encoded dataset holds the columns of :func:`engram_ray.io.data.encode_rows` as plain Arrow
lists (see :func:`engram_ray.io.data.to_arrow`); :func:`engram_ray.io.data.collate` turns any batch
of them (numpy, pyarrow or a list of rows) into a :class:`engram_ray.core.batch.Batch`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import ray

from engram_ray.distributed.cluster import normal_priority
from engram_ray.io.data import (
    DataConfig,
    DataError,
    EmptyMaskWarning,
    count_rows,
    encode_rows,
    file_format,
    pad_token_id,
    read_schema,
    resolve_paths,
    to_arrow,
    tokenizer_from,
)
from engram_ray.io.storage import Storage

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


def validate_files(cfg: DataConfig) -> tuple[list[str], str]:
    """Resolve the files, check each one's schema, and return them with their common format.

    Raises :class:`engram_ray.io.data.DataError` naming the file (unreadable) or the column and
    the file (missing column), or when the files mix Parquet and JSON without ``cfg.format``.
    """
    paths = resolve_paths(cfg)
    formats = {file_format(p, cfg) for p in paths}
    if len(formats) > 1:
        raise DataError(f"files mix formats {sorted(formats)}; read them separately or set format")
    _map_files(lambda p: read_schema(p, cfg), paths)
    return paths, formats.pop()


def _ray_paths(paths: list[str], storage_options=None) -> list[str]:
    """Paths as Ray expects them with an explicit filesystem: ``bucket/key`` for S3."""
    return [Storage(p, storage_options).root for p in paths]


# Read-planning settings for ``read_parquet`` (set while the plan is built, then restored):
# - use_datasource_v2: the V2 Parquet datasource (the default since Ray 2.5x) starts a pool of
#   footer-reader actors (32 by default) for every read: seconds of process start-up per read
#   on a small cluster, for footers validate_files has just read;
# - decoding_size_estimation: V1 samples files with remote tasks (SPREAD over the nodes) to
#   estimate the in-memory size; the default ratio is fine for a few text columns.
_PARQUET_READ_CONTEXT = {"use_datasource_v2": False, "decoding_size_estimation": False}


@contextmanager
def _data_context(**overrides: Any) -> Iterator[None]:
    """Set DataContext attributes (those this Ray version has) for the ``with`` body only."""
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in overrides if hasattr(ctx, k)}
    for k in saved:
        setattr(ctx, k, overrides[k])
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def read_dataset(
    cfg: DataConfig, *, num_cpus: float | None = None, parquet_v2: bool = False
) -> ray.data.Dataset:
    """The raw rows of ``cfg``'s files as a Ray Dataset, holding only the needed columns.

    Parquet is read with Ray Data's V1 datasource and no size sampling (see
    ``_PARQUET_READ_CONTEXT``); ``parquet_v2=True`` keeps the caller's DataContext as is (the V2
    datasource's footer-reader actors pay off for many thousands of files).
    """
    return _read(cfg, num_cpus=num_cpus, parquet_v2=parquet_v2, project=True)


def _read(
    cfg: DataConfig, *, num_cpus: float | None, parquet_v2: bool, project: bool
) -> ray.data.Dataset:
    paths, fmt = validate_files(cfg)
    fs = Storage(paths[0], cfg.storage_options).arrow
    kwargs: dict[str, Any] = {"filesystem": fs, "num_cpus": num_cpus, "file_extensions": None}
    columns = cfg.needed_columns()
    ray_paths = _ray_paths(paths, cfg.storage_options)
    if fmt == "parquet":
        if parquet_v2:
            return ray.data.read_parquet(ray_paths, columns=columns, **kwargs)
        with _data_context(**_PARQUET_READ_CONTEXT):
            return ray.data.read_parquet(ray_paths, columns=columns, **kwargs)
    # lines=True would switch to the pandas reader, which ignores `filesystem`; the default
    # Arrow reader handles JSON lines (and falls back to json.load for a top-level array).
    ds = ray.data.read_json(ray_paths, **kwargs)
    # The JSON reader reads every column; projecting is a separate task per block, which the
    # encoder makes unnecessary (encode_rows only looks at the columns it needs).
    return ds.select_columns(columns) if project else ds


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
    parquet_v2: bool = False,
) -> ray.data.Dataset:
    """``read_dataset(cfg)`` encoded by :func:`engram_ray.io.data.encode_rows` in Ray tasks.

    ``tokenizer_dir``: the model's local HF directory, loaded with ``AutoTokenizer`` once per
    worker process (``None`` only for ``features_column``). Tasks rather than an actor pool:
    an actor pool starts fresh processes (torch + transformers imports, seconds each) for every
    dataset, while task workers are reused.
    ``drop_empty=False`` keeps rows with no counted token (``n_tokens == 0``), so a caller can
    count them against :func:`count_rows`. Each encode task reserves ``num_cpus``;
    ``concurrency`` caps how many run at once (None: as many as resources allow).
    """
    if tokenizer_dir is None and cfg.mode != "features":
        raise ValueError(f"tokenizer_dir is needed to encode {cfg.mode!r} rows")
    ds = _read(cfg, num_cpus=read_num_cpus, parquet_v2=parquet_v2, project=False)
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
