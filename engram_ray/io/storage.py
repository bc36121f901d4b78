"""Storage locations: local paths and ``s3://`` URIs, with the S3 options resolved once.

Every reader and writer in engram-ray goes through a :class:`Storage`: one location (a run, a
checkpoint, a data file) with its fsspec filesystem (``fs``), its pyarrow filesystem
(``arrow``) and the path the filesystems use for it (``root``: ``bucket/key`` for S3, an
absolute path locally). Why both filesystems: Ray Data and ``pyarrow.parquet`` take a pyarrow
filesystem, everything else takes fsspec. Why one object: the ``storage_options`` are checked
and resolved once, and "the fsspec path of this URI" is written in one place.

Options are the keywords of ``s3fs.S3FileSystem`` (``key``, ``secret``, ``profile``,
``requester_pays``, ``client_kwargs``, ``config_kwargs``, …) plus two conveniences:
``endpoint_url`` and ``region`` (→ ``client_kwargs.region_name``). An unknown key is an error
naming it, so that a typo never silently falls back to the default AWS endpoint. The endpoint
and the region also come from the standard AWS environment variables when not given, because
pyarrow ignores ``AWS_ENDPOINT_URL``; credentials are left to botocore's (and Arrow's) own
credential chain (environment, profiles, instance roles).

The module-level functions (:func:`filesystem`, :func:`arrow_filesystem`, …) are thin wrappers
kept for callers that want one filesystem rather than a location.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any

import fsspec

__all__ = [
    "Storage",
    "StorageOptions",
    "arrow_filesystem",
    "filesystem",
    "is_remote",
    "join",
    "resolve_storage_options",
    "s3_option_names",
    "strip_protocol",
]

StorageOptions = Mapping[str, Any]

# Keywords s3fs takes through ``**kwargs`` (documented there, not in its signature): ``profile``
# goes to the botocore session, the others to fsspec's filesystem base class.
_S3_KWARGS = frozenset({"profile", "skip_instance_cache", "listings_expiry_time", "max_paths"})
# Signature keywords that would make the filesystem unusable from synchronous code, and the
# listing cache, which stays off: a stale listing would hide a freshly written commit marker.
_S3_REFUSED = frozenset({"self", "asynchronous", "loop", "use_listings_cache"})
# Our conveniences (endpoint_url is also s3fs's own).
_CONVENIENCES = frozenset({"endpoint_url", "region"})


@functools.lru_cache(maxsize=1)
def s3_option_names() -> frozenset[str]:
    """The keys accepted in ``storage_options``: s3fs's keywords plus ours."""
    import s3fs

    params = inspect.signature(s3fs.S3FileSystem.__init__).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset((named | _S3_KWARGS | _CONVENIENCES) - _S3_REFUSED)


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


def _env_default(opts: dict[str, Any], key: str, nested: str, *names: str) -> None:
    """Fill ``opts[key]`` from the first set environment variable of ``names``, unless the
    option is given, directly or as ``client_kwargs[nested]``."""
    if opts.get(key) is not None or (opts.get("client_kwargs") or {}).get(nested) is not None:
        return
    value = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if value:
        opts[key] = value


