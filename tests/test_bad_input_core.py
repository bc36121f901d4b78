"""Bad input to the core engine: a clear error naming the culprit, and nothing written."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from engram_ray import Batch, extract
from engram_ray.core.select import select_modules


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_concept_with_zero_tokens_after_masking(tmp_path):
    x = torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False  # every token of concept "ghost" is masked out
    uri = str(tmp_path / "r")
    with pytest.raises(ValueError, match="concept 'ghost' has zero tokens"):
        extract(mlp(), [Batch(x, ["a", "ghost", None], mask=mask)], uri=uri)
    assert not os.path.exists(uri)


def test_selection_matching_nothing_lists_close_matches():
    from engram_ray.models.tiny import tiny_llama

    with pytest.raises(ValueError, match=r"did you mean \[.*'q_proj'"):
        select_modules(tiny_llama(), ["q_prj"])
    with pytest.raises(ValueError, match="matched no supported module"):
        select_modules(tiny_llama(), ["q_proj"], layers_to_transform=[7])


def test_peft_selection_rules():
    from engram_ray.models.tiny import tiny_llama

    model = tiny_llama(layers=3)
    names = select_modules(model, ["q_proj", "v_proj"], layers_to_transform=[0, 2])
    assert sorted(names) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in ("q_proj", "v_proj")]
    regex = select_modules(model, r".*\.1\.mlp\.(gate|up)_proj")
    assert sorted(regex) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert "lm_head" not in select_modules(model, "all-linear")
    assert "lm_head" in select_modules(model, None)


def test_non_finite_activations_name_the_module(tmp_path):
    model = mlp()
    x = torch.randn(4, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations entering module '0'"):
        extract(model, [Batch(x, ["a"] * 4)], uri=str(tmp_path / "r"))
    assert not os.path.exists(tmp_path / "r")


def test_non_finite_weights_name_the_module(tmp_path):
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="module '2' has non-finite weights"):
        extract(model, [Batch(torch.randn(4, 4), ["a"] * 4)], uri=str(tmp_path / "r"))


def test_grouped_conv_is_unsupported():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped Conv2d"):
        select_modules(model, None)
    with pytest.raises(ValueError, match="not a supported layer"):
        select_modules(nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2)), ["0"])


def test_mask_shape_mismatch_names_the_module(tmp_path):
    with pytest.raises(ValueError, match="does not fit the input of module '0'"):
        extract(mlp(), [Batch(torch.randn(3, 5, 4), ["a"] * 3, mask=torch.ones(3, 4))],
                uri=str(tmp_path / "r"))


def test_batch_label_count_must_match_rows():
    with pytest.raises(ValueError, match="3 rows but 2 concept labels"):
        Batch(torch.randn(3, 4), ["a", "b"])
