"""A known place for a job's result (docs/cluster.md, "Finding the result"): the ``jobs/``
entrypoints write to ``<store.uri>/<run id>`` with the run id taken from the Ray job's
submission id (a RayJob's ``spec.jobId``) or ``ENGRAM_RAY_RUN_ID`` when the config names
none, print one ``{"run": URI}`` JSON line and write it to ``--result-file``. The test runs
``jobs/extract.py`` as the job supervisor would (a subprocess, with the environment Ray gives
a driver) and finds the run the documented ways: ``grep '^{"run"'`` on the log, the result
file, and ``<store.uri>/<RayJob name>``."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engram_ray.io.store import open_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_id_comes_from_the_job():
    jr = load_job("jobresult")
    ray_env = {jr.RAY_JOB_CONFIG_ENV: json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "engram-extract",
                                         "job_name": "engram-extract"}})}
    assert jr.job_run_id(ray_env) == "engram-extract"
    assert jr.job_run_id({**ray_env, jr.RUN_ID_ENV: "from-pod"}) == "from-pod"
    assert jr.job_run_id({}) is None
    assert jr.job_run_id({jr.RAY_JOB_CONFIG_ENV: "not json"}) is None
    assert jr.job_run_id({jr.RAY_JOB_CONFIG_ENV: '{"metadata": null}'}) is None


@pytest.fixture(scope="module")
def job_config(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("jobresult")
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(9)]
    (root / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "part-0.parquet")
    cfg = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [str(root / "data")], "concept_column": "author",
                    "prompt_column": "question", "answer_column": "answer",
                    "max_length": 32, "batch_size": 4},
           "store": {"uri": str(root / "runs")}}
    (root / "extract.yaml").write_text(yaml.safe_dump(cfg))
    return root


def driver_env(submission_id: str) -> dict:
    """The environment Ray's job supervisor gives the driver of job ``submission_id``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ENGRAM_RAY_"))}
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": submission_id,
                                         "job_name": submission_id}})
    return env


def test_extract_job_writes_where_the_docs_say(job_config):
    result_file = job_config / "results" / "engram-extract.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "extract.py"), str(job_config / "extract.yaml"),
         "--local", "--result-file", str(result_file)],
        env=driver_env("engram-extract"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 1. The RayJob's name (its spec.jobId) is the run id: <store.uri>/engram-extract.
    expected = str(job_config / "runs" / "engram-extract")
    assert open_run(expected).concepts == ["ada", "bo"]
    # 2. `kubectl logs job/engram-extract | grep '^{"run"'` (Ray's banner may come after it).
    lines = [ln for ln in (proc.stdout + "\nJob 'engram-extract' succeeded\n").splitlines()
             if ln.startswith('{"run"')]
    assert len(lines) == 1, proc.stdout
    found = json.loads(lines[0])
    assert found == {"run": expected, "run_id": "engram-extract", "job": "engram-extract"}
    # 3. --result-file holds the same JSON.
    assert json.loads(result_file.read_text()) == found


def test_a_run_id_in_the_config_wins(job_config, capsys, monkeypatch):
    job = load_job("extract")
    monkeypatch.setenv("ENGRAM_RAY_RUN_ID", "from-env")
    cfg = str(job_config / "extract.yaml")
    assert job.run_id_override([cfg, "--set", "store.run_id=mine"], "from-env") == []
    assert job.run_id_override([cfg], "from-env") == ["--set", "store.run_id=from-env"]
    assert job.run_id_override([cfg], None) == []
    assert job.main([cfg, "--local", "--set", "store.run_id=mine"]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert found["run"] == str(job_config / "runs" / "mine") and found["job"] == "from-env"


def test_an_unwritable_result_file_fails_the_job_naming_it(job_config, capsys, monkeypatch):
    job = load_job("extract")
    monkeypatch.setenv("ENGRAM_RAY_RUN_ID", "unwritable")
    blocker = job_config / "blocker"
    blocker.write_text("a file, not a folder")
    rc = job.main([str(job_config / "extract.yaml"), "--local",
                   "--result-file", str(blocker / "r.json")])
    assert rc == 1
    assert f"--result-file {blocker / 'r.json'} failed" in capsys.readouterr().err


def test_scheduled_tick_then_gc(tmp_path, tiny_llama_dir, capsys):
    """``jobs/scheduled_edit.py QUEUE --gc-keep 1`` (the RayCronJob's entrypoint): the tick
    extends the queue's run with a new shard, then gc deletes the run it superseded (not the
    one the queue now names); a tick with nothing new deletes nothing."""
    from test_schedule import shard

    from engram_ray.config import ExtractConfig
    from engram_ray.io.catalog import list_runs
    from engram_ray.io.storage import Storage
    from engram_ray.local import extract_from_config

    q = Storage(str(tmp_path / "queue"))
    q.makedirs("shards")
    q.write_bytes("shards/part-0.parquet", shard(0))
    raw = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [q.uri_of("shards")], "prompt_column": "question",
                    "answer_column": "answer", "max_length": 32, "batch_size": 4},
           "store": {"uri": str(tmp_path / "runs"), "keep_statistics": True}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(raw))
    first = extract_from_config(ExtractConfig.from_dict(raw)).uri
    q.write_bytes("queue.yaml", yaml.safe_dump({"config": str(tmp_path / "extract.yaml"),
                                                "run": first}).encode())
    q.write_bytes("shards/part-1.parquet", shard(1))
    job = load_job("scheduled_edit")
    capsys.readouterr()
    assert job.main([q.uri, "--local", "--gc-keep", "1"]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert found["queue"] == q.uri and found["run"] != first
    assert found["gc"]["deleted"] == [first] and found["gc"]["kept"] == [found["run"]]
    assert [r["uri"] for r in list_runs(str(tmp_path / "runs"))] == [found["run"]]
    assert json.loads(q.read_bytes("state.json"))["run"] == found["run"]
    assert job.main([q.uri, "--local", "--gc-keep", "1"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["run"] == found["run"] and again["gc"]["deleted"] == []
