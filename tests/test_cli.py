"""The ``engram-ray`` command: happy path, and bad input that must exit non-zero, name the
culprit and leave no committed run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from engram_ray.cli import main
from engram_ray.runs import open_run


@pytest.fixture()
def workspace(tmp_path, tiny_llama_dir):
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), data / "part-0.parquet")
    cfg = {
        "model": {"path": tiny_llama_dir},
        "data": {"paths": [str(data)], "concept_column": "author", "prompt_column": "question",
                 "answer_column": "answer", "max_length": 64, "batch_size": 4},
        "parallel": {"stages": 2, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                     "solver_num_cpus": 0.25},
        "store": {"uri": str(tmp_path / "runs"), "run_id": "cli", "keep_statistics": True},
    }
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp_path, path, data


def committed_runs(root) -> list[str]:
    if not os.path.exists(root):
        return []
    return [d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "_COMMITTED"))]


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.ray
def test_extract_then_apply_via_cli(ray_cluster, workspace, capsys, tiny_llama_dir):
    tmp, cfg, _ = workspace
    rc, out, err = run_cli(capsys, "extract", str(cfg), "--set", "parallel.replicas=2")
    assert rc == 0, err
    uri = out.strip().splitlines()[-1]
    assert uri == str(tmp / "runs" / "cli")
    assert "rows" in err and "tok/s" in err  # progress on stderr
    run = open_run(uri)
    assert run.concepts == ["ada", "bo"]
    kept = run.statistics()  # Σ kept in the run, tagged with the shard it covers
    group = kept.modules["model.layers.0.mlp.down_proj"].group
    assert kept.groups[group].sources == {str(tmp / "data" / "part-0.parquet")}
    assert kept.groups[group].n_total == run.record("ada", "lm_head")["N"]
    rc, out, err = run_cli(capsys, "apply", "--run", uri, "--forget", "ada,bo", "--alpha", "1",
                           "--modules", "down_proj", "--out", str(tmp / "edited"))
    assert rc == 0, err
    after = load_file(str(tmp / "edited" / "model.safetensors"))
    before = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    expect = before[f"{name}.weight"] - run.engram("ada", name) - run.engram("bo", name)
    assert torch.allclose(after[f"{name}.weight"], expect, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(after[q], before[q])  # not selected


def _corrupt(data):
    (data / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    return "part-1.parquet"


def _no_concepts(data):
    """Every row's concept null (issue 20: such data committed a run of 0 engrams, exit 0)."""
    table = pq.read_table(data / "part-0.parquet")
    nulls = pa.nulls(table.num_rows, pa.string())
    pq.write_table(table.set_column(table.column_names.index("author"), "author", nulls),
                   data / "part-0.parquet")


@pytest.mark.parametrize(
    "case, override, expect",
    [
        ("unknown key", ["parallel.stagez=2"], "parallel.stagez"),
        ("missing column", ["data.answer_column=reply"], "'reply'"),
        ("no concept column", ["data.concept_column=writer"], "'writer'"),
        ("model path", ["model.path=/nonexistent/model"], "/nonexistent/model"),
        ("corrupt shard", [], "part-1.parquet"),
        ("no concept in any row", [], "'author' (concept_column) is null or empty in every row"),
    ],
)
def test_bad_input_exits_nonzero_names_culprit_commits_nothing(workspace, capsys, case, override,
                                                               expect):
    tmp, cfg, data = workspace
    if case == "corrupt shard":
        _corrupt(data)
    if case == "no concept in any row":
        _no_concepts(data)
    rc, out, err = run_cli(capsys, "extract", str(cfg), *sum([["--set", o] for o in override], []))
    assert rc == 2
    assert expect in err, err
    assert committed_runs(tmp / "runs") == []


def test_console_script_exit_code(workspace):
    tmp, cfg, _ = workspace
    exe = os.path.join(os.path.dirname(sys.executable), "engram-ray")
    proc = subprocess.run([exe, "extract", str(cfg), "--set", "solver.rtoll=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "solver.rtoll" in proc.stderr and "did you mean 'solver.rtol'" in proc.stderr
