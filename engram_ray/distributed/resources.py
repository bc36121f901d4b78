"""Can this config ever be scheduled here? Checked before any actor starts, against the cluster.

A Ray actor or task that asks for more than any node offers waits forever: ``ray status``
shows ``{'CPU': 1.0}: 2+ pending`` and the stream never moves. So before starting anything the
driver adds up what the pipeline reserves at once and compares it with what the cluster has:

- every stage actor (``parallel.num_cpus`` / ``num_gpus`` each, ``stages × replicas`` of them)
  must fit on some node, and all of them together in the cluster (they live for the whole run);
- beside them, one feeder per replica (``FEEDER_CPUS``), one Ray Data read/encode task
  (``parallel.encode_num_cpus``) must be schedulable or no row ever reaches a stage;
- a solver task (``parallel.solver_num_cpus`` / ``solver_num_gpus``) must fit on some node
  once the actors are gone (they are killed after the stream ends).

What an autoscaler may add is counted when the cluster says so: ``max_extra_cpus`` (e.g. a
KubeRay ``maxReplicas × worker CPUs``), which the caller passes when it knows it. The check is
a pure function of the config and the node resources, so it is tested with made-up clusters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engram_ray.config import ParallelConfig

__all__ = ["FEEDER_CPUS", "ResourceError", "check_schedulable", "reserved"]

FEEDER_CPUS = 0.25  # the feeder task of each replica: it only moves refs (distributed/feed.py)
_EPS = 1e-9  # Ray's logical resources are fractions: compare with a tolerance


class ResourceError(ValueError):
    """The config reserves more than the cluster can ever schedule; the message names the
    shortfall and the config keys that fix it."""


@dataclass(frozen=True)
class Reservation:
    """What the pipeline holds at once (CPUs and GPUs), and per item."""

    actor_cpus: float
    actor_gpus: float
    actors: int
    stream_cpus: float  # feeders + one read/encode task, beside the actors
    solver_cpus: float
    solver_gpus: float

    @property
    def total_cpus(self) -> float:
        return self.actors * self.actor_cpus + self.stream_cpus

    @property
    def total_gpus(self) -> float:
        return self.actors * self.actor_gpus


def reserved(p: ParallelConfig) -> Reservation:
    """The pipeline's reservation for ``p`` (see the module docstring)."""
    return Reservation(
        actor_cpus=p.num_cpus, actor_gpus=p.num_gpus, actors=p.stages * p.replicas,
        stream_cpus=p.replicas * FEEDER_CPUS + p.encode_num_cpus,
        solver_cpus=p.solver_num_cpus, solver_gpus=p.solver_num_gpus)


def check_schedulable(p: ParallelConfig, nodes: Sequence[Mapping[str, float]],
                      max_extra_cpus: float = 0.0) -> Reservation:
    """Raise :class:`ResourceError` when ``p`` can never be scheduled on ``nodes`` (each a
    ``{"CPU": n, "GPU": m, ...}`` mapping of an alive node); returns the reservation."""
    r = reserved(p)
    cpus = [float(n.get("CPU", 0.0)) for n in nodes]
    gpus = [float(n.get("GPU", 0.0)) for n in nodes]
    total_cpus = sum(cpus) + max_extra_cpus
    biggest = max(cpus, default=0.0)
    # A node the autoscaler adds may be bigger than any node up now: check per node only on a
    # fixed cluster, and the totals with what it may add.
    per_node = not max_extra_cpus
    problems = []
    if per_node and r.actor_cpus > biggest + _EPS:
        problems.append(f"one stage actor needs {r.actor_cpus:g} CPUs but the largest node has "
                        f"{biggest:g} (lower parallel.num_cpus)")
    if r.actor_gpus > max(gpus, default=0.0) + _EPS:
        problems.append(f"one stage actor needs {r.actor_gpus:g} GPUs but the largest node has "
                        f"{max(gpus, default=0.0):g} (lower parallel.num_gpus)")
    if r.total_cpus > total_cpus + _EPS:
        problems.append(
            f"{r.actors} stage actors × {r.actor_cpus:g} CPUs + {r.stream_cpus:g} for feeders "
            f"and one read/encode task = {r.total_cpus:g} CPUs, but the cluster has "
            f"{total_cpus:g} (lower parallel.num_cpus, parallel.encode_num_cpus, "
            "parallel.stages or parallel.replicas)")
    if r.total_gpus > sum(gpus) + _EPS:
        problems.append(f"{r.actors} stage actors × {r.actor_gpus:g} GPUs = {r.total_gpus:g} "
                        f"GPUs, but the cluster has {sum(gpus):g} (lower parallel.num_gpus)")
    if per_node and r.solver_cpus > biggest + _EPS:
        problems.append(f"a solver task needs {r.solver_cpus:g} CPUs but the largest node has "
                        f"{biggest:g} (lower parallel.solver_num_cpus)")
    if r.solver_gpus > max(gpus, default=0.0) + _EPS:
        problems.append(f"a solver task needs {r.solver_gpus:g} GPUs but the largest node has "
                        f"{max(gpus, default=0.0):g} (lower parallel.solver_num_gpus)")
    if problems:
        raise ResourceError("this config can never be scheduled on this cluster: "
                            + "; ".join(problems))
    return r
