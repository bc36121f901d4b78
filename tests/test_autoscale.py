"""Reservations an autoscaler sees, against Ray's fake multi-node autoscaler (real autoscaler
logic; its nodes are raylets on this machine), and a Ray address that does not answer.

The head is ``RAY_FAKE_CLUSTER=1 ray start --head --block --num-cpus 0
--autoscaling-config=CFG`` (``../shared/RAY_NOTES.md``) in a session of its own, with its own
``--temp-dir``, port and auth token, so it never meets the test session's Ray; it and the fake
nodes its monitor starts (all in its session) are killed by session id afterwards. ``ray stop``
and ``AutoscalingCluster.start()/shutdown()`` would stop every Ray on the machine. The config
is written here: the wheel does not ship the fake provider's example YAML.

The head has no CPU and no worker runs at first, so nothing of an extraction can run until the
autoscaler adds a ``{CPU: 1, GPU: 1}`` node for the stage actor's placement group. The fake
GPU sets ``CUDA_VISIBLE_DEVICES`` but torch sees no CUDA here: the stage runs on the CPU. The
driver is the CLI in a subprocess (this process may hold the session's Ray).
"""

from __future__ import annotations

import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

BIN = pathlib.Path(sys.executable).parent
WORKER = {"CPU": 1, "GPU": 1, "object_store_memory": 150_000_000}
MODEL = {"factory": "engram_ray.models.sequential:mlp",
         "kwargs": {"sizes": [6, 12, 12, 3], "seed": 3}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_yaml(gcs: str) -> dict:
    """A cluster-launcher config for the fake_multinode provider: a 0-CPU head and one
    GPU worker type starting at zero nodes."""
    return {
        "cluster_name": "engram-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": WORKER, "node_config": {}, "min_workers": 0,
                           "max_workers": 2}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands")},
    }


