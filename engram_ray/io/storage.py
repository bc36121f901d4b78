"""Storage locations: local paths and any fsspec scheme, with the options resolved once.

Every reader and writer in engram-ray goes through a :class:`Storage`: one location (a run, a
checkpoint, a data file) with its fsspec filesystem (``fs``), its pyarrow filesystem
(``arrow``) and the path the filesystems use for it (``root``: ``bucket/key`` for object
stores, an absolute path locally). Why both filesystems: Ray Data and ``pyarrow.parquet`` take
a pyarrow filesystem, everything else takes fsspec. Why one object: the ``storage_options``
are checked and resolved once, and "the fsspec path of this URI" is written in one place.

Schemes (:mod:`engram_ray.uris`): local paths and ``file://``, ``s3://``, and every scheme an
installed fsspec implementation serves (``gs://`` gcsfs, ``az://``/``abfs://`` adlfs,
``hf://``, ``memory://``…). A scheme whose implementation is missing is refused when the
``Storage`` is built, naming the package to install; nothing ever falls back to a local folder
named after a scheme. Which schemes can hold a lease (an exclusive create) is
:data:`engram_ray.uris.EXCLUSIVE_CREATE`.

Options for S3 are the keywords of ``s3fs.S3FileSystem`` (``key``, ``secret``, ``profile``,
``requester_pays``, ``client_kwargs``, ``config_kwargs``, …) plus two conveniences:
``endpoint_url`` and ``region`` (→ ``client_kwargs.region_name``); for another scheme, its
filesystem's keywords (S3's are accepted and not passed on: one set of options may serve
several locations). An unknown key is an error naming it, so that a typo never silently falls
back to the default AWS endpoint. The S3 endpoint and region also come from the standard AWS
environment variables when not given, because pyarrow ignores ``AWS_ENDPOINT_URL``;
credentials are left to each client's own credential chain.

Secrets (:mod:`engram_ray.redaction`). Credential-like options (``key``, ``secret``,
``token``, ``password``, any nested key naming a secret, token, password, credential or
access/account/customer key, URL passwords such as a proxy's ``http://user:pass@host``) are
never echoed: :func:`redact` is the one function every writer of options (``run.json``, config
dumps) goes through, every error message passes :func:`redact_text`, and a value that is the
redaction placeholder ``"***"`` itself (a config copied from a ``run.json``) is refused by
name. Errors about options name the key and the type, never the value.

Faults. Transient S3 errors are retried by botocore in ``standard`` mode (throttling, 5xx,
connection errors) with its bounded, jittered exponential backoff: ``S3_MAX_ATTEMPTS`` attempts
and a ``S3_CONNECT_TIMEOUT_S`` connect timeout by default. A given ``config_kwargs`` replaces
that default whole (it is botocore's ``Config``; without ``retries`` botocore's own legacy mode
still retries 5xx four times), and its ``retries.max_attempts`` also goes to Arrow's client;
s3fs's own ``retries`` stays on top for errors botocore cannot retry (a body cut mid-read). What
still fails is raised as one :class:`StorageError` (an ``OSError``) whose one-line message names
the location, the operation and the original error, which stays chained as ``__cause__``; a
missing bucket or refused credentials say so in words.

One ``Storage`` per location per operation. Building one checks and resolves the options and
builds new filesystems (for S3 a new client, a credential lookup, new connections), so an
operation (a command, a public entry point) builds each location's ``Storage`` once at its
entry and passes the object down; a location below it is :meth:`Storage.child` (or
:meth:`Storage.at`, a path its listing returned), the one above :meth:`Storage.parent`, all
sharing its filesystems. Functions that take a location accept a
:data:`Location` (a URI string or a ``Storage``) and go through :func:`as_storage`, which
returns a given ``Storage`` unchanged. A ``Storage`` sent to another process (a Ray task)
pickles as ``(uri, options)`` and is rebuilt there: once per process.

The module-level functions (:func:`filesystem`, :func:`arrow_filesystem`, …) are thin wrappers
kept for callers that want one filesystem rather than a location.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec

from engram_ray.hub import cached_snapshot
from engram_ray.redaction import REDACTED, is_secret_key, one_line, redact, redact_text
from engram_ray.uris import (
    StorageOptions,
    UnsupportedScheme,
    backend_option_names,
    check_scheme,
    is_remote,
    join,
    normalize,
    resolve_storage_options,
    s3_option_names,
    scheme_of,
    strip_protocol,
)

__all__ = [
    "Location",
    "REDACTED",
    "S3_CONNECT_TIMEOUT_S",
    "S3_MAX_ATTEMPTS",
    "Storage",
    "StorageError",
    "StorageOptions",
    "UnsupportedScheme",
    "arrow_filesystem",
    "as_storage",
    "filesystem",
    "is_remote",
    "is_secret_key",
    "join",
    "location_uri",
    "one_line",
    "redact",
    "redact_text",
    "resolve_storage_options",
    "s3_option_names",
    "scheme_of",
    "strip_protocol",
]

# Botocore attempts per request (first try included) unless ``config_kwargs.retries`` says.
S3_MAX_ATTEMPTS = 6
S3_CONNECT_TIMEOUT_S = 10  # botocore's 60 s, times every attempt, hides a dead endpoint
_S3 = frozenset({"s3", "s3a"})


class StorageError(OSError):
    """A storage operation failed after retries; the message is one line naming the location,
    the operation and the original error (kept as ``__cause__``)."""


# What Storage.errors lets through unchanged: outcomes callers decide on, and our own errors.
_PASS_THROUGH = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                 NotADirectoryError, StorageError, ValueError, TypeError, KeyError)
# Client errors that mean the bucket is missing or the credentials are refused, by the codes
# S3 (and moto, MinIO) answer with: said in words, with the location.
_NO_BUCKET = ("NoSuchBucket", "specified bucket does not exist")
_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
           "InvalidToken", "Forbidden", "AuthorizationFailure", "AuthenticationFailed")


def _max_attempts(opts: Mapping[str, Any]) -> int:
    retries = (opts.get("config_kwargs") or {}).get("retries") or {}
    return int(retries.get("max_attempts", retries.get("total_max_attempts", S3_MAX_ATTEMPTS)))


def _s3fs_kwargs(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved options as ``s3fs.S3FileSystem`` keywords: ``region`` joins ``client_kwargs``;
    botocore's standard retry mode is the default ``config_kwargs`` (a given one wins whole)."""
    kwargs = {k: v for k, v in opts.items() if k != "region"}
    if opts.get("config_kwargs") is None:  # given: the user's, whole (botocore's defaults)
        kwargs["config_kwargs"] = {"retries": {"max_attempts": S3_MAX_ATTEMPTS,
                                               "mode": "standard"},
                                   "connect_timeout": S3_CONNECT_TIMEOUT_S}
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
    from pyarrow import fs as pafs

    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=_max_attempts(opts))
    return kwargs


