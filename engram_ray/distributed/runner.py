"""``run_extract(cfg)``: the distributed extraction, end to end — the core's plan run by the
:class:`~engram_ray.distributed.executor.RayExecutor`.

Everything that can be checked before work starts is (config, model path, every shard's schema,
an existing run); everything after fails closed: no commit marker unless all tasks succeeded.
With ``store.checkpoint_shards`` the shards go through in slices, and after each slice the Σ so
far is reduced and checkpointed (``io/sigma_checkpoint.py``): a killed run resumes where it
stopped.
"""

from __future__ import annotations

from typing import TextIO

from engram_ray.config import ExtractConfig
from engram_ray.distributed.cluster import ensure_ray
from engram_ray.distributed.executor import RayExecutor
from engram_ray.extraction import prepare, run_extraction

__all__ = ["ensure_ray", "run_extract"]


def run_extract(cfg: ExtractConfig, *, log: TextIO | None = None) -> str:
    """Run the whole distributed extraction for ``cfg``; returns the committed run's URI.

    Progress goes to ``log`` (default: the current ``sys.stderr``, looked up at call time).
    """
    plan = prepare(cfg, log)
    return run_extraction(plan, RayExecutor(plan_config(cfg, plan), log), log)


def plan_config(cfg: ExtractConfig, plan) -> ExtractConfig:
    """``cfg`` as the plan reads it (an extension reads only the shards its base lacks)."""
    if plan.extension is not None:
        return plan.extension.config
    return cfg