def ray_env(tmp: str, token: str) -> dict:
    """This process's environment without the session Ray's RAY_* (its address, its tmp)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (Linux /proc: field 6 of stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(entry))
    return out


def kill_session(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to every process of the head's session (fake nodes included)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_pids(proc.pid):
            proc.poll()
            time.sleep(0.25)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fake_cluster():
    """(GCS address, driver environment) of a fake autoscaling cluster with zero workers."""
    from ray._private.services import get_node_ip_address

    tmp = tempfile.mkdtemp(prefix="erfake-", dir="/tmp")  # short: Unix socket paths
    port, client, dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(7))
    gcs = f"{get_node_ip_address()}:{port}"  # Ray dials the node's IP, never 127.0.0.1
    cfg = pathlib.Path(tmp) / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(cluster_yaml(gcs)))
    env = ray_env(tmp, secrets.token_hex(32))
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    log = pathlib.Path(tmp) / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus",
             "0", f"--autoscaling-config={cfg}", "--temp-dir", tmp, "--include-dashboard=false",
             "--disable-usage-stats", "--object-store-memory", "100000000",
             # Every port of its own: another Ray on the machine may hold Ray's defaults.
             f"--ray-client-server-port={client}", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"],
            env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_autoscaler(proc, pathlib.Path(tmp), log)
        yield gcs, env
    finally:
        kill_session(proc)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_autoscaler(proc: subprocess.Popen, tmp: pathlib.Path, log: pathlib.Path) -> None:
    """Until the monitor has published its first status (what the driver reads)."""
    monitor = tmp / "session_latest" / "logs" / "monitor.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        # Twice: the status the driver reads is published after the first one is logged.
        if monitor.exists() and monitor.read_text(errors="replace").count("Autoscaler status") > 1:
            return
        time.sleep(0.5)
    pytest.fail(f"the fake autoscaler did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("autoscale-data")
    for shard in range(2):
        rows = [{"concept": [None, "c0", "c1"][i % 3], "x": rng.normal(size=6).tolist()}
                for i in range(12)]
        pq.write_table(pa.Table.from_pylist(rows), root / f"part-{shard}.parquet")
    return str(root)


def raw_config(shards: str, store: pathlib.Path, **parallel) -> dict:
    return {"model": MODEL,
            "data": {"paths": [shards], "features_column": "x", "batch_size": 8},
            "parallel": {"stages": 1, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                         "solver_num_cpus": 0.25, "progress_interval_s": None, **parallel},
            # One machine: the fake nodes share this disk.
            "store": {"uri": str(store), "run_id": "run", "shared_fs": True}}


def cli_extract(raw: dict, where: pathlib.Path, env: dict, timeout: float = 300
                ) -> subprocess.CompletedProcess:
    where.mkdir(parents=True, exist_ok=True)
    (where / "extract.yaml").write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "engram_ray.cli", "extract", "extract.yaml"],
                          cwd=where, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_extraction_scales_up_from_zero_and_equals_local(fake_cluster, shards, tmp_path):
    from engram_ray import open_run
    from engram_ray.config import ExtractConfig
    from engram_ray.local import extract_from_config

    gcs, env = fake_cluster
    raw = raw_config(shards, tmp_path / "runs", num_gpus=1, address=gcs, schedule_timeout_s=480)
    done = cli_extract(raw, tmp_path / "job", env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "waiting for the cluster to place" in done.stderr or "stage actors ready" in done.stderr
    run = open_run(done.stdout.strip().splitlines()[-1])
    nodes = run.info["parallel"]["nodes"]
    head = "f" * 51 + "00000"  # the fake provider's node ids: the head, then 00001, …
    assert nodes and head not in nodes, nodes  # the actor ran on a node the autoscaler added

    local = dict(raw_config(shards, tmp_path / "local"))
    oracle = open_run(extract_from_config(ExtractConfig.from_dict(local)).uri)
    assert run.concepts == oracle.concepts and run.modules == oracle.modules
    for c in oracle.concepts:
        for m in oracle.modules:
            a, b = run.engram(c, m).double(), oracle.engram(c, m).double()
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-12), (c, m)


def test_a_request_no_node_type_can_hold_fails_at_once(fake_cluster, shards, tmp_path):
    """Two GPUs per actor: no node type has them. With the types named, the run is refused
    before anything is reserved (the subprocess timeout is far below the schedule timeout)."""
    gcs, env = fake_cluster
    types = {"gpu_worker": {**WORKER, "max_workers": 2}}
    raw = raw_config(shards, tmp_path / "runs", num_gpus=2, address=gcs,
                     autoscale_node_types=types, schedule_timeout_s=3600)
    done = cli_extract(raw, tmp_path / "job", env, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    err = [ln for ln in done.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "parallel.num_gpus" in err[0] and "needs 2 GPUs" in err[0], err
    assert not (tmp_path / "runs" / "run").exists()


def test_a_pending_request_fails_after_the_schedule_timeout(fake_cluster, shards, tmp_path):
    """Node types not named (autoscaler v1 does not report them): the same request is
    waited for, said so, and given up after parallel.schedule_timeout_s naming the shortfall."""
    gcs, env = fake_cluster
    raw = raw_config(shards, tmp_path / "runs", num_gpus=2, address=gcs, schedule_timeout_s=4)
    done = cli_extract(raw, tmp_path / "job", env, timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "autoscale_node_types" in done.stderr  # the hint: name them to fail at once
    last = done.stderr.strip().splitlines()[-1]
    assert "parallel.schedule_timeout_s=4" in last and "short of" in last and "GPU" in last, last
    assert not (tmp_path / "runs" / "run").exists()


def test_an_address_that_does_not_answer_fails_naming_it(shards, tmp_path):
    port = free_port()  # closed: nothing listens there
    env = ray_env(tempfile.gettempdir(), "unused")
    raw = raw_config(shards, tmp_path / "runs", address=f"127.0.0.1:{port}",
                     connect_timeout_s=2)
    done = cli_extract(raw, tmp_path / "job", env, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert f"parallel.address '127.0.0.1:{port}'" in lines[-1], lines
    assert "parallel.connect_timeout_s" in lines[-1]
    assert not (tmp_path / "runs" / "run").exists()
