"""The schedulability check, on made-up clusters: a config that can never run fails at once
with one line naming the shortfall and the config keys that fix it."""

from __future__ import annotations

import pytest

from engram_ray.config import ParallelConfig
from engram_ray.distributed.resources import ResourceError, check_schedulable, reserved


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