class Storage:
    """One location (a local path or a URL of any accepted scheme) and the filesystems that
    reach it.

    ``uri``: as given (no trailing ``/``; a ``file://`` URL as its local path); ``scheme``:
    ``"file"``, ``"s3"``, ``"gs"``…; ``remote``: not a local path; ``root``: the path ``fs``
    uses for it; ``fs``: the fsspec filesystem; ``arrow``: the pyarrow filesystem (``None``
    locally: Arrow's default). Relative paths ``rel`` of the helpers are ``/``-separated, below
    ``root``. Options are checked and resolved for remote locations only (a local path ignores
    them). Pickles as ``(uri, options)``: the other side builds its own filesystems.
    """

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        uri = normalize(uri)
        self.uri = uri.rstrip("/") or uri
        self.options = options
        self.scheme = check_scheme(self.uri)
        self.remote = self.scheme != "file"
        self._resolved = resolve_storage_options(options, self.scheme) if self.remote else {}
        self.fs = _build_filesystem(self.scheme, self._resolved)
        # The path as this filesystem spells it (memory:// roots at "/", s3 at the bucket), so
        # that the paths its listings return start with ``root``.
        self.root = (type(self.fs)._strip_protocol(self.uri).rstrip("/") or "/") \
            if self.remote else strip_protocol(self.uri)

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

        if self.scheme in _S3:
            return pafs.S3FileSystem(**_arrow_kwargs(self._resolved))
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def path(self, *parts: str) -> str:
        """The fs path of ``parts`` below the root (the root itself without parts)."""
        return join(self.root, *parts) if parts else self.root

    def uri_of(self, *parts: str) -> str:
        """The URI of ``parts`` below this location (for messages and for other processes)."""
        parts = tuple(p for p in parts if p)
        return join(self.uri, *parts) if parts else self.uri

    def parent(self) -> Storage:
        """The location directly above this one (a run's store), sharing its filesystems. A
        local path's parent is absolute, as :func:`engram_ray.io.store.split_run_uri` says."""
        if self.remote and "/" not in self.uri.split("://", 1)[1]:
            raise ValueError(f"{self.uri} names a bucket: it has no parent location")
        parent = object.__new__(Storage)
        parent.__dict__.update(self.__dict__)
        parent.root = self.root.rsplit("/", 1)[0] if self.remote else os.path.dirname(self.root)
        parent.uri = self.uri.rsplit("/", 1)[0] if self.remote else parent.root
        return parent

    def at(self, fs_path: str) -> Storage:
        """The location at ``fs_path`` (a path this location's fs returned: a listing's, a
        glob's), sharing its filesystems: a data file found below a configured folder."""
        other = object.__new__(Storage)
        other.__dict__.update(self.__dict__)
        other.root = fs_path.rstrip("/") or fs_path
        other.uri = self.to_uri(other.root)
        return other

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
            # memory:// spells its paths from "/": memory://a/b, not memory:///a/b
            path = fs_path.lstrip("/") if self.scheme == "memory" else fs_path
            return self.uri.split("://", 1)[0] + "://" + path
        return fs_path

    @contextlib.contextmanager
    def errors(self, op: str, rel: str = "", keep: tuple = ()) -> Iterator[None]:
        """Re-raise what a storage call raises as a one-line :class:`StorageError` naming the
        operation and the URI; the errors a caller decides on (missing, existing, refused,
        bad argument, and ``keep``) pass through as their own type, a remote missing bucket
        or refused credentials reworded to name the URI and the cause (s3fs's messages name
        neither)."""
        try:
            yield
        except (FileNotFoundError, PermissionError) as e:
            said = _diagnosis(e) if self.remote else ""
            if not said or isinstance(e, tuple(keep)) or self.uri_of(rel) in str(e):
                raise
            raise type(e)(f"{op} {self.uri_of(rel)} failed: {said}{one_line(e)}") from e
        except _PASS_THROUGH + tuple(keep):
            raise
        except Exception as e:  # botocore, aiohttp, s3fs's OSErrors: whatever the client raises
            raise StorageError(f"{op} {self.uri_of(rel)} failed: {_diagnosis(e)}"
                               f"{one_line(e)}") from e

    def exists(self, rel: str = "") -> bool:
        """True when the object or prefix is there; a Hub model (``hf://org/name@rev``) also
        when the Hugging Face cache holds it (offline, the Hub itself cannot be asked)."""
        if self.scheme == "hf" and not rel and cached_snapshot(self.uri) is not None:
            return True
        with self.errors("checking", rel):
            return self.fs.exists(self._at(rel))

    def open(self, rel: str = "", mode: str = "rb", **kwargs):
        with self.errors("opening", rel):
            return self.fs.open(self._at(rel), mode, **kwargs)

    def read_bytes(self, rel: str = "") -> bytes:
        """The whole object; a missing one raises FileNotFoundError naming its URI.

        One GET (``cat_file``), not a buffered file: s3fs's reader HEADs the object, then reads
        it with ``If-Match`` on that ETag, so an object replaced in between (a lease renewed
        by its heartbeat every 15 s while its holder reads it) failed with PreconditionFailed;
        a single GET returns one whole version, old or new."""
        try:
            with self.errors("reading", rel):
                return self.fs.cat_file(self._at(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri_of(rel)} does not exist") from None

    def read_json(self, rel: str = "") -> Any:
        """The object parsed as JSON; invalid JSON raises ValueError naming its URI."""
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as e:
            raise ValueError(f"{self.uri_of(rel)} is not valid JSON ({e}): the file is "
                             "truncated or was edited") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.errors("writing", rel), self.open(rel, "wb") as f:
            f.write(data)

    def makedirs(self, rel: str = "") -> None:
        with self.errors("creating", rel):
            self.fs.makedirs(self._at(rel), exist_ok=True)

    def rm(self, rel: str = "", recursive: bool = True) -> None:
        with self.errors("removing", rel):
            self.fs.rm(self._at(rel), recursive=recursive)

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly below ``rel``."""
        with self.errors("listing", rel):
            paths = self.fs.ls(self._at(rel), detail=False)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]

    def _at(self, rel: str) -> str:
        return self.path(rel) if rel else self.root


Location = str | Storage
"""Where something is: a URI (built into a :class:`Storage` with the options given beside it)
or a ``Storage`` already built (used as is)."""


def as_storage(location: Location, options: StorageOptions | None = None) -> Storage:
    """The :class:`Storage` of ``location``: a given ``Storage`` unchanged (no filesystems
    rebuilt, no options resolved again), a URI built once with ``options``.

    A ``Storage`` given with other ``options`` than its own is refused: which set reaches the
    location would otherwise depend on the caller, and options are never silently dropped."""
    if isinstance(location, Storage):
        if options is not None and (options or None) != (location.options or None):
            raise ValueError(f"{location.uri}: storage options given beside a Storage built "
                             "with other options; pass the URI, or the Storage alone")
        return location
    if not isinstance(location, str):
        raise TypeError(f"a location is a URI string or a Storage, not "
                        f"{type(location).__name__}")
    return Storage(location, options)


def location_uri(location: Location) -> str:
    """A location's URI as given: the string itself, or a ``Storage``'s ``uri`` (so a name
    reported to users is the one they passed, whichever form the location came in)."""
    return location.uri if isinstance(location, Storage) else location


def _build_filesystem(scheme: str, opts: Mapping[str, Any]) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of a scheme with resolved options: s3fs with the endpoint made
    explicit and botocore's standard retries; another backend with the options it takes."""
    if scheme == "file":
        return fsspec.filesystem("file")
    if scheme in _S3:
        # No listing cache: runs are written and read back within one process, and a stale
        # listing would hide a freshly written commit marker.
        return fsspec.filesystem("s3", use_listings_cache=False, **_s3fs_kwargs(opts))
    taken = backend_option_names(scheme)
    return fsspec.filesystem(scheme, use_listings_cache=False,
                             **{k: v for k, v in opts.items() if k in taken})


def _diagnosis(e: BaseException) -> str:
    """Words for the client errors a user can fix: a missing bucket, refused credentials."""
    text = f"{type(e).__name__} {e} {getattr(e, '__cause__', '') or ''}"
    if any(code in text for code in _NO_BUCKET):
        return "the bucket does not exist: "
    if isinstance(e, PermissionError) or any(code in text for code in _DENIED):
        return "access denied (check the credentials and their permissions): "
    return ""


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``uri`` (local, or s3fs with the endpoint made explicit)."""
    return Storage(uri, storage_options).fs


def arrow_filesystem(uri: str, storage_options: StorageOptions | None = None):
    """The pyarrow filesystem for ``uri`` (``None`` for local paths, Arrow's default)."""
    return Storage(uri, storage_options).arrow
