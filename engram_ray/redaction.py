"""Secrets never printed: credential-like values of options, passwords in URLs, tokens in text.

A neutral module (it imports nothing from engram_ray), so that the config, the storage layer
and the model loaders redact the same way. Every writer of options (``run.json``,
``edit.json``, config dumps) goes through :func:`redact`, and every error message that quotes
a location or a client's error through :func:`redact_text` (:func:`one_line` does).

What counts as a secret:

- the value of a key whose name (lower case, letters and digits only) is one of
  :data:`_SECRET_NAMES` or contains one of :data:`_SECRET_WORDS` (``secret``, ``token``,
  ``password``, ``credential``, ``accesskey``, ``accountkey``, ``authorization``,
  ``connectionstring``…), at any depth of nested mappings and lists, e.g.
  ``client_kwargs.aws_secret_access_key``, ``s3_additional_kwargs.SSECustomerKey``,
  ``config_kwargs.proxies_config.proxy_headers.Proxy-Authorization``, and the value of a
  ``[name, value]`` pair whose name does (a header list);
- the user information of a URL inside any string value or message
  (``http://user:pass@proxy:3128`` → ``http://***@proxy:3128``; for http(s), ws(s) and ftp a
  bare ``https://TOKEN@host`` too), wherever it sits, e.g. ``config_kwargs.proxies.https``;
- URL query parameters with a secret-looking name (``X-Amz-Signature``, Azure's ``sig``);
- in messages, the value of any environment variable that holds a credential
  (:data:`SECRET_ENV`: ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``…), should a client quote it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "SECRET_ENV", "is_secret_key", "one_line", "redact", "redact_text"]

REDACTED = "***"
_SECRET_NAMES = frozenset({"key", "username", "user", "auth", "sig", "cookie"})
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "accesskey",
                 "accountkey", "customerkey", "privatekey", "apikey", "signature",
                 "authorization", "connectionstring", "sastoken")
# Environment variables whose values are credentials: scrubbed from messages.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
              "GOOGLE_OAUTH_ACCESS_TOKEN")
# user:password@ after any scheme; a bare user@ only where it is a credential by convention
# (https://TOKEN@github.com); never across a "/", so hf://org/name@rev is left alone.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/@\s:]*:[^/@\s]*)@")
_BARE_USER = re.compile(r"(?P<scheme>\b(?:https?|wss?|ftps?)://)(?P<info>[^/@\s:]+)@")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&\s#\"']*)")
_MIN_ENV_SECRET = 8  # shorter values would redact ordinary words


def is_secret_key(name: object) -> bool:
    """True for an option name that holds a credential (see the module docstring)."""
    flat = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return flat in _SECRET_NAMES or any(w in flat for w in _SECRET_WORDS)


def redact_text(text: str) -> str:
    """``text`` with URL credentials, secret query parameters and the values of
    :data:`SECRET_ENV` replaced by ``"***"``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _BARE_USER.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY.sub(lambda m: f"{m['sep']}{m['name']}={REDACTED}"
                      if is_secret_key(m["name"]) else m[0], text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= _MIN_ENV_SECRET:
            text = text.replace(value, REDACTED)
    return text


def _redact_value(key: object, value: Any) -> Any:
    if value is None:
        return None
    if is_secret_key(key):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: _redact_value(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and isinstance(value[0], str) and is_secret_key(value[0]):
            return [value[0], REDACTED]  # a (name, value) pair: a header, a form field
        return [_redact_value("", v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact(options: Any) -> Any:
    """``options`` with every credential-like value replaced by ``"***"``, at any depth of
    mappings and lists, and URL credentials removed from every string (a copy; ``None`` stays
    ``None``). A value that is not a mapping where options were expected is replaced whole: a
    mistyped ``storage_options`` may be a pasted secret."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        return REDACTED
    return {k: _redact_value(k, v) for k, v in options.items()}


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, credentials redacted (for one-line
    error reports)."""
    text = redact_text(str(e).strip())
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
