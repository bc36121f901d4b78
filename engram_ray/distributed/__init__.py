"""Everything that talks to Ray: stage actors, feeders, tree reduction, solver tasks, the runner.

The math these modules call (capture, moments, solve, store) never imports Ray, so the
single-process engine is the oracle this package is tested against.

The runner's names are imported on first use (PEP 562): every Ray worker that unpickles a
stage actor, a solver or an encode task imports this package first, and the runner would
pull in the whole driver side (executor, Ray Data, store) — ~0.7 s of a worker's start-up on
2 cores, on the path to the first row.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ensure_ray", "run_extract"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("engram_ray.distributed.runner"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
