"""Solver and checkpoint tasks: the core's per-group steps, run where Ray schedules them.

A solve task runs :class:`~engram_ray.extraction.GroupSolve` (merge the base Σ, keep Σ, one
eigendecomposition of Σ_total, every concept × module engram) and streams the engrams straight
into the writer's staging area; it returns only the manifest rows. The driver commits after
every task succeeded, so a failed task leaves no committed run. The reduced Σ arrives as
:class:`~engram_ray.distributed.reduce.SigmaBlocks` (numpy, mapped from the object store, not
copied) and the weights as numpy too, so no driver ever holds every group's Σ and nothing is
pickled as a torch tensor on the way.

Each task runs torch with as many threads as the CPUs it reserves (Ray sets OMP_NUM_THREADS
to that, rounded down, which is 1 for fractional reservations), at normal priority
(``cluster.normal_priority``: Ray starts workers at niceness 15). :func:`warm_solver` lets the
driver start solver worker processes (imports: torch, the solver, the store) while the stream
still runs, so the first group does not wait for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import ray
import torch

from engram_ray.core.moments import ModuleInfo
from engram_ray.distributed.cluster import normal_priority
from engram_ray.distributed.reduce import SigmaBlocks, as_tensor
from engram_ray.extraction import GroupCheckpoint, GroupSolve

__all__ = ["SOLVER_RETRIES", "checkpoint_task", "solve_task", "task_threads", "warm_solver"]


def task_threads(num_cpus: float) -> int:
    """Torch threads for a task reserving ``num_cpus`` CPUs: that many, at least one."""
    return max(1, round(num_cpus))


# A solver task whose worker process dies (OOM killer, a preempted node) is run again: its
# writes are idempotent (the group's spectrum and payload files are rewritten whole under fixed
# names in the staging area, and only the rows the successful attempt returns reach the
# manifest), so a retry cannot duplicate or mix statistics. Exceptions raised by the task are not retried: they
# are deterministic (bad Σ, a storage error already retried by the client).
SOLVER_RETRIES = 3


@ray.remote(max_retries=SOLVER_RETRIES, retry_exceptions=False)
def solve_task(step: GroupSolve, sigma: SigmaBlocks, members: Sequence[ModuleInfo],
               weights: Mapping[str, np.ndarray], threads: int = 1) -> list[dict]:
    """One input group solved and written (on the GPU when the task has one)."""
    normal_priority()
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else None
    tensors = {k: as_tensor(v) for k, v in weights.items()}
    return step(sigma.to_moments(), members, tensors, device=device)


@ray.remote(max_retries=SOLVER_RETRIES, retry_exceptions=False)  # rewrites its files whole too
def checkpoint_task(step: GroupCheckpoint, group: str, sigma: SigmaBlocks) -> None:
    """One input group's Σ so far written into a checkpoint generation."""
    step(group, sigma.to_moments())


@ray.remote
def warm_solver(threads: int = 1) -> float:
    """Nothing but this module's imports (done when the worker loaded it) and the thread
    setting: a worker process ready for :func:`solve_task`. Returns when it was ready."""
    normal_priority()
    torch.set_num_threads(threads)
    return time.time()
