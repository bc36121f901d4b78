"""Reservations an autoscaler sees: the stage actors and the solver slots as placement groups.

An actor that asks for a GPU no alive node has is demand Ray's autoscaler acts on, but only
once it is submitted; and a set of actors submitted one by one may get half its members and
wait for the rest forever. So the driver reserves them as one placement group (one bundle per
stage actor, ``SPREAD`` or ``PACK`` as ``parallel.placement`` says): the autoscaler sees the
whole gang (``ray status``: "pending placement groups") and adds nodes for it, and the actors
start only once every one of them has a place. The solver slots get a group of their own when
the solve starts (the stream's read/encode tasks are done by then and leave their CPUs), as many
bundles as fit now, at least one.

Before any group is made, :func:`~engram_ray.distributed.resources.check_schedulable` refuses a
request no node shape could ever hold, naming the ``parallel.*`` key; the shapes are the alive
nodes plus the autoscaler's node types (:func:`autoscaler_view`). A group that can be placed but
is not yet (nodes starting, or another job holding them) is waited for, saying what it waits
for, and given up after ``parallel.schedule_timeout_s`` with the shortfall.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engram_ray.config import ParallelConfig
from engram_ray.distributed.resources import NodeType, describe, node_types_from_config
from engram_ray.extraction import say

__all__ = ["Placement", "ScheduleTimeout", "autoscaler_view", "reserve", "solver_bundles"]

# A head without an autoscaling config still runs Ray's monitor, with a read-only autoscaler
# whose node types are the alive nodes, named node_<node id> (autoscaler/_private/util.py).
_READONLY_TYPE = re.compile(r"node_[0-9a-f]{56}")
NOTE_EVERY_S = 30.0  # how often a pending reservation says what it waits for
FIRST_NOTE_S = 3.0  # a reservation placed within this time says nothing


class ScheduleTimeout(TimeoutError):
    """A reservation still not placed after ``parallel.schedule_timeout_s``; the message names
    what was asked for and what the cluster lacks."""


def autoscaler_view(p: ParallelConfig) -> tuple[list[NodeType], bool]:
    """(the node types an autoscaler may add, whether an autoscaler of unknown node types
    runs). ``parallel.autoscale_node_types`` when set, else the node groups some platforms
    publish in the GCS (Ray's ``ClusterConfig``, which Ray Train and Ray Data read too). Ray's
    open-source autoscalers (v1: ``ray start --autoscaling-config``, KubeRay's default; v2, as
    of Ray 2.60) publish no such thing, only a status, which tells that one runs but not what
    it may add."""
    if p.autoscale_node_types:
        return node_types_from_config(p.autoscale_node_types), False
    types = _reported_node_types()
    return (types, False) if types else ([], _autoscaler_running())


def _reported_node_types() -> list[NodeType]:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: absent or changed means "not reported"
        return []
    if config is None:
        return []
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                     None if g.max_count < 0 else int(g.max_count))
            for g in config.node_group_configs]


def _autoscaler_running() -> bool:
    """Whether Ray's v1 monitor drives a real autoscaler: its status names node types of a
    cluster config, not only the read-only ``node_<id>`` types of a fixed cluster."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except Exception:  # noqa: BLE001 - best effort, as above
        return False
    names = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    names |= set((report.get("node_type_mapping") or {}).values())
    return any(not _READONLY_TYPE.fullmatch(n) for n in names)


@dataclass
class Placement:
    """A placed group (``None``: nothing to reserve, e.g. zero-resource actors)."""

    group: object | None
    bundles: int

    def strategy(self, index: int) -> dict:
        """Actor or task options that put it in bundle ``index`` (mod the bundle count)."""
        if self.group is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=index % self.bundles)}

    def release(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def reserve(bundles: Sequence[dict], strategy: str, what: str, timeout_s: float | None,
            log: TextIO | None = None) -> Placement:
    """Create a placement group of ``bundles`` and wait until it is placed; ``what`` names
    it in what is printed. Raises :class:`ScheduleTimeout` (the group removed) after
    ``timeout_s`` seconds (``None``: wait forever)."""
    if not bundles or not all(bundles):  # Ray refuses empty bundles: nothing to hold
        return Placement(None, 0)
    group = placement_group(list(bundles), strategy=strategy)
    t0 = time.monotonic()
    note_at = t0 + FIRST_NOTE_S
    while not group.wait(timeout_seconds=1.0):
        now = time.monotonic()
        if timeout_s is not None and now - t0 >= timeout_s:
            remove_placement_group(group)
            raise ScheduleTimeout(
                f"{what} still not placed after {now - t0:.0f}s (parallel.schedule_timeout_s="
                f"{timeout_s:g}): {_shortfall(bundles)}; nothing was committed")
        if now >= note_at:
            say(log, f"waiting for the cluster to place {what} ({len(bundles)} bundle(s): "
                     f"{_summary(bundles)}); {_cluster_now()}; an autoscaler may be adding "
                     f"nodes (gives up after parallel.schedule_timeout_s={timeout_s})")
            note_at = now + NOTE_EVERY_S
    return Placement(group, len(bundles))


def _summary(bundles: Sequence[dict]) -> str:
    kinds: dict[str, int] = {}
    for b in bundles:
        kinds[describe(b)] = kinds.get(describe(b), 0) + 1
    return ", ".join(f"{n} × {k}" for k, n in kinds.items())


def _cluster_now() -> str:
    total, free = ray.cluster_resources(), ray.available_resources()
    return "the cluster has " + ", ".join(
        f"{total.get(k, 0.0):g} {k} ({free.get(k, 0.0):g} free)" for k in ("CPU", "GPU"))


def _shortfall(bundles: Sequence[dict]) -> str:
    """What the bundles need in all against what is free now, per resource short."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    free = ray.available_resources()
    short = {k: v - free.get(k, 0.0) for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
    biggest = {k: max(b.get(k, 0.0) for b in bundles) for k in need}
    lack = ("short of " + describe(short) + " free") if short else (
        "enough free in all, but no node has room for a bundle of " + describe(biggest))
    return f"needs {describe(need)} ({_summary(bundles)}), {lack}; {_cluster_now()}"


def solver_bundles(slots: int, bundle: dict, free: dict | None = None) -> int:
    """Solver bundles to ask for now: the ``slots`` the cores allow, cut to what is ``free``
    (default: free at this moment, so a busy cluster is not asked for more than it has), at
    least one (an autoscaler adds a node for it)."""
    free = ray.available_resources() if free is None else free
    fit = min((math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()),
              default=slots)
    return max(1, min(slots, fit))
