"""Filesystems for local paths and ``s3://`` URIs, with the S3 endpoint passed explicitly.

Every reader and writer in engram-ray goes through :func:`filesystem` (fsspec) or
:func:`arrow_filesystem` (pyarrow). Why both: Ray Data and ``pyarrow.parquet`` take a pyarrow
filesystem, everything else takes fsspec. Why explicit options: pyarrow ignores
``AWS_ENDPOINT_URL``, so an S3-compatible server (MinIO, moto, Ceph) is only reached when the
endpoint is handed to each filesystem. Options come from the caller's ``storage_options`` first,
then from the standard AWS environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec

__all__ = [
    "StorageOptions",
    "arrow_filesystem",
    "filesystem",
    "is_remote",
    "join",
    "resolve_storage_options",
    "strip_protocol",
]

StorageOptions = Mapping[str, Any]

# Keys accepted in a config's ``storage_options`` (the s3fs spelling); anything else is an error
# so that a typo never silently falls back to the default AWS endpoint.
_S3_KEYS = {"endpoint_url", "key", "secret", "token", "region", "anon"}


def is_remote(uri: str) -> bool:
    """True for ``s3://`` (and ``s3a://``) URIs."""
    return uri.startswith(("s3://", "s3a://"))


def strip_protocol(uri: str) -> str:
    """``s3://bucket/key`` → ``bucket/key``; local paths are made absolute."""
    if is_remote(uri):
        return uri.split("://", 1)[1].rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and ``os.path.join`` for local paths."""
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(uri, *parts)


def resolve_storage_options(options: StorageOptions | None = None) -> dict[str, Any]:
    """Merge explicit S3 options with the AWS environment (explicit wins)."""
    opts = dict(options or {})
    unknown = set(opts) - _S3_KEYS
    if unknown:
        raise ValueError(
            f"unknown storage option(s) {sorted(unknown)}; expected a subset of {sorted(_S3_KEYS)}"
        )
    env = os.environ
    defaults = {
        "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        "key": env.get("AWS_ACCESS_KEY_ID"),
        "secret": env.get("AWS_SECRET_ACCESS_KEY"),
        "token": env.get("AWS_SESSION_TOKEN"),
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    }
    for k, v in defaults.items():
        if opts.get(k) is None and v:
            opts[k] = v
    return {k: v for k, v in opts.items() if v is not None}


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``uri`` (local, or s3fs with the endpoint made explicit)."""
    if not is_remote(uri):
        return fsspec.filesystem("file")
    opts = resolve_storage_options(storage_options)
    kwargs: dict[str, Any] = {}
    if "endpoint_url" in opts:
        kwargs["endpoint_url"] = opts["endpoint_url"]
    if "key" in opts:
        kwargs["key"] = opts["key"]
    if "secret" in opts:
        kwargs["secret"] = opts["secret"]
    if "token" in opts:
        kwargs["token"] = opts["token"]
    if opts.get("anon"):
        kwargs["anon"] = True
    if "region" in opts:
        kwargs["client_kwargs"] = {"region_name": opts["region"]}
    # No listing cache: runs are written and read back within one process, and a stale listing
    # would hide a freshly written commit marker.
    return fsspec.filesystem("s3", use_listings_cache=False, **kwargs)


def arrow_filesystem(uri: str, storage_options: StorageOptions | None = None):
    """The pyarrow filesystem for ``uri`` (``None`` for local paths, Arrow's default)."""
    if not is_remote(uri):
        return None
    from pyarrow import fs as pafs

    opts = resolve_storage_options(storage_options)
    kwargs: dict[str, Any] = {}
    endpoint = opts.get("endpoint_url")
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest or scheme
        kwargs["scheme"] = scheme if rest else "https"
    if "key" in opts:
        kwargs["access_key"] = opts["key"]
    if "secret" in opts:
        kwargs["secret_key"] = opts["secret"]
    if "token" in opts:
        kwargs["session_token"] = opts["token"]
    if opts.get("anon"):
        kwargs["anonymous"] = True
    # pyarrow otherwise probes the EC2 metadata service for a region, which hangs off-cloud.
    kwargs["region"] = opts.get("region", "us-east-1")
    return pafs.S3FileSystem(**kwargs)
