"""S3 end to end on a real S3-compatible server (moto's server mode on loopback): model and
shards read from ``s3://``, the run written to ``s3://``, then ``apply`` from that run."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from engram_ray.apply import apply_run
from engram_ray.config import ExtractConfig
from engram_ray.io.storage import filesystem
from engram_ray.local import extract_from_config
from engram_ray.runs import open_run

pytestmark = pytest.mark.ray


def test_extract_from_and_to_s3_then_apply(ray_cluster, s3_bucket, tiny_llama_dir, tmp_path):
    from engram_ray.distributed.runner import run_extract

    opts = s3_bucket.storage_options
    fs = filesystem(s3_bucket.uri, opts)
    bucket = s3_bucket.uri.split("://", 1)[1]
    fs.put(tiny_llama_dir + "/", f"{bucket}/models/llama", recursive=True)
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    local_data = tmp_path / "data"
    local_data.mkdir()
    for shard in range(2):
        rows = [{"concept": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
                 "answer": " ".join(rng.choice(words, 4))} for i in range(12)]
        pq.write_table(pa.Table.from_pylist(rows), local_data / f"p{shard}.parquet")
    fs.put(str(local_data) + "/", f"{bucket}/data", recursive=True)

    def cfg(model, data, store, run_id):
        return ExtractConfig.from_dict({
            "model": {"path": model},
            "data": {"paths": [data], "prompt_column": "question", "answer_column": "answer",
                     "max_length": 64, "batch_size": 4, "storage_options": opts},
            "parallel": {"stages": 2, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                         "solver_num_cpus": 0.25},
            "store": {"uri": store, "run_id": run_id, "storage_options": opts},
        })

    uri = run_extract(cfg(f"{s3_bucket.uri}/models/llama", f"{s3_bucket.uri}/data",
                          f"{s3_bucket.uri}/runs", "r1"))
    assert uri == f"{s3_bucket.uri}/runs/r1"
    run = open_run(uri, opts)
    oracle = extract_from_config(cfg(tiny_llama_dir, str(local_data), str(tmp_path / "runs"), "r1"))
    assert run.concepts == oracle.concepts == ["ada", "bo"]
    for m in run.modules:
        a, b = run.engram("ada", m), oracle.engram("ada", m)
        assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(b) + 1e-12

    out = tmp_path / "edited"
    apply_run(uri, ["ada"], alpha=0.5, out=str(out), storage_options=opts)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    before = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    name = "model.layers.1.mlp.down_proj"
    expect = before[f"{name}.weight"] - 0.5 * run.engram("ada", name)
    assert torch.allclose(after[f"{name}.weight"], expect, atol=1e-6)
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])
