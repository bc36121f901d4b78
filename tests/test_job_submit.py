"""``ray job submit`` against a real Ray head with its job server, as on a cluster.

A head is started with ``ray start --head --block`` (the job server comes from ``ray[default]``,
the ``cluster`` extra) on free ports, with its own ``RAY_TMPDIR`` and its own auth token, so
it never meets the test session's Ray or another Ray on the machine. An extraction is
submitted with a working dir holding the config and a Parquet shard, and its committed run is
found as docs/cluster.md says (the submission id is the run id; the log's ``{"run"`` line) and
opened. The head's processes — and only those — are stopped
by process id afterwards (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
RAY = str(BIN / "ray")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Head:
    address: str  # the job server: http://127.0.0.1:PORT
    env: dict
    log: pathlib.Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def head_env(tmp: str) -> dict:
    # Nothing of the test session's Ray (its address, its auth mode) leaks into this one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def start_head(tmp: str, env: dict) -> tuple[subprocess.Popen, str]:
    gcs, dash, agent, agent_grpc, metrics, client, runtime_env = free_ports(7)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2", "--disable-usage-stats",
           f"--temp-dir={tmp}"]
    log = open(os.path.join(tmp, "head.log"), "w")  # the child keeps its own copy
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc, f"http://127.0.0.1:{dash}"


def wait_for_job_server(proc: subprocess.Popen, head: Head, timeout: float = 90) -> None:
    req = urllib.request.Request(f"{head.address}/api/version",
                                 headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited {proc.returncode}:\n{head.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no job server at {head.address} after {timeout}s:\n{head.log.read_text()[-3000:]}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): job drivers run in sessions of their own,
    so the head's process group alone would miss them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to ``ray start`` and every process it started, by pid (Ray's
    GCS and raylet drain for up to 30 s on SIGTERM: nothing here needs that)."""
    pids = [*descendants(proc.pid), proc.pid]
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(alive(p) for p in pids if p != proc.pid):
        proc.poll()
        time.sleep(0.25)
    signal_all([p for p in [*descendants(proc.pid), *pids] if alive(p)], signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def head():
    # Short and private: Ray's Unix socket paths under it must stay below ~107 bytes.
    tmp = tempfile.mkdtemp(prefix="erjob-", dir="/tmp")
    env = head_env(tmp)
    proc, address = start_head(tmp, env)
    h = Head(address, env, pathlib.Path(tmp) / "head.log")
    try:
        wait_for_job_server(proc, h)
        yield h
    finally:
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, tiny_llama_dir):
    """The working dir a user would submit: the config and a shard (the model stays outside)."""
    root = tmp_path_factory.mktemp("jobsubmit")
    wd = root / "wd"
    (wd / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), wd / "data" / "part-0.parquet")
    cfg = {
        "model": {"path": tiny_llama_dir},
        "data": {"paths": ["data"], "concept_column": "author", "prompt_column": "question",
                 "answer_column": "answer", "max_length": 64, "batch_size": 4},
        "parallel": {"stages": 2, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                     "solver_num_cpus": 0.25},
        # Absolute: a relative store.uri would resolve inside the job's copy of the working dir.
        "store": {"uri": str(root / "runs")},
    }
    (wd / "extract.yaml").write_text(yaml.safe_dump(cfg))
    return wd


def ray_job(head: Head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``ray job ARGS`` against the head. The job server answers before the node's agent that
    runs jobs has registered (a loaded machine: tens of seconds); Ray then refuses a
    submission with "No available agent to submit job, please try again later", and the
    submission is retried as Ray's message says, up to 90 s."""
    deadline = time.monotonic() + 90
    while True:
        out = subprocess.run([RAY, "job", args[0], "--address", head.address, *args[1:]],
                             env=head.env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


def extract_entrypoint(*overrides: str) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, str(ROOT / "jobs" / "extract.py"), "extract.yaml", *sets]


def job_api(head: Head, path: str) -> dict:
    """The job server's REST API (what ``ray job status`` / ``ray job logs`` call)."""
    req = urllib.request.Request(f"{head.address}/api/jobs/{path}",
                                 headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def job_status(head: Head, job_id: str) -> str:
    return job_api(head, job_id)["status"]


def job_stdout(head: Head, job_id: str) -> str:
    return job_api(head, f"{job_id}/logs")["logs"]


def test_submitted_extraction_commits_a_run(head, job_dir):
    """docs/cluster.md, "Locally": the submission id is the run id, and
    ``ray job logs ID | grep '^{"run"'`` finds the run."""
    from engram_ray import open_run  # bound to the run's model: engrams are formed on read

    sub = ray_job(head, "submit", "--submission-id", "extract-ok", "--working-dir",
                  str(job_dir), "--", *extract_entrypoint(), timeout=180)
    assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
    assert job_status(head, "extract-ok") == "SUCCEEDED"
    logs = ray_job(head, "logs", "extract-ok").stdout
    found = [json.loads(ln) for ln in logs.splitlines() if ln.startswith('{"run"')]
    uri = str(job_dir.parent / "runs" / "extract-ok")
    assert found == [{"run": uri, "run_id": "extract-ok", "job": "extract-ok"}], logs[-2000:]
    run = open_run(uri)
    assert run.concepts == ["ada", "bo"]
    name = "model.layers.0.mlp.down_proj"
    assert np.isfinite(run.engram("ada", name).numpy()).all()


def test_unschedulable_config_fails_fast(head, job_dir):
    job_id = "extract-too-big"
    sub = ray_job(head, "submit", "--submission-id", job_id, "--no-wait", "--working-dir",
                  str(job_dir), "--", *extract_entrypoint("parallel.num_cpus=64",
                                                          "store.run_id=too-big"))
    assert sub.returncode == 0, sub.stderr[-2000:]
    deadline, status = time.monotonic() + 90, "UNKNOWN"
    try:
        while time.monotonic() < deadline and status not in TERMINAL:
            time.sleep(1)
            status = job_status(head, job_id)
    finally:
        if status not in TERMINAL:
            ray_job(head, "stop", "--no-wait", job_id)
    assert status == "FAILED", f"still {status} after 90 s"
    assert "parallel.num_cpus" in job_stdout(head, job_id)
    assert not (job_dir.parent / "runs" / "too-big").exists()


def test_relative_store_uri_in_a_job_fails_naming_it(head, job_dir):
    """A relative ``store.uri`` under ``--working-dir`` would commit into Ray's temporary copy
    of the working dir (and the printed URI would point nowhere): the job fails at once,
    naming the key and the fix, and nothing is written beside the submitted directory."""
    job_id = "extract-relative-store"
    sub = ray_job(head, "submit", "--submission-id", job_id, "--working-dir", str(job_dir),
                  "--", *extract_entrypoint("store.uri=runs", "store.run_id=rel"), timeout=120)
    assert sub.returncode != 0
    assert job_status(head, job_id) == "FAILED"
    logs = job_stdout(head, job_id)
    assert "store.uri 'runs' is a relative path" in logs and "s3://" in logs, logs[-2000:]
    assert not (job_dir / "runs").exists() and not (job_dir.parent / "runs" / "rel").exists()
