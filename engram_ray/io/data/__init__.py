"""Data ingestion shared by the single-process path and Ray Data: read, encode, collate.

Two parts: :mod:`~engram_ray.io.data.files` finds the data files a config names and reads them
(formats, schema checks, row counts); :mod:`~engram_ray.io.data.encode` turns rows into tokens
and token masks and batches them. The distributed reader
(:mod:`engram_ray.distributed.ingest`) uses the same discovery, checks and reader, then runs
the same :func:`encode_rows` in Ray tasks, so both paths read the same rows and count exactly
the same tokens. This package
never imports ``ray``. :class:`~engram_ray.config.DataConfig` (the ``data:`` section of a
config) is re-exported here for the callers that build one next to the reader.
"""

from engram_ray.config import DataConfig
from engram_ray.io.data.encode import (
    ENCODED_COLUMNS,
    EmptyMaskWarning,
    collate,
    encode_rows,
    iter_batches,
    pad_token_id,
    to_arrow,
    tokenizer_from,
)
from engram_ray.io.data.files import (
    DataError,
    check_concepts,
    count_file_rows,
    count_rows,
    file_format,
    parquet_row_groups,
    read_schema,
    read_table,
    resolve_files,
    resolve_paths,
)

__all__ = [
    "ENCODED_COLUMNS",
    "DataConfig",
    "DataError",
    "EmptyMaskWarning",
    "check_concepts",
    "collate",
    "count_file_rows",
    "count_rows",
    "encode_rows",
    "file_format",
    "iter_batches",
    "pad_token_id",
    "parquet_row_groups",
    "read_schema",
    "read_table",
    "resolve_files",
    "resolve_paths",
    "to_arrow",
    "tokenizer_from",
]
