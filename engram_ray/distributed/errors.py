"""Ray's exceptions as the error a user should see: the original cause, or one line.

A failure inside Ray reaches the driver wrapped. A task's exception becomes a
``RayTaskError`` whose text is the remote traceback, wrapped again at every task boundary (a
feeder task calling a stage actor); Ray Data wraps a UDF's error in its own exceptions (the
original is their ``__cause__``); and an actor whose ``__init__`` raised becomes an
``ActorDiedError`` that keeps only the traceback as text — a bad input found while a stage
actor loads its slice printed 44 lines. :func:`unwrap` returns:

- the original exception where Ray kept it (``RayTaskError.cause``, ``__cause__``);
- for an actor whose setup failed, its creation task's error where Ray kept it (the
  ``ActorDiedError``'s argument), else the same exception rebuilt from the traceback's last
  line when its class is a builtin or engram-ray's own (so the CLI reports a bad input in a stage
  actor exactly as the single-process engine does: same class, same message, exit 2);
- otherwise a :class:`ClusterError` with one line naming what died and why (an actor killed,
  a node lost, an object lost).

Only ``distributed/`` imports Ray; the CLI calls this only when Ray is already imported.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re

from ray import exceptions as rex

__all__ = ["ClusterError", "unwrap"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"([A-Za-z_][\w.]*)(?::\s?(.*))?")
_BOILERPLATE = (rex.ActorDiedError.BASE_ERROR_MSG, rex.RayActorError.BASE_ERROR_MSG)


class ClusterError(RuntimeError):
    """An actor, worker, object or node failed under the run (not a bad input); the message
    is one line."""


def unwrap(exc: BaseException) -> BaseException:
    """The exception a user should see for ``exc`` (``exc`` itself if Ray did not wrap it)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = _inner(exc)
        if inner is None:
            return exc
        exc = inner
    return exc


def _inner(exc: BaseException) -> BaseException | None:
    """What ``exc`` wraps, or ``None`` when ``exc`` is already what the user should see."""
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        return cause if cause is not None and cause is not exc else ClusterError(_line(exc))
    if isinstance(exc, rex.RayActorError):
        return _actor_error(exc)
    if isinstance(exc, rex.RayError):
        return ClusterError(f"{type(exc).__name__}: {_line(exc)}")
    if type(exc).__module__.startswith("ray.") and exc.__cause__ is not None:
        return exc.__cause__  # Ray Data's wrappers (UserCodeException, …)
    return None


def _line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, without terminal colours."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _actor_error(exc: rex.RayActorError) -> BaseException:
    """An actor's death as the setup error it hid, or one line: who died, where, and why."""
    for arg in exc.args:  # Ray keeps the creation task's error as the first argument...
        if isinstance(arg, rex.RayTaskError):
            return arg
    text = _ANSI.sub("", str(exc))  # ...but not across a task boundary: read the text
    found = re.search(r"class_name: (\S+)", text) or re.search(r"ray::(\w+)\.__init__", text)
    who = found.group(1) if found else "a Ray actor"
    if exc.actor_init_failed:
        name, message = _raised(text)
        if name is not None:
            return _rebuild(name, message) or ClusterError(
                f"{who} failed to start: {name}: {message.splitlines()[0] if message else ''}")
    where = re.search(r"\tpid: (\d+)", text), re.search(r"\tip: (\S+)", text)
    if all(where):
        who += f" (pid {where[0].group(1)} on {where[1].group(1)})"
    return ClusterError(f"{who} died: {_reason(text) or _line(exc)}")


def _reason(text: str) -> str:
    """The first sentence of why Ray says an actor died (its advice on OOM killers omitted)."""
    reasons = [ln.strip() for ln in text.splitlines()
               if ln.strip() and not ln.startswith("\t") and ln.strip() not in _BOILERPLATE]
    if not reasons:
        return ""
    first = re.match(r"(.+?[.!])(?:\s|$)", reasons[-1])
    return first.group(1) if first else reasons[-1]


def _raised(traceback_text: str) -> tuple[str | None, str]:
    """(exception class name, message) of the last exception in a traceback's text."""
    lines = traceback_text.splitlines()
    frames = [i for i, ln in enumerate(lines) if ln.startswith('  File "')]
    start = frames[-1] + 1 if frames else 0
    for i in range(start, len(lines)):
        if lines[i] and not lines[i][0].isspace():
            m = _EXC_LINE.fullmatch(lines[i])
            if m:
                return m.group(1), "\n".join([m.group(2) or "", *lines[i + 1:]]).strip()
            break
    return None, ""


def _rebuild(name: str, message: str) -> BaseException | None:
    """``name(message)`` when ``name`` is a builtin or an engram-ray exception class."""
    if "." not in name:
        cls = getattr(builtins, name, None)
    elif name.startswith("engram_ray."):
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    else:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    if issubclass(cls, KeyError):
        try:
            message = ast.literal_eval(message)  # KeyError's text is the repr of its key
        except (ValueError, SyntaxError):
            pass
    try:
        return cls(message)
    except Exception:  # noqa: BLE001 - a class that cannot be built from its message
        return None
