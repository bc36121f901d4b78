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

Secrets. Credential-like options (``key``, ``secret``, ``token``, ``password``, the ``aws_*``
spellings, and any nested key naming a secret, token, password, credential or access/customer
key, e.g. ``client_kwargs.aws_secret_access_key``, ``s3_additional_kwargs.SSECustomerKey``) are
never echoed: :func:`redact` is the one function every writer of options (``run.json``, config
dumps, error messages) goes through, and a value that is the redaction placeholder ``"***"``
itself (a config copied from a ``run.json``) is refused by name. Errors about options name the
key and the type, never the value.

Faults. Transient S3 errors are retried by botocore in ``standard`` mode (throttling, 5xx,
connection errors) with its bounded, jittered exponential backoff: ``S3_MAX_ATTEMPTS`` attempts
and a ``S3_CONNECT_TIMEOUT_S`` connect timeout by default. A given ``config_kwargs`` replaces that default whole (it is botocore's ``Config``;
without ``retries`` botocore's own legacy mode still retries 5xx four times), and its
``retries.max_attempts`` also goes to Arrow's client;
s3fs's own ``retries`` stays on top for errors botocore cannot retry (a body cut mid-read). What
still fails is raised as one :class:`StorageError` (an ``OSError``) whose one-line message names
the location, the operation and the original error, which stays chained as ``__cause__``.

The module-level functions (:func:`filesystem`, :func:`arrow_filesystem`, …) are thin wrappers
kept for callers that want one filesystem rather than a location.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec

__all__ = [
    "REDACTED",
    "S3_CONNECT_TIMEOUT_S",
    "S3_MAX_ATTEMPTS",
    "Storage",
    "StorageError",
    "StorageOptions",
    "arrow_filesystem",
    "filesystem",
    "is_remote",
    "is_secret_key",
    "join",
    "one_line",
    "redact",
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
# Options that must be mappings, and options that must be strings (checked by type only).
_MAPPINGS = frozenset({"client_kwargs", "config_kwargs", "s3_additional_kwargs"})
_STRINGS = frozenset({"endpoint_url", "region", "profile", "key", "secret", "token",
                      "username", "password"})

REDACTED = "***"
# Botocore attempts per request (first try included) unless ``config_kwargs.retries`` says.
S3_MAX_ATTEMPTS = 6
S3_CONNECT_TIMEOUT_S = 10  # botocore's 60 s, times every attempt, hides a dead endpoint
# A key is credential-like when its name (lower case, letters and digits only) is one of these
# or contains one of the words.
_SECRET_NAMES = frozenset({"key", "username", "user", "auth", "authorization"})
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "accesskey",
                 "customerkey", "privatekey", "apikey", "signature")


class StorageError(OSError):
    """A storage operation failed after retries; the message is one line naming the location,
    the operation and the original error (kept as ``__cause__``)."""


# What Storage.errors lets through unchanged: outcomes callers decide on, and our own errors.
_PASS_THROUGH = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                 NotADirectoryError, StorageError, ValueError, TypeError, KeyError)


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception (for one-line error reports)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def is_secret_key(name: object) -> bool:
    """True for an option name that holds a credential (see the module docstring)."""
    flat = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return flat in _SECRET_NAMES or any(w in flat for w in _SECRET_WORDS)


def redact(options: Any) -> Any:
    """``options`` with every credential-like value replaced by ``"***"``, at any depth (a copy;
    ``None`` stays ``None``). A value that is not a mapping where options were expected is
    replaced whole: a mistyped ``storage_options`` may be a pasted secret."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        return REDACTED
    return {k: (REDACTED if is_secret_key(k) and v is not None
                else redact(v) if isinstance(v, Mapping) else v)
            for k, v in options.items()}


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
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"storage options must be a mapping of option names to values, got a "
                         f"{type(options).__name__}")
    opts = dict(options or {})
    accepted = s3_option_names()
    unknown = set(opts) - accepted
    if unknown:
        raise ValueError(f"unknown storage option(s) {sorted(map(str, unknown))}; accepted: "
                         f"{sorted(accepted)}")
    _check_types(opts)
    _env_default(opts, "endpoint_url", "endpoint_url", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    _env_default(opts, "region", "region_name", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {k: v for k, v in opts.items() if v is not None}


def _check_types(opts: Mapping[str, Any], prefix: str = "") -> None:
    """Type checks that name the key and the type, never the value; the redaction placeholder
    is refused where a credential is expected."""
    for k, v in opts.items():
        name = f"{prefix}{k}"
        if v is None:
            continue
        if is_secret_key(k) and v == REDACTED:
            raise ValueError(f"storage option {name!r} is the redaction placeholder "
                             f"{REDACTED!r} (a config copied from a run.json?): give the real "
                             "credential, or leave it to the AWS environment")
        if not prefix and k in _MAPPINGS and not isinstance(v, Mapping):
            raise ValueError(f"storage option {name!r} must be a mapping, got a "
                             f"{type(v).__name__}")
        if not prefix and k in _STRINGS and not isinstance(v, str):
            raise ValueError(f"storage option {name!r} must be a string, got a "
                             f"{type(v).__name__}")
        if isinstance(v, Mapping):
            _check_types(v, f"{name}.")


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

    @contextlib.contextmanager
    def errors(self, op: str, rel: str = "", keep: tuple = ()) -> Iterator[None]:
        """Re-raise what a storage call raises as a one-line :class:`StorageError` naming the
        operation and the URI; the errors a caller decides on (missing, existing, refused,
        bad argument, and ``keep``) pass through unchanged."""
        try:
            yield
        except _PASS_THROUGH + tuple(keep):
            raise
        except Exception as e:  # botocore, aiohttp, s3fs's OSErrors: whatever the client raises
            raise StorageError(f"{op} {self.uri_of(rel)} failed: {one_line(e)}") from e

    def exists(self, rel: str = "") -> bool:
        with self.errors("checking", rel):
            return self.fs.exists(self._at(rel))

    def open(self, rel: str = "", mode: str = "rb", **kwargs):
        with self.errors("opening", rel):
            return self.fs.open(self._at(rel), mode, **kwargs)

    def read_bytes(self, rel: str = "") -> bytes:
        """The whole object; a missing one raises FileNotFoundError naming its URI."""
        try:
            with self.errors("reading", rel), self.open(rel, "rb") as f:
                return f.read()
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


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``uri`` (local, or s3fs with the endpoint made explicit)."""
    return Storage(uri, storage_options).fs


def arrow_filesystem(uri: str, storage_options: StorageOptions | None = None):
    """The pyarrow filesystem for ``uri`` (``None`` for local paths, Arrow's default)."""
    return Storage(uri, storage_options).arrow
