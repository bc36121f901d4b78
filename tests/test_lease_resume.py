"""Leases that let a crashed job resume (issue 21.7).

Before: after ``kill -9`` of a checkpointed extract, rerunning the same command failed with
``LeaseHeld`` until the lease expired (``lease_timeout_s`` 3600 by default), though its holder
was a dead PID on the same host. Now a lease records its holder's host, PID, boot id, PID
namespace and start time, and a same-host holder whose process is gone is broken at once; a
live holder is still refused, and one on another host waits for the (now 60 s) expiry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from engram_ray.config import StoreConfig
from engram_ray.io.lease import Lease, LeaseHeld, holder_gone, process_identity
from engram_ray.io.storage import Storage


def _body(pid: int, **over) -> dict:
    return {"host": socket.gethostname(), "pid": pid, **process_identity(pid), **over}


def test_holder_gone_only_when_provably_dead():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = _body(proc.pid)
        assert alive.get("start") and not holder_gone(alive)
        assert holder_gone({**alive, "start": "1"})  # the PID now names another process
        assert not holder_gone({**alive, "host": "another-host"})  # can't tell: wait for expiry
        assert not holder_gone({**alive, "pidns": "pid:[1]"})  # another PID namespace
        assert not holder_gone(_body(os.getpid()))  # ourselves
        proc.send_signal(signal.SIGKILL)
        time.sleep(0.2)
        assert holder_gone(alive)  # killed, not yet reaped: a zombie is gone too
    finally:
        proc.kill()
        proc.wait()
    assert holder_gone(alive)  # reaped: no such PID
    assert StoreConfig().lease_timeout_s == 60.0


def test_a_dead_holders_lease_is_taken_over_at_once(tmp_path, capsys):
    where = Storage(str(tmp_path / "_leases" / "r"))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    body = {**_body(proc.pid), "holder": f"{socket.gethostname()} pid {proc.pid}",
            "created": time.time(), "expires": time.time() + 3600, "token": "dead0000"}
    os.makedirs(os.path.dirname(where.root))
    where.write_bytes("", json.dumps(body).encode())
    with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
        Lease(where).acquire()  # alive: refused
    proc.kill()
    proc.wait()
    lease = Lease(where).acquire()  # gone: broken at once, an hour before its expiry
    assert json.loads(where.read_bytes())["token"] == lease.token
    assert "is gone" in capsys.readouterr().err


_DRIVER = """
import os, pathlib, sys, time
import engram_ray.distributed.executor as executor
real, calls = executor.feed_slice, []
def feed(*args, **kw):  # block for good in the second slice, once the first is checkpointed
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path(os.environ["ENGRAM_TEST_MARK"]).write_text(str(os.getpid()))
        time.sleep(3600)
    return real(*args, **kw)
executor.feed_slice = feed
from engram_ray.cli import run
run(["extract", sys.argv[1]])
"""


@pytest.fixture()
def shards(tmp_path):
    rng = np.random.default_rng(11)
    words = "the author wrote a book about the sea river town award born quick".split()
    root = tmp_path / "data"
    root.mkdir()
    for shard in range(3):
        rows = [{"concept": ["ada", "bo"][i % 2] if i % 3 else None,
                 "question": f"who {' '.join(rng.choice(words, 5))}?",
                 "answer": " ".join(rng.choice(words, 4))} for i in range(9)]
        pq.write_table(pa.Table.from_pylist(rows), root / f"part-{shard}.parquet")
    return root


def _raw(model_dir, data, runs, run_id, address=None, **store):
    return {"model": {"path": model_dir},
            "data": {"paths": [str(data)], "prompt_column": "question",
                     "answer_column": "answer", "max_length": 64, "batch_size": 4},
            "parallel": {"stages": 2, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                         "solver_num_cpus": 0.25, "max_in_flight": 2, "address": address},
            "store": {"uri": str(runs), "run_id": run_id, **store}}


@pytest.mark.ray
@pytest.mark.slow
def test_kill_9_mid_run_then_the_same_command_resumes_at_once(ray_cluster, tmp_path, shards,
                                                              tiny_llama_dir):
    """A checkpointed extract is SIGKILLed in its second slice; the same command run at once
    resumes from the checkpoint without any flag (the lease's timeout is an hour: only the
    dead-holder check frees it) and equals one uninterrupted pass. While the first writer
    lived, a second was refused."""
    from engram_ray import open_run
    from engram_ray.cli import main
    from engram_ray.config import ExtractConfig
    from engram_ray.io.store import run_lease
    from engram_ray.local import extract_from_config

    runs, mark = tmp_path / "runs", tmp_path / "blocked"
    raw = _raw(tiny_llama_dir, shards, runs, "r", ray_cluster.address, checkpoint_shards=1,
               lease_timeout_s=3600)
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "ENGRAM_TEST_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while not mark.exists():
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.time() < deadline, "the driver never reached its second slice"
            time.sleep(0.2)
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
            run_lease(str(runs / "r"))  # a second live writer is refused
    finally:
        proc.kill()
        proc.wait()
    state = json.loads((runs / "_checkpoints" / "r" / "state.json").read_text())
    assert len(state["sources"]) == 1 and not (runs / "r" / "_COMMITTED").exists()

    assert main(["extract", str(cfg)]) == 0  # the same command, at once, no flag
    run = open_run(str(runs / "r"))
    assert run.info["resumed"]["shards"] == 1 and run.info["data"]["rows"] == 18
    one = open_run(extract_from_config(ExtractConfig.from_dict(
        _raw(tiny_llama_dir, shards, runs, "one"))).uri)
    assert run.concepts == one.concepts and run.modules == one.modules
    for c in one.concepts:
        for m in one.modules:
            x, y = run.engram(c, m).double(), one.engram(c, m).double()
            assert float(torch.linalg.norm(x - y) / torch.linalg.norm(y)) < 1e-5, (c, m)
