"""Joining Ray, and dividing the cluster's cores between stages, ingest and solvers.

A local Ray (started here when there is no cluster) may advertise more logical CPUs than the
machine has cores, so that every reservation can be scheduled; how many threads and tasks
actually run is then decided from the cores (:func:`cluster_cores`), not from that number.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping

import ray

from engram_ray.config import ParallelConfig

__all__ = ["ConnectTimeout", "actor_threads", "cluster_cores", "cpus_needed", "ensure_ray",
           "ingest_concurrency", "normal_priority", "probe_address", "solver_slots"]

class ConnectTimeout(TimeoutError):
    """A Ray address where nothing answers; the message names it (exit 1 from the CLI)."""


# Cores of the machine when this process started the local Ray itself (None: joined a cluster,
# whose advertised CPUs are taken as its cores).
_LOCAL_CORES: int | None = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ensure_ray(address: str | None = None, min_cpus: float = 0.0, *,
               connect_timeout_s: float = 60.0) -> None:
    """Join ``address`` (or RAY_ADDRESS, or a local ``ray start`` head that Ray finds on its
    own) without passing resources, else start a local Ray; no-op when connected.

    ``address`` (or RAY_ADDRESS) ``"local"`` always starts a new local Ray, never joining one
    that runs beside it. A local Ray advertises at least ``min_cpus`` logical CPUs: on a small
    machine (2 cores) the stage actors' reservations would otherwise leave Ray Data's read
    tasks no CPU to be scheduled on, and the stream would wait forever. An address that does
    not answer within ``connect_timeout_s`` fails naming it (:func:`probe_address`): Ray itself
    retries such an address for as long as it runs.
    """
    global _LOCAL_CORES
    if ray.is_initialized():
        return
    fresh = (address or os.environ.get("RAY_ADDRESS")) == "local"
    if not fresh and (address is not None or os.environ.get("RAY_ADDRESS")):
        key = "parallel.address" if address is not None else "RAY_ADDRESS"
        probe_address(address or os.environ["RAY_ADDRESS"], key, connect_timeout_s)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return
    cpus = max(_cores(), math.ceil(min_cpus))
    try:
        # "local" (Ray's own name for it): a new Ray for this process, even when another
        # one runs on the machine; None: Ray may join a `ray start` head it finds.
        ray.init(address="local" if fresh else None, num_cpus=cpus, include_dashboard=False,
                 log_to_driver=False)
        _LOCAL_CORES = _cores()
    except ValueError as e:
        # ray.init() joins a local `ray start` head on its own, and then refuses resources:
        # the cluster's own resources are what there is, so join it as it is.
        if "existing cluster" not in str(e):
            raise
        ray.init(include_dashboard=False, log_to_driver=False)


def probe_address(address: str, key: str, timeout_s: float) -> None:
    """Raise :class:`ConnectTimeout` naming ``address`` (and ``key``, where it came from) when
    nothing accepts a TCP connection there within ``timeout_s`` seconds, retrying a refused
    connection (a head still starting) until then. ``auto`` and addresses Ray resolves from
    files are left to Ray; ``localhost`` is tried as Ray would dial it (the node's IP)."""
    if address == "auto":
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        if address.startswith("ray://"):
            host, port = target, "10001"  # the Ray client's default port
        else:
            raise ValueError(f"{key} {address!r} is not host:port (or ray://host:port)")
    host = host.strip("[]")
    hosts = [host]
    if host in ("localhost", "127.0.0.1"):
        from ray._private.services import get_node_ip_address

        hosts.append(get_node_ip_address())
    deadline = time.monotonic() + timeout_s
    error: OSError | None = None
    while True:
        for h in hosts:
            try:
                with socket.create_connection((h, int(port)),
                                              timeout=max(0.1, deadline - time.monotonic())):
                    pass
            except OSError as e:
                error = e
                continue
            if not address.startswith("ray://"):
                _check_gcs(f"{h}:{port}", key, address)
            return
        if time.monotonic() >= deadline:
            raise ConnectTimeout(
                f"no Ray cluster answers at {key} {address!r} within {timeout_s:g}s "
                f"(parallel.connect_timeout_s): {error.strerror or error}")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _check_gcs(target: str, key: str, address: str) -> None:
    """Something answers at ``target``: can a GCS client join it? It refuses another server
    (or a missing auth token) at once and a silent one after Ray's own timeout (~40 s), where
    ``ray.init`` would keep retrying."""
    from ray._raylet import GcsClient

    try:
        GcsClient(address=target)
    except Exception as e:  # noqa: BLE001 - whatever the client raises, the address is wrong
        raise ConnectTimeout(f"cannot join a Ray cluster at {key} {address!r}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from None


def cpus_needed(p: ParallelConfig) -> float:
    """Logical CPUs the pipeline reserves at once: actors, one encode and one read task, and
    one solver task."""
    return p.stages * p.replicas * p.num_cpus + 2 * p.encode_num_cpus + p.solver_num_cpus


def cluster_cores() -> float:
    """Cores the pipeline may keep busy: the machine's when Ray was started here, else the
    CPUs the alive nodes advertise."""
    if _LOCAL_CORES is not None and len(ray.nodes()) == 1:
        return float(_LOCAL_CORES)
    return float(sum(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]))


def actor_threads(num_cpus: float, nodes: list[str], cores: Mapping[str, int]) -> list[int]:
    """Torch threads per stage actor, given the node each runs on and that node's cores.

    As many threads as the actor reserves (at least one); an actor alone on its node gets
    every core of it (nothing else there computes while it streams: ingest is light, and
    solvers start after the stream).
    """
    per_node = Counter(nodes)
    own = max(1, round(num_cpus))
    return [max(own, int(cores[n])) if per_node[n] == 1 else own for n in nodes]


def ingest_concurrency(p: ParallelConfig, cores: float, files: int) -> int:
    """Read + tokenize tasks at once when ``parallel.encode_concurrency`` is unset: the cores
    the stage actors leave (at least one task, at most one per file). Every task is a process
    importing transformers, so on a small machine more of them only steal the stages' cores.
    """
    if p.encode_concurrency is not None:
        return p.encode_concurrency
    free = cores - p.stages * p.replicas * max(p.num_cpus, 1.0)
    per_task = max(p.encode_num_cpus, 1.0)
    return max(1, min(files, math.floor(free / per_task)))


def solver_slots(p: ParallelConfig, cores: float, gpus: float = 0.0) -> int:
    """Solver tasks to keep in flight: the cores (or GPUs) divided by what one task reserves.
    Groups beyond that wait unreduced, so at most that many reduced Σ sit in the store."""
    if p.solver_num_gpus > 0:
        return max(1, math.floor(gpus / p.solver_num_gpus))
    return max(1, math.floor(cores / max(p.solver_num_cpus, 1.0)))


def normal_priority() -> int:
    """Run every thread of this worker process at niceness 0; returns the niceness now.

    Ray starts worker processes at niceness 15 (so the raylet and drivers stay responsive).
    For the pipeline's compute (stage actors, solver and encode tasks) that means any other
    process on the node, a driver or another job's, takes the cores first: measured on a shared
    2-core machine, the same micro-batches ran 2-8× slower in a nice-15 actor than in a nice-0
    process, worst with 2 threads (a descheduled OpenMP thread stalls its team). Linux keeps a
    niceness per thread, so every thread is set (threads created later inherit it). Without
    the right to raise priority (no CAP_SYS_NICE) the niceness stays as it was.
    """
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process-wide call is all there is
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:  # no permission, or the thread has just ended
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)
