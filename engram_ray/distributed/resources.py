"""Can this config ever be scheduled here? Checked before any actor starts, against the cluster
and what its autoscaler may add.

A Ray actor or task that asks for more than any node offers waits forever: ``ray status``
shows ``{'CPU': 1.0}: 2+ pending`` and the stream never moves. So before starting anything the
driver adds up what the pipeline reserves and compares it with the node *shapes* it may ever
get: the alive nodes, plus the node types an autoscaler may add (``parallel.autoscale_node_types``,
or the GCS where a platform publishes them: ``placement.py``):

- one stage actor (``parallel.num_cpus`` / ``num_gpus``), one read/encode task
  (``parallel.encode_num_cpus``) and one solver task (``parallel.solver_num_cpus`` /
  ``solver_num_gpus``) must each fit on one node shape, all its resources together;
- all ``stages × replicas`` actors (they live for the whole run) plus the stream beside them
  (``FEEDER_CPUS`` per replica and one read/encode task) must fit in what the cluster has plus
  what the autoscaler may add (``max_workers`` × the type's resources; unbounded when a type
  has no limit).

An autoscaler whose node types are unknown (``may_grow``) may add any shape: nothing can be
refused up front, and the placement wait (``parallel.schedule_timeout_s``) is the only bound.
``parallel.autoscale_max_cpus`` (CPUs an autoscaler may add, node shapes unknown) is the older,
coarser form: it lifts the per-node CPU check and adds to the CPU total. The check is a pure
function of the config and the shapes, so it is tested with made-up clusters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engram_ray.config import ParallelConfig

__all__ = ["FEEDER_CPUS", "NodeType", "Reservation", "ResourceError", "check_schedulable",
           "describe", "node_types_from_config", "reserved"]

FEEDER_CPUS = 0.25  # each replica's share of the stream beside its actors (distributed/feed.py)
_EPS = 1e-9  # Ray's logical resources are fractions: compare with a tolerance
_ACTOR_KEYS = {"CPU": "parallel.num_cpus", "GPU": "parallel.num_gpus"}
_SOLVER_KEYS = {"CPU": "parallel.solver_num_cpus", "GPU": "parallel.solver_num_gpus"}
_ENCODE_KEYS = {"CPU": "parallel.encode_num_cpus"}
_TYPES_KEY = "parallel.autoscale_node_types"


class ResourceError(ValueError):
    """The config reserves more than the cluster can ever schedule; the message names the
    shortfall and the config keys that fix it."""


@dataclass(frozen=True)
class NodeType:
    """A node shape an autoscaler may add: its resources, and at most ``max_count`` nodes of it
    (``None``: no limit known)."""

    name: str
    resources: Mapping[str, float]
    max_count: int | None = None


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

    def actor_bundle(self) -> dict[str, float]:
        """One stage actor's placement-group bundle (zero amounts left out, as Ray wants)."""
        return _bundle(CPU=self.actor_cpus, GPU=self.actor_gpus)

    def solver_bundle(self) -> dict[str, float]:
        """One solver task's placement-group bundle."""
        return _bundle(CPU=self.solver_cpus, GPU=self.solver_gpus)


def _bundle(**amounts: float) -> dict[str, float]:
    return {k: float(v) for k, v in amounts.items() if v > 0}


def reserved(p: ParallelConfig) -> Reservation:
    """The pipeline's reservation for ``p`` (see the module docstring)."""
    return Reservation(
        actor_cpus=p.num_cpus, actor_gpus=p.num_gpus, actors=p.stages * p.replicas,
        stream_cpus=p.replicas * FEEDER_CPUS + p.encode_num_cpus,
        solver_cpus=p.solver_num_cpus, solver_gpus=p.solver_num_gpus)


def node_types_from_config(raw: Mapping[str, Mapping[str, float]] | None) -> list[NodeType]:
    """``parallel.autoscale_node_types`` (``{name: {CPU: n, GPU: m, max_workers: k}}``, the
    shape of a cluster YAML's ``available_node_types``) as :class:`NodeType` s."""
    out = []
    for name, spec in (raw or {}).items():
        res = {k: float(v) for k, v in spec.items() if k != "max_workers"}
        out.append(NodeType(str(name), res, spec.get("max_workers")))
    return out


def describe(amounts: Mapping[str, float]) -> str:
    """``{CPU: 1, GPU: 0.5}`` as ``1 CPU + 0.5 GPU`` (``nothing`` when empty)."""
    return " + ".join(f"{v:g} {k}" for k, v in sorted(amounts.items())) or "nothing"


