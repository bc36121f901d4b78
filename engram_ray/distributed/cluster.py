"""Joining Ray: a running cluster when there is one, else a local Ray sized for the pipeline."""

from __future__ import annotations

import math
import os

import ray

from engram_ray.config import ParallelConfig

__all__ = ["cpus_needed", "ensure_ray"]


def ensure_ray(address: str | None = None, min_cpus: float = 0.0) -> None:
    """Join ``address`` (or RAY_ADDRESS, or a local ``ray start`` head that Ray finds on its
    own) without passing resources, else start a local Ray; no-op when connected.

    A local Ray advertises at least ``min_cpus`` logical CPUs: on a small machine (2 cores)
    the stage actors' reservations would otherwise leave Ray Data's read tasks no CPU to be
    scheduled on, and the stream would wait forever.
    """
    if ray.is_initialized():
        return
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return
    cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    except ValueError as e:
        # ray.init() joins a local `ray start` head on its own, and then refuses resources:
        # the cluster's own resources are what there is, so join it as it is.
        if "existing cluster" not in str(e):
            raise
        ray.init(include_dashboard=False, log_to_driver=False)


def cpus_needed(p: ParallelConfig) -> float:
    """Logical CPUs the pipeline reserves at once: actors, feeders, one encode and one read task."""
    return p.stages * p.replicas * p.num_cpus + p.replicas * 0.25 + 2 * p.encode_num_cpus + 1