def resolve_storage_options(options: StorageOptions | None = None) -> dict[str, Any]:
    """Check ``options`` against :func:`s3_option_names` and fill the endpoint and the region
    from the AWS environment (explicit wins); ``None`` values are dropped. Credentials are not
    read here: botocore and Arrow find them in the environment themselves."""
    opts = dict(options or {})
    accepted = s3_option_names()
    unknown = set(opts) - accepted
    if unknown:
        raise ValueError(f"unknown storage option(s) {sorted(unknown)}; accepted: {sorted(accepted)}")
    _env_default(opts, "endpoint_url", "endpoint_url", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    _env_default(opts, "region", "region_name", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {k: v for k, v in opts.items() if v is not None}


def _s3fs_kwargs(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved options as ``s3fs.S3FileSystem`` keywords: ``region`` joins ``client_kwargs``."""
    kwargs = {k: v for k, v in opts.items() if k != "region"}
    if "region" in opts:
        client = dict(opts.get("client_kwargs") or {})
        given = client.setdefault("region_name", opts["region"])
        if given != opts["region"]:
            raise ValueError(f"storage options name two regions: region={opts['region']!r}, "
                             f"client_kwargs.region_name={given!r}")
        kwargs["client_kwargs"] = client
    return kwargs


def _arrow_kwargs(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved options as ``pyarrow.fs.S3FileSystem`` keywords (what maps; a ``profile`` does
    not: Arrow then uses its default credential chain)."""
    client = opts.get("client_kwargs") or {}
    kwargs: dict[str, Any] = {}
    endpoint = opts.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest or scheme
        kwargs["scheme"] = scheme if rest else "https"
    for ours, alias, arrows in (("key", "username", "access_key"),
                                ("secret", "password", "secret_key"),
                                ("token", None, "session_token")):
        value = opts.get(ours) or opts.get(alias)
        if value:
            kwargs[arrows] = value
    if opts.get("anon"):
        kwargs["anonymous"] = True
    # pyarrow otherwise probes the EC2 metadata service for a region, which hangs off-cloud.
    kwargs["region"] = opts.get("region") or client.get("region_name") or "us-east-1"
    return kwargs


class Storage:
    """One location (a local path or an ``s3://`` URI) and the filesystems that reach it.

    ``uri``: as given (no trailing ``/``); ``root``: the path ``fs`` uses for it; ``fs``: the
    fsspec filesystem; ``arrow``: the pyarrow filesystem (``None`` locally: Arrow's default).
    Relative paths ``rel`` of the helpers are ``/``-separated, below ``root``. Options are
    checked and resolved for remote locations only (a local path ignores them). Pickles as
    ``(uri, options)``: the other side builds its own filesystems.
    """

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.uri = uri.rstrip("/") or uri
        self.options = options
        self.remote = is_remote(self.uri)
        self.root = strip_protocol(self.uri)
        self._resolved = resolve_storage_options(options) if self.remote else {}
        if self.remote:
            # No listing cache: runs are written and read back within one process, and a
            # stale listing would hide a freshly written commit marker.
            self.fs = fsspec.filesystem("s3", use_listings_cache=False,
                                        **_s3fs_kwargs(self._resolved))
        else:
            self.fs = fsspec.filesystem("file")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self):
        return (Storage, (self.uri, self.options))

    @functools.cached_property
    def arrow(self):
        """The pyarrow filesystem (``None`` for local paths), built on first use."""
        if not self.remote:
            return None
        from pyarrow import fs as pafs

        return pafs.S3FileSystem(**_arrow_kwargs(self._resolved))

    def path(self, *parts: str) -> str:
        """The fs path of ``parts`` below the root (the root itself without parts)."""
        return join(self.root, *parts) if parts else self.root

    def uri_of(self, *parts: str) -> str:
        """The URI of ``parts`` below this location (for messages and for other processes)."""
        parts = tuple(p for p in parts if p)
        return join(self.uri, *parts) if parts else self.uri

    def child(self, *parts: str) -> Storage:
        """The location ``parts`` below this one, sharing its filesystems."""
        child = object.__new__(Storage)
        child.__dict__.update(self.__dict__)
        child.uri = join(self.uri, *parts)
        child.root = join(self.root, *parts)
        return child

    def to_uri(self, fs_path: str) -> str:
        """A path this location's fs returned (a listing) as a URI: the scheme put back."""
        if self.remote and "://" not in fs_path:
            return self.uri.split("://", 1)[0] + "://" + fs_path
        return fs_path

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._at(rel))

    def open(self, rel: str = "", mode: str = "rb", **kwargs):
        return self.fs.open(self._at(rel), mode, **kwargs)

    def read_bytes(self, rel: str = "") -> bytes:
        """The whole object; a missing one raises FileNotFoundError naming its URI."""
        try:
            with self.open(rel, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri_of(rel)} does not exist") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open(rel, "wb") as f:
            f.write(data)

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self._at(rel), exist_ok=True)

    def rm(self, rel: str = "", recursive: bool = True) -> None:
        self.fs.rm(self._at(rel), recursive=recursive)

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly below ``rel``."""
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._at(rel), detail=False)]

    def _at(self, rel: str) -> str:
        return self.path(rel) if rel else self.root


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``uri`` (local, or s3fs with the endpoint made explicit)."""
    return Storage(uri, storage_options).fs


def arrow_filesystem(uri: str, storage_options: StorageOptions | None = None):
    """The pyarrow filesystem for ``uri`` (``None`` for local paths, Arrow's default)."""
    return Storage(uri, storage_options).arrow
