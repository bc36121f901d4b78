"""Solver and checkpoint tasks: the core's per-group steps, run where Ray schedules them.

A solve task runs :class:`~engram_ray.extraction.GroupSolve` (merge the base Σ, keep Σ, one
eigendecomposition of Σ_total, every concept × module engram) and streams the engrams straight
into ``payload/<module>.parquet`` of the run the driver prepared; it returns only the manifest
rows. The driver commits after every task succeeded, so a failed task leaves no committed run.
The reduced Σ arrives as an object ref resolved by Ray, so no driver ever holds every group's Σ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ray
import torch

from engram_ray.core.moments import ModuleInfo, Moments
from engram_ray.extraction import GroupCheckpoint, GroupSolve

__all__ = ["checkpoint_task", "solve_task"]


@ray.remote
def solve_task(step: GroupSolve, moments: Moments, members: Sequence[ModuleInfo],
               weights: Mapping[str, torch.Tensor]) -> list[dict]:
    """One input group solved and written (on the GPU when the task has one)."""
    device = "cuda" if torch.cuda.is_available() else None
    return step(moments, members, weights, device=device)


@ray.remote
def checkpoint_task(step: GroupCheckpoint, group: str, moments: Moments) -> None:
    """One input group's Σ so far written into a checkpoint generation."""
    step(group, moments)