def check_schedulable(p: ParallelConfig, nodes: Sequence[Mapping[str, float]],
                      max_extra_cpus: float = 0.0, node_types: Sequence[NodeType] = (),
                      may_grow: bool = False) -> Reservation:
    """Raise :class:`ResourceError` when ``p`` can never be scheduled on ``nodes`` (each the
    ``{"CPU": n, "GPU": m, ...}`` totals of an alive node) plus the ``node_types`` an
    autoscaler may add; ``may_grow``: an autoscaler of unknown node types runs. Returns the
    reservation."""
    r = reserved(p)
    shapes = [dict(n) for n in nodes] + [dict(t.resources) for t in node_types
                                         if t.max_count != 0]
    unknown = may_grow and not node_types
    # autoscale_max_cpus: nodes of unknown shape that bring CPUs (and nothing else known).
    free = {"CPU"} if max_extra_cpus and not node_types else set()
    problems = []
    if not unknown:
        for what, need, keys in (("one stage actor", r.actor_bundle(), _ACTOR_KEYS),
                                 ("a read/encode task", _bundle(CPU=p.encode_num_cpus),
                                  _ENCODE_KEYS),
                                 ("a solver task", r.solver_bundle(), _SOLVER_KEYS)):
            problem = _fit_problem(what, need, shapes, keys, free, bool(node_types))
            if problem:
                problems.append(problem)
    cap = {k: _capacity(k, nodes, node_types, unknown) for k in ("CPU", "GPU")}
    cap["CPU"] += max_extra_cpus
    if r.total_cpus > cap["CPU"] + _EPS:
        problems.append(
            f"{r.actors} stage actors × {r.actor_cpus:g} CPUs + {r.stream_cpus:g} for feeders "
            f"and one read/encode task = {r.total_cpus:g} CPUs, but the cluster has "
            f"{_has(cap['CPU'], node_types)} (lower parallel.num_cpus, parallel.encode_num_cpus, "
            "parallel.stages or parallel.replicas)")
    if r.total_gpus > cap["GPU"] + _EPS:
        problems.append(f"{r.actors} stage actors × {r.actor_gpus:g} GPUs = {r.total_gpus:g} "
                        f"GPUs, but the cluster has {_has(cap['GPU'], node_types)} (lower "
                        "parallel.num_gpus)")
    if problems:
        hint = "" if node_types else (f"; if an autoscaler may add nodes, name its node types "
                                      f"in {_TYPES_KEY}")
        raise ResourceError("this config can never be scheduled on this cluster: "
                            + "; ".join(problems) + hint)
    return r


def _has(amount: float, node_types: Sequence[NodeType]) -> str:
    return f"{amount:g}" + (" with every node its autoscaler may add" if node_types else "")


def _capacity(key: str, nodes: Sequence[Mapping[str, float]], node_types: Sequence[NodeType],
              unknown: bool) -> float:
    """``key`` on the alive nodes plus every node the autoscaler may add (inf: no limit)."""
    if unknown:
        return math.inf
    total = sum(float(n.get(key, 0.0)) for n in nodes)
    for t in node_types:
        amount = float(t.resources.get(key, 0.0))
        if amount > 0:
            total += math.inf if t.max_count is None else t.max_count * amount
    return total


def _fit_problem(what: str, need: Mapping[str, float], shapes: Sequence[Mapping[str, float]],
                 keys: Mapping[str, str], free: set[str], typed: bool) -> str | None:
    """Why ``need`` fits no single shape (``None`` when one holds it); resources in ``free``
    are taken to fit anywhere. The message names the ``parallel.*`` key of the resource."""
    need = {k: v for k, v in need.items() if k not in free}
    if any(all(float(s.get(k, 0.0)) + _EPS >= v for k, v in need.items()) for s in shapes):
        return None
    where = "the largest node" + (" or node type" if typed else "")
    most = {k: max((float(s.get(k, 0.0)) for s in shapes), default=0.0) for k in need}
    over = sorted(k for k, v in need.items() if v > most[k] + _EPS)
    if over:
        return (f"{what} needs " + " and ".join(f"{need[k]:g} {k}s" for k in over)
                + f" but {where} has " + " and ".join(f"{most[k]:g}" for k in over)
                + " (lower " + " or ".join(keys[k] for k in over) + ")")
    return (f"{what} needs {describe(need)} on one node but no node"
            f"{' or node type' if typed else ''} has all of it (lower "
            + " or ".join(keys[k] for k in sorted(need)) + ")")
