"""Locations as strings: which storage backend a URI names, its path, and the options it takes.

A neutral module (it imports nothing from engram_ray but :mod:`engram_ray.redaction`): the
config validates locations and options with it without importing the storage layer, and
:mod:`engram_ray.io.storage` builds its filesystems from it (and re-exports these names).

Schemes. A location is a local path (``runs/``, ``/data``, ``file:///data``: scheme
``file``) or a URL ``scheme://…`` served by an installed fsspec implementation: ``s3://``
(s3fs), ``gs://`` (gcsfs), ``az://``/``abfs://``/``abfss://`` (adlfs), ``hf://``
(huggingface_hub), ``memory://`` (in-process; tests) and any other fsspec registers. A scheme
whose implementation is not installed is refused at once (:class:`UnsupportedScheme`, a
``ValueError``) naming the package to install, and so are schemes fsspec does not know and
chained URLs (``simplecache::s3://…``): such a string must never fall through to the local
filesystem, where it would become a folder named ``gs:`` under the working directory.

Exclusive create (:data:`EXCLUSIVE_CREATE`). Leases (``io/lease.py``), hence run commits and
every writer that takes a lease, need "create this object only if it does not exist" in one
atomic step. Where the backend has it, it is used: ``O_EXCL`` and ``link`` locally, S3's
``If-None-Match: *`` (s3fs ``mode="create"``), GCS's ``ifGenerationMatch=0`` (gcsfs
``mode="create"``), Azure's ``If-None-Match: *`` (adlfs ``overwrite=False``, the SDK's
conditional upload), and for ``memory://`` a lock around check-and-create (the store lives in
one process, so an in-process lock is exclusive). Every other scheme (``hf://``: a Hub commit
has no create-if-absent on one file; ``http(s)://``, ``ftp://``, ``sftp://``…) can be read
from, but a lease there is refused, so no run or leased output is written there.

Options. ``storage_options`` are the keywords of the location's filesystem class (s3fs's
``S3FileSystem``, gcsfs's ``GCSFileSystem``…) plus, for S3, ``endpoint_url`` and ``region``.
One set of options may serve locations of several schemes (``apply --run s3://… --out
gs://…``, a model path checked with the store's options), so a key is accepted when the
location's backend or S3 takes it, and a backend is given only the keys it takes; a key
neither knows is an error naming it.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

from engram_ray.redaction import REDACTED, is_secret_key

__all__ = [
    "EXCLUSIVE_CREATE",
    "StorageOptions",
    "UnsupportedScheme",
    "backend_option_names",
    "check_options",
    "check_scheme",
    "exclusive_create",
    "is_remote",
    "join",
    "normalize",
    "read_text",
    "resolve_storage_options",
    "s3_option_names",
    "scheme_of",
    "strip_protocol",
]

StorageOptions = Mapping[str, Any]

# How each accepted backend creates an object only if absent (see the module docstring).
EXCLUSIVE_CREATE = {
    "file": "O_EXCL (a hard link of a private file)",
    "s3": "If-None-Match: * (conditional PUT)",
    "s3a": "If-None-Match: * (conditional PUT)",
    "gs": "ifGenerationMatch=0",
    "gcs": "ifGenerationMatch=0",
    "az": "If-None-Match: * (conditional upload)",
    "abfs": "If-None-Match: * (conditional upload)",
    "abfss": "If-None-Match: * (conditional upload)",
    "memory": "an in-process lock (the store lives in this process only)",
}
# The package that provides a scheme, for the refusal of a missing one.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub", "http": "aiohttp",
             "https": "aiohttp", "sftp": "paramiko", "ssh": "paramiko"}
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")

# Keywords s3fs takes through ``**kwargs`` (documented there, not in its signature): ``profile``
# goes to the botocore session, the others to fsspec's filesystem base class.
_S3_KWARGS = frozenset({"profile", "skip_instance_cache", "listings_expiry_time", "max_paths"})
# Keywords that would make a filesystem unusable from synchronous code, and the listing cache,
# which stays off: a stale listing would hide a freshly written commit marker.
_REFUSED = frozenset({"self", "asynchronous", "loop", "use_listings_cache"})
_CONVENIENCES = frozenset({"endpoint_url", "region"})  # ours, for S3 (endpoint_url is s3fs's)
_MAPPINGS = frozenset({"client_kwargs", "config_kwargs", "s3_additional_kwargs"})
_STRINGS = frozenset({"endpoint_url", "region", "profile", "key", "secret", "token",
                      "username", "password"})


class UnsupportedScheme(ValueError):
    """A location whose scheme no installed fsspec implementation serves (the message names
    the package to install), or that engram-ray cannot use (a chained URL)."""


def scheme_of(uri: str) -> str:
    """The location's scheme, lower case: ``"file"`` for local paths and ``file://`` URLs."""
    m = _SCHEME.match(uri)
    if m:
        return m.group(1).lower()
    if "::" in uri or "://" in uri:
        raise UnsupportedScheme(f"{uri}: chained or malformed URLs are not supported; give one "
                                "scheme://bucket/path or a local path")
    return "file"


def is_remote(uri: str) -> bool:
    """True for any location that is not a local path (``s3://``, ``gs://``, ``memory://``…)."""
    return scheme_of(uri) != "file"


