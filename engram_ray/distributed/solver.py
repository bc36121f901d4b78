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

from ..incremental import merge_into_base
from ..moments import ModuleInfo, Moments
from ..solve import SolverConfig, solve_group
from ..store import RunWriter

__all__ = ["solve_and_write", "solve_order"]


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
    keep_sources: Sequence[str] | None = None,
    base_uri: str | None = None,
) -> list[dict]:
    """Solve one group and write its payloads; with ``keep_sources`` also keep its Σ, tagged
    with the shards it covers (the run's data files). With ``base_uri`` (an extending run) the
    base run's Σ of this group is merged in first, here, so no driver holds every group's Σ."""
    writer = RunWriter(run_uri, storage_options, attach=True)
    group = members[0].group
    if base_uri is not None:
        moments = merge_into_base(base_uri, group, moments, keep_sources or (), storage_options)
    elif keep_sources is not None:
        moments.sources = frozenset(keep_sources)
    if keep_sources is not None:
        writer.write_statistics(group, moments)
    if torch.cuda.is_available():
        moments = moments.to("cuda")  # eigh and matmuls on the GPU, still in float64
    records = solve_group(moments, list(members), weights, SolverConfig(**solver))
    return writer.write_records({m.name: m for m in members}, records)
