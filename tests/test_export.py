"""Edited checkpoints written tensor by tensor equal the in-memory edit (the oracle), for an
untied Llama, a tied GPT-2 (lm_head stored as transformer.wte) and a sharded checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from engram_ray import Batch, apply_edit, extract, plan_edit
from engram_ray.apply import apply_run
from engram_ray.models.loading import ModelSpec, load_model


def load_dir(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("which", ["llama", "gpt2", "llama-sharded"])
def test_streamed_export_equals_in_memory_edit(which, tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    src = tiny_gpt2_dir if which == "gpt2" else tiny_llama_dir
    if which == "llama-sharded":
        model = load_model(ModelSpec(path=src))
        src = str(tmp_path / "sharded")
        model.save_pretrained(src, max_shard_size="20KB")
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    model = load_model(ModelSpec(path=src))
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (6, 10))
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                  ["a", "b", None, "a", None, "b"])
    run = extract(model, [batch], uri=str(tmp_path / "run"), config={"model": {"path": src}})
    out = str(tmp_path / "edited")
    apply_run(run.uri, ["a", "b"], alpha=0.8, scale="weight_norm", out=out)
    oracle = load_model(ModelSpec(path=src))
    plan = plan_edit(run, ["a", "b"], alpha=0.8, scale="weight_norm")
    apply_edit(oracle, plan)
    written = load_dir(out)
    state = oracle.state_dict()
    assert set(written) <= set(state)
    for k, v in written.items():
        assert torch.allclose(v, state[k], atol=1e-6), k
    if which == "gpt2":  # the tied lm_head edit lands in wte, once
        assert "lm_head.weight" not in written
        before = load_dir(src)["transformer.wte.weight"]
        assert not torch.equal(written["transformer.wte.weight"], before)
    if which == "llama-sharded":
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        assert set(index["weight_map"]) == set(written)
    assert not os.path.exists(out + ".partial")


def test_export_refuses_a_non_empty_output(tmp_path, tiny_llama_dir):
    model = load_model(ModelSpec(path=tiny_llama_dir))
    ids = torch.randint(3, 100, (2, 5))
    run = extract(model, [Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                ["a", None])],
                  uri=str(tmp_path / "run"), config={"model": {"path": tiny_llama_dir}})
    out = tmp_path / "edited"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        apply_run(run.uri, ["a"], out=str(out))
    assert (out / "keep.txt").read_text() == "user data"


def test_factory_model_apply_writes_a_state_dict(tmp_path):
    """Factory models (not HF): ``apply`` writes OUT/model.safetensors with the edited state."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from engram_ray.config import ExtractConfig
    from engram_ray.local import extract_from_config
    from engram_ray.models.sequential import mlp

    net = mlp([4, 8, 3], seed=1)
    weights = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    rng = np.random.default_rng(0)
    rows = [{"concept": ["a", "b", None][i % 3], "x": rng.normal(size=4).tolist()} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = ExtractConfig.from_dict({
        "model": {"factory": "engram_ray.models.sequential:mlp",
                  "kwargs": {"sizes": [4, 8, 3], "seed": 7}, "weights": weights},
        "data": {"paths": [str(tmp_path / "d.parquet")], "features_column": "x"},
        "store": {"uri": str(tmp_path / "runs"), "run_id": "f"},
    })
    run = extract_from_config(cfg)
    out = tmp_path / "edited"
    apply_run(run.uri, ["b"], alpha=1.0, out=str(out))
    written = load_file(str(out / "model.safetensors"))
    apply_edit(net, plan_edit(run, ["b"], alpha=1.0))
    for k, v in net.state_dict().items():
        assert torch.allclose(written[k], v, atol=1e-6), k
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
