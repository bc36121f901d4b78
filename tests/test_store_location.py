"""Where a run lands (issue 10, store location on clusters): a relative ``store.uri`` is made
absolute against the driver's working directory (and refused inside a Ray job's temporary
copy of its working dir), the printed URI is absolute, and a node-local store is refused on
a cluster whose nodes are on several hosts unless ``store.shared_fs: true``."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engram_ray.cli import main
from engram_ray.config import ConfigError, ExtractConfig, StoreConfig
from engram_ray.distributed.store_location import StoreLocationError, check_store_location
from engram_ray.runs import open_run

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def test_relative_store_uri_is_made_absolute_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_ENV, raising=False)
    assert StoreConfig(uri="runs").uri == str(tmp_path / "runs")
    assert StoreConfig(uri="./a/../runs", extend="runs/base").extend == str(tmp_path / "runs/base")
    assert StoreConfig(uri="~/runs").uri == os.path.expanduser("~/runs")
    assert StoreConfig(uri="s3://bucket/runs").uri == "s3://bucket/runs"
    # What workers receive is the driver's absolute path, whatever their own cwd.
    cfg = ExtractConfig.from_dict({"model": {"path": "/m"}, "data": {"paths": ["/d"], "text_column": "t"},
                                   "store": {"uri": "runs"}})
    monkeypatch.chdir("/")
    assert cfg.store.run_uri("x") == str(tmp_path / "runs" / "x")


def test_relative_store_uri_refused_inside_a_ray_job_working_dir(tmp_path, monkeypatch):
    """Under ``ray job submit --working-dir`` the entrypoint's cwd is Ray's temporary copy:
    a relative store would commit there and vanish with it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"},
                                            "metadata": {}}))
    with pytest.raises(ConfigError, match=r"store.uri 'runs' is a relative path.*s3://"):
        StoreConfig(uri="runs")
    assert StoreConfig(uri=str(tmp_path / "runs")).uri == str(tmp_path / "runs")
    assert StoreConfig(uri="s3://b/runs").uri == "s3://b/runs"
    # A job without a working dir runs where it was started: relative is fine there.
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    assert StoreConfig(uri="runs").uri == str(tmp_path / "runs")


@pytest.mark.parametrize("uri, hosts, grow, shared, refused", [
    ("/data/runs", 1, False, False, False),   # one machine: one disk
    ("/data/runs", 2, False, False, True),    # two machines: the run would be split
    ("/data/runs", 1, True, False, True),     # an autoscaler may add a machine
    ("/data/runs", 3, False, True, False),    # declared one filesystem on every node
    ("file:///data/runs", 2, False, False, True),  # file:// is a local path (named as one)
    ("s3://bucket/runs", 5, True, False, False),
    ("s3://bucket/runs", 5, False, False, False),
])
def test_node_local_store_check(uri, hosts, grow, shared, refused):
    store = StoreConfig(uri=uri, shared_fs=shared)
    if refused:
        with pytest.raises(StoreLocationError, match=r"store\.shared_fs: true") as e:
            check_store_location(store, hosts, may_grow=grow)
        assert uri.removeprefix("file://") in str(e.value)
    else:
        check_store_location(store, hosts, may_grow=grow)


def test_a_memory_store_is_refused_on_ray_whatever_the_cluster():
    """memory:// lives in one process: solver tasks elsewhere would write into their own."""
    for hosts, shared in ((1, False), (4, True)):
        with pytest.raises(StoreLocationError, match="memory://runs.*--local"):
            check_store_location(StoreConfig(uri="memory://runs", shared_fs=shared), hosts)


def test_shared_fs_must_be_a_bool():
    with pytest.raises(ConfigError, match="store.shared_fs"):
        StoreConfig(uri="/x", shared_fs="yes")


@pytest.fixture()
def workspace(tmp_path, tiny_llama_dir):
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    (tmp_path / "data").mkdir()
    rows = [{"author": ["ada", "bo"][i % 2], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "part-0.parquet")
    cfg = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [str(tmp_path / "data")], "concept_column": "author",
                    "prompt_column": "question", "answer_column": "answer", "max_length": 64,
                    "batch_size": 4},
           "parallel": {"stages": 1, "replicas": 2, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                        "solver_num_cpus": 0.25},
           "store": {"uri": "runs", "run_id": "here"}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def test_local_cli_prints_the_absolute_uri(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    monkeypatch.delenv(JOB_ENV, raising=False)
    rc = main(["extract", "extract.yaml", "--local"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    uri = out.strip().splitlines()[-1]
    assert uri == str(workspace / "runs" / "here") and os.path.isabs(uri)
    assert f"to {uri} in" in err  # the "committed … to URI" line names the same place
    assert open_run(uri).concepts == ["ada", "bo"]
    rc = main(["apply", "--run", "runs/here", "--forget", "ada", "--out", "edited"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == str(workspace / "edited")
    assert (workspace / "edited" / "edit.json").exists()


@pytest.mark.ray
def test_ray_run_on_multinode_cluster_writes_where_the_driver_expects(
        ray_cluster, workspace, monkeypatch, capsys):
    """The session's 3-node ``ray.cluster_utils.Cluster`` (every node on this host, so one
    disk): replicas spread over nodes, solver tasks run wherever there is room, and the run
    commits whole at the absolute path the driver printed."""
    monkeypatch.chdir(workspace)
    monkeypatch.delenv(JOB_ENV, raising=False)
    rc = main(["extract", "extract.yaml"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    uri = out.strip().splitlines()[-1]
    assert uri == str(workspace / "runs" / "here")
    run = open_run(uri)  # every payload's sha256 verified on read
    info = json.loads((workspace / "runs" / "here" / "run.json").read_text())
    assert len(set(info["parallel"]["nodes"])) == 2  # two replicas, spread
    local = main(["extract", "extract.yaml", "--local", "--set", "store.run_id=oracle"])
    capsys.readouterr()
    assert local == 0
    oracle = open_run(str(workspace / "runs" / "oracle"))
    for c in run.concepts:
        for m in run.modules:
            np.testing.assert_allclose(run.engram(c, m).numpy(), oracle.engram(c, m).numpy(),
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.ray
def test_ray_refuses_node_local_store_on_a_growing_cluster(ray_cluster, workspace, monkeypatch,
                                                           capsys):
    """The check is wired before any actor starts: with an autoscaler that may add machines a
    local store is refused in one line (exit 2) and nothing is committed; declaring it shared
    lets the same run commit."""
    monkeypatch.chdir(workspace)
    monkeypatch.delenv(JOB_ENV, raising=False)
    rc = main(["extract", "extract.yaml", "--set", "parallel.autoscale_max_cpus=4"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert f"store.uri '{workspace / 'runs'}'" in err and "store.shared_fs: true" in err
    assert len(err.strip().splitlines()) <= 3 and "Traceback" not in err
    assert not (workspace / "runs" / "here").exists()
    staging = workspace / "runs" / "_staging"
    assert not staging.exists() or not os.listdir(staging)
    rc = main(["extract", "extract.yaml", "--set", "parallel.autoscale_max_cpus=4",
               "--set", "store.shared_fs=true"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (workspace / "runs" / "here" / "_COMMITTED").exists()
