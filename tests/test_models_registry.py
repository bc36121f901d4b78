"""The family table drives :func:`stage_family` and stage building; model directories never run
their own code (``trust_remote_code=False`` on every transformers ``Auto*`` call)."""

from __future__ import annotations

import io
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engram_ray.models import (
    FAMILIES,
    ModelSpec,
    load_model,
    load_stage,
    load_tokenizer,
    registry,
    split_model,
    stage_family,
)
from engram_ray.models.base import DecoderStage, Family, get_path
from engram_ray.models.tiny import save_tiny_llama


# --- the table -----------------------------------------------------------------------------------
def _dummy(class_name: str, paths: tuple[str, ...]) -> nn.Module:
    """An empty module of class ``class_name`` with a submodule at each dotted path."""
    model = type(class_name, (nn.Module,), {})()
    for path in paths:
        node = model
        for part in path.split("."):
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
    return model


def test_table_names_are_the_public_families():
    assert tuple(row.name for row in registry.TABLE) == FAMILIES
    assert FAMILIES == ("llama", "gpt2", "sequential", "single")
    assert len(set(FAMILIES)) == len(FAMILIES)
    for name in FAMILIES:
        assert registry.family_named(name).name == name
    with pytest.raises(ValueError, match="unknown stage family"):
        registry.family_named("t5")


@pytest.mark.parametrize("row", registry.TABLE, ids=lambda r: r.name)
def test_every_row_resolves_to_its_family(row):
    for model_type in row.model_types:
        assert stage_family(SimpleNamespace(model_type=model_type)) == row.name
    for class_name in row.classes:
        assert stage_family(_dummy(class_name, row.part_paths())) == row.name
        for missing in row.part_paths():  # a class match alone is not enough: parts are checked
            parts = tuple(p for p in row.part_paths() if p != missing)
            assert stage_family(_dummy(class_name, parts)) == "single"
    if row.module_type is not None:
        assert stage_family(row.module_type()) == row.name


def test_rows_do_not_overlap():
    seen_classes: set[str] = set()
    seen_types: set[str] = set()
    for row in registry.TABLE:
        assert not row.classes & seen_classes and not row.model_types & seen_types, row.name
        seen_classes |= row.classes
        seen_types |= row.model_types


def test_configs_map_through_model_type():
    from transformers import GPT2Config, MistralConfig, Qwen2Config, Qwen3Config

    for config in (Qwen2Config(), Qwen3Config(), MistralConfig()):
        assert stage_family(config) == "llama"
    assert stage_family(GPT2Config()) == "gpt2"
    assert stage_family(SimpleNamespace(model_type="t5")) == "single"
    assert stage_family(object()) == "single"


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(4)
    cfg = GPTNeoXConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return GPTNeoXForCausalLM(cfg).eval()


NEOX = Family(
    name="gpt_neox",
    stage=DecoderStage,
    classes=frozenset({"GPTNeoXForCausalLM"}),
    model_types=frozenset({"gpt_neox"}),
    embed="gpt_neox.embed_in",
    blocks="gpt_neox.layers",
    norm="gpt_neox.final_layer_norm",
    head="lm_head",
    positions="rotary",
    position_module="gpt_neox.rotary_emb",
    dropout="gpt_neox.emb_dropout",
)


def test_a_new_family_is_a_new_row(monkeypatch):
    """Dispatch is data: one more row (no code) makes GPT-NeoX split, and split exactly."""
    model = _neox()
    assert stage_family(model) == stage_family(model.config) == "single"
    monkeypatch.setattr(registry, "TABLE", (*registry.TABLE[:-1], NEOX, registry.SINGLE))
    assert stage_family(model) == stage_family(model.config) == "gpt_neox"
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    payload = {"input_ids": ids, "attention_mask": mask}
    stages = split_model(model, 3)
    assert [s.family for s in stages] == ["gpt_neox"] * 3
    assert all(get_path(s, "gpt_neox.rotary_emb") is not None for s in stages)
    assert stages[0].get_input_embeddings() is model.get_input_embeddings()
    assert stages[-1].get_output_embeddings() is model.get_output_embeddings()
    with torch.no_grad():
        ref = model(**payload).logits
        for s in stages:
            payload = s(**payload)
    torch.testing.assert_close(payload["logits"], ref, rtol=0, atol=1e-5)


def test_rows_are_validated():
    with pytest.raises(ValueError, match="positions must be one of"):
        Family(name="x", stage=DecoderStage, positions="alibi", position_module="m.p")
    with pytest.raises(ValueError, match="position_module"):
        Family(name="x", stage=DecoderStage, positions="rotary")


# --- model directories are data, not code --------------------------------------------------------
EVIL = """\
import pathlib

pathlib.Path({marker!r}).write_text("evil.py ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class Evil(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _evil_dir(tmp_path, model_type: str) -> tuple[str, str]:
    """A tiny Llama whose config.json points its Auto classes at a code file that leaves a
    marker when imported; ``model_type`` other than ``llama`` makes the code the only way."""
    path = save_tiny_llama(str(tmp_path / "m"), layers=1)
    marker = str(tmp_path / "EVIL_RAN")
    with open(os.path.join(path, "evil.py"), "w") as f:
        f.write(EVIL.format(marker=marker))
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.EvilConfig"}
    config["model_type"] = model_type
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path, marker


@pytest.fixture
def no_stdin(monkeypatch):
    """Nobody to answer a ``[y/N]`` prompt: ``input()`` would hit end of file."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def _load_or_refuse(load):
    """``load()``'s result, or None when it refused with transformers' custom-code error."""
    try:
        return load()
    except ValueError as e:
        assert "custom code" in str(e) and "trust_remote_code" in str(e), e
        return None


def test_remote_code_in_a_known_architecture_is_ignored(tmp_path, no_stdin, capsys):
    path, marker = _evil_dir(tmp_path, "llama")
    spec = ModelSpec(path=path)
    model = load_model(spec)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(model).__module__.startswith("transformers.")
    assert stage_family(spec) == "llama"
    assert load_stage(spec, 1, 2).family == "llama"
    assert load_tokenizer(spec)("the fox")["input_ids"]
    assert "[y/N]" not in capsys.readouterr().out
    assert not os.path.exists(marker)


def test_remote_code_only_architecture_is_refused_not_prompted(tmp_path, no_stdin, capsys):
    path, marker = _evil_dir(tmp_path, "evil-llama")
    spec = ModelSpec(path=path)
    for load in (lambda: load_model(spec), lambda: stage_family(spec)):
        with pytest.raises(ValueError, match="custom code"):
            load()
    _load_or_refuse(lambda: load_tokenizer(spec))
    assert "[y/N]" not in capsys.readouterr().out
    assert not os.path.exists(marker)
