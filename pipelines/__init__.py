"""Declared pipelines: each module builds its configs as data and runs them (``digits`` is the
embedded demo behind ``make demo``; ``tofu`` is TOFU end to end in OpenUnlearning's format,
``engram-ray tofu``, whose demo runs it on synthetic TOFU-layout data); ``configs/`` holds
YAML configs for ``engram-ray extract`` (``tofu_forget10.yaml``: the paper's LLM setting).

:data:`PIPELINES` names each runnable pipeline's entry point as ``"module:function"`` so that
importing this registry imports neither torch nor Ray; :func:`get_pipeline` imports the one
asked for. An entry point is called as ``fn(out, stages=..., quick=...)`` and returns the path
of the report it wrote (``engram-ray demo --pipeline NAME``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

__all__ = ["PIPELINES", "get_pipeline"]

PIPELINES: dict[str, str] = {
    "digits": "pipelines.digits:run_demo",
    "tofu": "pipelines.tofu:run_demo",
}


def get_pipeline(name: str) -> Callable[..., str]:
    """The entry point registered as ``name``; a ``ValueError`` naming the known pipelines if
    there is none."""
    try:
        target = PIPELINES[name]
    except KeyError:
        known = ", ".join(sorted(PIPELINES))
        raise ValueError(f"unknown pipeline {name!r} (known: {known})") from None
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)