def normalize(uri: str) -> str:
    """``file://`` URLs as plain absolute paths (``file:///x`` → ``/x``); others unchanged."""
    if _SCHEME.match(uri) and scheme_of(uri) == "file":
        return os.path.abspath(os.path.expanduser(uri.split("://", 1)[1] or "/"))
    return uri


def strip_protocol(uri: str) -> str:
    """The path a filesystem uses: ``s3://bucket/key`` → ``bucket/key``; local paths (and
    ``file://`` URLs) absolute."""
    if is_remote(uri):
        return uri.split("://", 1)[1].rstrip("/")
    return os.path.abspath(os.path.expanduser(normalize(uri)))


def join(uri: str, *parts: str) -> str:
    """Join path parts with ``/`` for URLs and ``os.path.join`` for local paths."""
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(uri, *parts)


@functools.cache
def _filesystem_class(scheme: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except ImportError:
        package = _PACKAGES.get(scheme) or "the package that provides it"
        raise UnsupportedScheme(f"{scheme}:// needs the {package} package, which is not "
                                f"installed: pip install {package}") from None
    except ValueError:
        raise UnsupportedScheme(f"unknown storage scheme {scheme}:// (no fsspec implementation "
                                "is registered for it)") from None


def check_scheme(uri: str) -> str:
    """The scheme of ``uri``, refused with :class:`UnsupportedScheme` naming the location and
    the package to install when no installed implementation serves it."""
    scheme = scheme_of(uri)
    if scheme != "file":
        try:
            _filesystem_class(scheme)
        except UnsupportedScheme as e:
            raise UnsupportedScheme(f"{uri}: {e}") from None
    return scheme


def exclusive_create(scheme: str) -> str | None:
    """How ``scheme`` creates an object only if absent, or None when it cannot."""
    return EXCLUSIVE_CREATE.get(scheme)


def _named_params(cls) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@functools.lru_cache(maxsize=1)
def s3_option_names() -> frozenset[str]:
    """The keys accepted for S3: s3fs's keywords plus ours."""
    import s3fs

    named = _named_params(s3fs.S3FileSystem)
    return frozenset((named | _S3_KWARGS | _CONVENIENCES) - _REFUSED)


@functools.cache
def backend_option_names(scheme: str) -> frozenset[str]:
    """The keys the filesystem of ``scheme`` takes (its keywords and fsspec's base ones)."""
    if scheme in ("s3", "s3a"):
        return s3_option_names()
    if scheme == "file":
        return frozenset()
    named = _named_params(_filesystem_class(scheme))
    return frozenset((named | _S3_KWARGS - {"profile"}) - _REFUSED)


def check_options(options: StorageOptions | None, scheme: str = "s3") -> dict[str, Any]:
    """``options`` checked for a location of ``scheme``: a mapping, every key taken by that
    backend or by S3 (:func:`s3_option_names`), types of the common keys; errors name the key
    and the type, never the value. Returns a copy without ``None`` values."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"storage options must be a mapping of option names to values, got a "
                         f"{type(options).__name__}")
    opts = dict(options or {})
    accepted = s3_option_names() | backend_option_names(scheme)
    unknown = set(opts) - accepted
    if unknown:
        raise ValueError(f"unknown storage option(s) {sorted(map(str, unknown))}; accepted: "
                         f"{sorted(accepted)}")
    _check_types(opts)
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
                             "credential, or leave it to the environment")
        if not prefix and k in _MAPPINGS and not isinstance(v, Mapping):
            raise ValueError(f"storage option {name!r} must be a mapping, got a "
                             f"{type(v).__name__}")
        if not prefix and k in _STRINGS and not isinstance(v, str):
            raise ValueError(f"storage option {name!r} must be a string, got a "
                             f"{type(v).__name__}")
        if isinstance(v, Mapping):
            _check_types(v, f"{name}.")


def _env_default(opts: dict[str, Any], key: str, nested: str, *names: str) -> None:
    """Fill ``opts[key]`` from the first set environment variable of ``names``, unless the
    option is given, directly or as ``client_kwargs[nested]``."""
    if opts.get(key) is not None or (opts.get("client_kwargs") or {}).get(nested) is not None:
        return
    value = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if value:
        opts[key] = value


def resolve_storage_options(options: StorageOptions | None = None,
                            scheme: str = "s3") -> dict[str, Any]:
    """:func:`check_options`, then for S3 the endpoint and the region filled from the AWS
    environment (explicit wins; pyarrow ignores ``AWS_ENDPOINT_URL``). Credentials are not read
    here: each client finds them in the environment itself."""
    opts = check_options(options, scheme)
    if scheme in ("s3", "s3a"):
        _env_default(opts, "endpoint_url", "endpoint_url", "AWS_ENDPOINT_URL_S3",
                     "AWS_ENDPOINT_URL")
        _env_default(opts, "region", "region_name", "AWS_REGION", "AWS_DEFAULT_REGION")
    return opts


def read_text(uri: str) -> str:
    """A small text file (a config) at ``uri``, read with the environment's defaults (for S3:
    the endpoint and region of the AWS variables); a missing file raises FileNotFoundError."""
    import fsspec

    scheme = check_scheme(uri)
    opts = resolve_storage_options(None, scheme) if scheme != "file" else {}
    if "region" in opts:
        opts["client_kwargs"] = {"region_name": opts.pop("region")}
    with fsspec.open(normalize(uri), "r", encoding="utf-8", **opts) as f:
        return f.read()
