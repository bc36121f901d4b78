"""The schedulability check, on made-up clusters: a config that can never run fails at once
with one line naming the shortfall and the config keys that fix it."""

from __future__ import annotations

import pytest

from engram_ray.config import ParallelConfig
from engram_ray.distributed.resources import (
    NodeType,
    ResourceError,
    check_schedulable,
    node_types_from_config,
    reserved,
)


def test_default_config_on_a_two_core_node_is_refused_naming_the_keys():
    p = ParallelConfig(stages=2, replicas=1)  # 2 actors × 1 CPU + feeder + encode = 3.25
    with pytest.raises(ResourceError) as e:
        check_schedulable(p, [{"CPU": 2.0}])
    msg = str(e.value)
    assert "\n" not in msg
    assert "3.25 CPUs" in msg and "has 2" in msg
    assert "parallel.num_cpus" in msg and "parallel.encode_num_cpus" in msg


def test_fractional_config_fits_and_reports_its_reservation():
    p = ParallelConfig(stages=2, replicas=2, num_cpus=0.25, encode_num_cpus=0.25,
                       solver_num_cpus=0.25)
    r = check_schedulable(p, [{"CPU": 2.0}])
    assert r.total_cpus == pytest.approx(4 * 0.25 + 2 * 0.25 + 0.25)
    assert r == reserved(p)


def test_an_actor_larger_than_every_node_is_refused_even_if_the_total_fits():
    p = ParallelConfig(num_cpus=3.0, encode_num_cpus=0.5, solver_num_cpus=1.0)
    with pytest.raises(ResourceError, match="largest node has 2"):
        check_schedulable(p, [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}])


def test_gpus_and_solver_tasks_are_checked():
    with pytest.raises(ResourceError, match="parallel.num_gpus"):
        check_schedulable(ParallelConfig(num_gpus=1.0, num_cpus=0.5), [{"CPU": 8.0}])
    with pytest.raises(ResourceError, match="parallel.solver_num_cpus"):
        check_schedulable(ParallelConfig(num_cpus=0.5, solver_num_cpus=4.0), [{"CPU": 2.0}])
    check_schedulable(ParallelConfig(num_gpus=1.0, num_cpus=0.5), [{"CPU": 8.0, "GPU": 1.0}])


def test_what_an_autoscaler_may_add_counts():
    p = ParallelConfig(stages=4, replicas=2, num_cpus=2.0)
    with pytest.raises(ResourceError):
        check_schedulable(p, [{"CPU": 4.0}])
    check_schedulable(p, [{"CPU": 4.0}], max_extra_cpus=32.0)


def test_watchdog_fails_after_the_timeout_with_a_diagnostic_and_resets_on_progress():
    from engram_ray.distributed.watchdog import StallError, Watchdog

    now = [0.0]
    dog = Watchdog(10.0, "feeding shards", clock=lambda: now[0])
    dog.observe(0)
    now[0] = 9.0
    dog.check()  # not yet
    dog.observe(5)  # rows moved: the clock restarts
    now[0] = 18.0
    dog.check()
    now[0] = 19.5
    with pytest.raises(StallError, match=r"no progress for 10s while feeding shards.*"
                                         r"stall_timeout_s=10.*2 actor\(s\) pending"):
        dog.check(lambda: "2 actor(s) pending creation")
    Watchdog(None, "x", clock=lambda: 1e9).check()  # None: never


# --- what an autoscaler may add: node types (issue 21) ---

GPU_TYPE = NodeType("gpu", {"CPU": 1.0, "GPU": 1.0}, 2)


def test_a_gpu_request_on_a_cluster_at_zero_workers_passes_when_a_node_type_holds_it():
    p = ParallelConfig(num_gpus=1.0, num_cpus=0.25, encode_num_cpus=0.25, solver_num_cpus=0.25)
    head = [{"CPU": 0.0}]
    with pytest.raises(ResourceError, match=r"one stage actor needs 0.25 CPUs and 1 GPUs but "
                                            r"the largest node has 0 and 0 \(lower "
                                            r"parallel.num_cpus or parallel.num_gpus\).*"
                                            r"if an autoscaler may add "
                                            r"nodes, name its node types in "
                                            r"parallel.autoscale_node_types$"):
        check_schedulable(p, head)  # no node types known: the live nodes are all there is
    check_schedulable(p, head, node_types=[GPU_TYPE])


def test_a_request_no_node_type_holds_is_refused_naming_the_key():
    p = ParallelConfig(num_gpus=2.0, num_cpus=0.25, encode_num_cpus=0.25, solver_num_cpus=0.25)
    with pytest.raises(ResourceError) as e:
        check_schedulable(p, [{"CPU": 0.0}], node_types=[GPU_TYPE])
    msg = str(e.value)
    assert "\n" not in msg
    assert "one stage actor needs 2 GPUs but the largest node or node type has 1" in msg
    assert "parallel.num_gpus" in msg
    solver = ParallelConfig(num_cpus=0.25, encode_num_cpus=0.25, solver_num_gpus=4.0)
    with pytest.raises(ResourceError, match="a solver task needs 4 GPUs.*solver_num_gpus"):
        check_schedulable(solver, [{"CPU": 4.0}], node_types=[GPU_TYPE])


def test_resources_must_fit_one_node_together():
    """4 CPUs exist on one node type and a GPU on another, but no node has both."""
    p = ParallelConfig(num_cpus=4.0, num_gpus=1.0, encode_num_cpus=0.25, solver_num_cpus=0.25)
    with pytest.raises(ResourceError, match=r"needs 4 CPU \+ 1 GPU on one node but no node or "
                                            r"node type has all of it"):
        check_schedulable(p, [{"CPU": 8.0}], node_types=[GPU_TYPE])


