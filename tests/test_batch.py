"""Batch unlearning requests: each request equals a single ``apply`` of it, a failing request
is recorded without stopping the others, and a re-run skips what is done."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from engram_ray.apply import apply_run
from engram_ray.config import ExtractConfig
from engram_ray.local import extract_from_config
from engram_ray.requests import read_requests, run_batch, write_summary


@pytest.fixture(scope="module")
def run_uri(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", "Smith, John ", None][i % 4],
             "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(16)]
    (tmp / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp / "data" / "part-0.parquet")
    cfg = ExtractConfig.from_dict({
        "model": {"path": tiny_llama_dir},
        "data": {"paths": [str(tmp / "data")], "concept_column": "author",
                 "prompt_column": "question", "answer_column": "answer", "max_length": 64},
        "store": {"uri": str(tmp / "runs"), "run_id": "base"},
    })
    return extract_from_config(cfg, log=open(os.devnull, "w")).uri


def write_requests(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_batch_equals_single_applies_records_failures_and_skips_done(tmp_path, run_uri):
    out = tmp_path / "out"
    reqs = read_requests(write_requests(tmp_path / "requests.jsonl", [
        {"request_id": "r1", "run": run_uri, "concepts": ["ada"], "out": str(out / "r1")},
        {"request_id": "bad", "run": run_uri, "concepts": ["nobody"], "out": str(out / "bad")},
        {"request_id": "r2", "run": run_uri, "concepts": ["bo", "Smith, John "], "alpha": 0.5,
         "scale": "weight_norm", "modules": ["down_proj"], "out": str(out / "r2")},
    ]))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert "nobody" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert not os.path.exists(out / "bad" / "edit.json")  # nothing that looks complete
    # Each output equals a single apply of the same request.
    single = apply_run(run_uri, ["bo", "Smith, John "], alpha=0.5, scale="weight_norm",
                       modules=["down_proj"], out=str(tmp_path / "single"))
    a = load_file(os.path.join(out / "r2", "model.safetensors"))
    b = load_file(os.path.join(single, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The summary stands on its own; a re-run skips what is done and retries the failure.
    summary = write_summary(rows, str(tmp_path / "summary.parquet"), reqs)
    table = pq.read_table(summary).to_pylist()
    assert [(r["request_id"], r["status"]) for r in table] == [
        ("r1", "done"), ("bad", "failed"), ("r2", "done")]
    assert table[2]["concepts"] == ["bo", "Smith, John "] and table[2]["alpha"] == 0.5
    again = run_batch(reqs)
    assert [r["status"] for r in again] == ["skipped", "failed", "skipped"]


def test_a_request_failing_mid_write_leaves_nothing_complete(tmp_path, run_uri, monkeypatch):
    import engram_ray.io.export as export

    real, calls = export.write_safetensors_stream, []

    def dies_mid_write(path, layout, tensors, metadata=None):
        calls.append(path)
        it = iter(tensors)
        next(it)  # one tensor read and edited, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_safetensors_stream", dies_mid_write)
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        {"request_id": "x", "run": run_uri, "concepts": "ada", "out": str(tmp_path / "x")}]))
    [row] = run_batch(reqs)
    assert row["status"] == "failed" and "disk full" in row["error"] and calls
    assert not os.path.exists(tmp_path / "x" / "edit.json")
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")
    monkeypatch.setattr(export, "write_safetensors_stream", real)
    assert [r["status"] for r in run_batch(reqs)] == ["done"]  # the re-run completes it


@pytest.mark.parametrize("rows, match", [
    ([{"request_id": "a", "run": "r", "concepts": ["c"]}], "column 'out'"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "alfa": 1}], "'alfa'"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "alpha": "x"}], "alpha"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o"}] * 2, "appears twice"),
    ([], "no requests"),
])
def test_bad_request_files_name_the_file_row_and_column(tmp_path, rows, match):
    path = write_requests(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match) as e:
        read_requests(path)
    assert "bad.jsonl" in str(e.value)
