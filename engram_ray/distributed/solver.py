"""Solver tasks: one per input group, largest D first, each writing its payloads to the store.

A task runs the single-process ``solve_group`` (one eigendecomposition of Σ_total, then every
concept × module matmul) and streams the engrams straight into ``payload/<module>.parquet`` of
the run the driver prepared; it returns only the manifest rows. The driver commits after every
task succeeded, so a failed task leaves no committed run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ray
import torch

from engram_ray.core.moments import ModuleInfo, Moments
from engram_ray.core.solve import SolverConfig, solve_group
from engram_ray.incremental import merge_into_base
from engram_ray.io.store import RunWriter

__all__ = ["solve_and_write", "solve_order", "write_checkpoint"]


def solve_order(dims: Mapping[str, int]) -> list[str]:
    """Groups by decreasing D (eigh is O(D³): start the longest tasks first), ties by name."""
    return sorted(dims, key=lambda g: (-dims[g], g))


@ray.remote
def solve_and_write(
    moments: Moments,
    members: Sequence[ModuleInfo],
    weights: Mapping[str, torch.Tensor],
    solver: Mapping,
    run_uri: str,
    storage_options: Mapping | None = None,
    keep_statistics: bool = False,
    base=None,
    new_files: Sequence[str] = (),
) -> list[dict]:
    """Solve one group and write its payloads. ``moments`` counted ``new_files``; with ``base``
    (an extended run, or the checkpoint a resumed run started from) the base's Σ of this group
    is merged in first, here, so no driver holds every group's Σ. ``keep_statistics`` keeps
    the group's Σ in the run, tagged with every shard it covers."""
    writer = RunWriter(run_uri, storage_options, attach=True)
    group = members[0].group
    if base is not None:
        moments = merge_into_base(base, group, moments, new_files)
    else:
        moments.sources = frozenset(new_files)
    if keep_statistics:
        writer.write_statistics(group, moments)
    if torch.cuda.is_available():
        moments = moments.to("cuda")  # eigh and matmuls on the GPU, still in float64
    records = solve_group(moments, list(members), weights, SolverConfig(**solver))
    return writer.write_records({m.name: m for m in members}, records)


@ray.remote
def write_checkpoint(moments: Moments, group: str, gen, resumed, new_files: Sequence[str]) -> None:
    """One group's Σ so far — the generation resumed from (if any) plus ``moments``, which
    counted ``new_files`` — written into checkpoint generation ``gen``."""
    if resumed is not None:
        moments = merge_into_base(resumed, group, moments, new_files)
    else:
        moments.sources = frozenset(new_files)
    gen.write_group(group, moments)