def test_max_workers_bounds_the_totals_and_an_unbounded_type_lifts_them():
    p = ParallelConfig(stages=2, replicas=2, num_gpus=1.0, num_cpus=0.25, encode_num_cpus=0.25,
                       solver_num_cpus=0.25)  # 4 actors × 1 GPU
    with pytest.raises(ResourceError, match="= 4 GPUs, but the cluster has 2 with every node "
                                            "its autoscaler may add"):
        check_schedulable(p, [{"CPU": 1.0}], node_types=[GPU_TYPE])
    check_schedulable(p, [{"CPU": 1.0}], node_types=[NodeType("gpu", GPU_TYPE.resources)])
    check_schedulable(p, [{"CPU": 1.0}], node_types=[NodeType("gpu", GPU_TYPE.resources, 4)])
    # A type the autoscaler may never add (max_workers 0) holds nothing.
    with pytest.raises(ResourceError, match="parallel.num_gpus"):
        check_schedulable(p, [{"CPU": 1.0}], node_types=[NodeType("gpu", GPU_TYPE.resources, 0)])


def test_an_autoscaler_of_unknown_node_types_refuses_nothing_up_front():
    p = ParallelConfig(stages=4, num_gpus=8.0, num_cpus=64.0)
    check_schedulable(p, [{"CPU": 0.0}], may_grow=True)
    # autoscale_max_cpus (the older key) adds CPUs of unknown shape, never GPUs.
    with pytest.raises(ResourceError, match="autoscale_node_types"):
        check_schedulable(ParallelConfig(num_gpus=1.0), [{"CPU": 2.0}], max_extra_cpus=64.0)


def test_node_types_from_config_and_bundles():
    types = node_types_from_config({"gpu": {"CPU": 8, "GPU": 1, "max_workers": 4},
                                    "cpu": {"CPU": 16}})
    assert types == [NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 4),
                     NodeType("cpu", {"CPU": 16.0}, None)]
    r = reserved(ParallelConfig(num_cpus=0.5, num_gpus=1.0, solver_num_cpus=2.0))
    assert r.actor_bundle() == {"CPU": 0.5, "GPU": 1.0}
    assert r.solver_bundle() == {"CPU": 2.0}  # zero amounts left out: Ray refuses them
    assert reserved(ParallelConfig(num_cpus=0.0)).actor_bundle() == {}


def test_solver_bundles_fit_what_is_free_and_are_at_least_one():
    from engram_ray.distributed.placement import solver_bundles

    assert solver_bundles(4, {"CPU": 1.0}, {"CPU": 2.5}) == 2
    assert solver_bundles(2, {"CPU": 0.25}, {"CPU": 8.0}) == 2
    assert solver_bundles(3, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}) == 1  # no GPU free: one
    assert solver_bundles(3, {"CPU": 1.0}, {}) == 1


@pytest.mark.parametrize(("key", "value", "match"), [
    ("autoscale_node_types", {"gpu": {"GPU": -1}}, r"autoscale_node_types.gpu.GPU must be a "
                                                   r"number ≥ 0"),
    ("autoscale_node_types", {"gpu": {"CPU": 1, "max_workers": 1.5}},
     "gpu.max_workers must be an integer"),
    ("autoscale_node_types", {"gpu": 8}, "autoscale_node_types.gpu must be a mapping"),
    ("autoscale_node_types", [], "non-empty mapping"),
    ("schedule_timeout_s", 0, "parallel.schedule_timeout_s must be a number of seconds > 0"),
    ("connect_timeout_s", None, "parallel.connect_timeout_s must be a number of seconds > 0"),
    ("connect_timeout_s", "soon", "parallel.connect_timeout_s"),
])
def test_new_parallel_keys_are_validated(key, value, match):
    from engram_ray.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        ParallelConfig(**{key: value})
    assert ParallelConfig(schedule_timeout_s=None).schedule_timeout_s is None


@pytest.mark.ray
def test_a_group_that_cannot_be_placed_times_out_naming_the_shortfall(ray_cluster):
    """The session's 3-node cluster has no GPU and no autoscaler: a GPU bundle waits, says
    what for, and is given up (and removed) after the timeout."""
    import io

    import ray

    from engram_ray.distributed.placement import ScheduleTimeout, autoscaler_view, reserve

    assert autoscaler_view(ParallelConfig()) == ([], False)  # a fixed cluster, seen as such
    log = io.StringIO()
    with pytest.raises(ScheduleTimeout) as e:
        reserve([{"CPU": 0.25, "GPU": 1.0}] * 2, "SPREAD", "2 stage actor(s)", 4.0, log)
    msg = str(e.value)
    assert "\n" not in msg
    assert "2 stage actor(s) still not placed after" in msg
    assert "parallel.schedule_timeout_s=4" in msg and "short of 2 GPU free" in msg, msg
    assert "waiting for the cluster to place 2 stage actor(s)" in log.getvalue()
    states = {g["state"] for g in ray.util.placement_group_table().values()}
    assert "PENDING" not in states  # the group was removed, nothing left waiting
    placed = reserve([{"CPU": 0.25}] * 2, "PACK", "2 stage actor(s)", 60.0, log)
    assert placed.bundles == 2 and placed.strategy(3)["scheduling_strategy"]
    placed.release()
