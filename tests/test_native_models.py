"""The pure-torch decoder stages (models/native.py) against transformers' own model classes.

Oracle: the unsplit transformers model (``from_pretrained`` of the same directory), run on the
same right-padded batch. Every covered architecture is built from a small config, saved with
safetensors, loaded back as native stages (1 and 2 stages) and compared logit by logit; the
capture of statistics then goes through the native modules, so the engine's statistics and
the stage's must agree too. Configs the native code does not cover must fall back to
transformers (that a stage's path imports no transformers is tests/test_ray_perf_plumbing.py's).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from engram_ray.config import ModelSpec
from engram_ray.core.layers import module_kind
from engram_ray.models import native
from engram_ray.models.native import NativeDecoderStage, native_model
from engram_ray.models.stages import load_stage


def _llama_like(cls_name: str, **extra):
    config_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForCausalLM")
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    kw.update(extra)
    return model_cls(config_cls(**kw))


def _gpt2(**extra):
    kw = dict(vocab_size=97, n_embd=48, n_layer=3, n_head=4, n_positions=64)
    kw.update(extra)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))


CASES = {
    "llama": lambda: _llama_like("Llama"),
    "llama-bias-llama3-rope": lambda: _llama_like(
        "Llama", attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "llama-linear-rope-tied": lambda: _llama_like(
        "Llama", tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral": lambda: _llama_like("Mistral", sliding_window=None),
    "qwen2": lambda: _llama_like("Qwen2"),
    "qwen3": lambda: _llama_like("Qwen3", head_dim=16),
    "gpt2": lambda: _gpt2(),
}


def _save(model, path: str) -> str:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, not ones and zeros
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding, as the pipeline batches rows
    mask[2, 4:] = 0
    return ids, mask


def _staged_logits(path: str, n_stages: int, dtype=None):
    stages = [load_stage(ModelSpec(path=path), i, n_stages, dtype=dtype) for i in range(n_stages)]
    return stages


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_stages_match_transformers(tmp_path, case):
    path = _save(CASES[case]().eval(), str(tmp_path / case))
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = _batch(oracle.config.vocab_size)
    with torch.no_grad():
        want = oracle(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    for n_stages in (1, 2):
        stages = _staged_logits(path, n_stages)
        assert all(isinstance(s, NativeDecoderStage) for s in stages)
        # Same module names and kinds as the transformers model, slice by slice.
        names = {n for s in stages for n, m in s.named_modules() if module_kind(m)}
        assert names == {n for n, m in oracle.named_modules() if module_kind(m)}
        payload = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            for s in stages:
                payload = s(**payload)
        got = payload["logits"]
        assert got.shape == want.shape
        # Real tokens only: padded positions are never counted in Σ.
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_native_bfloat16_matches_transformers(tmp_path):
    path = _save(CASES["llama"]().eval(), str(tmp_path / "m"))
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, mask = _batch(97)
    (stage,) = _staged_logits(path, 1, dtype=torch.bfloat16)
    assert stage.part("model.layers")["0"].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert stage.part("model.rotary_emb").inv_freq.dtype == torch.float32
    with torch.no_grad():
        want = oracle(input_ids=ids, attention_mask=mask).logits
        got = stage(input_ids=ids, attention_mask=mask)["logits"]
    real = mask.bool()
    # Same operations in the same dtype: bf16 rounding differences only where a kernel differs.
    torch.testing.assert_close(got[real].float(), want[real].float(), rtol=2e-2, atol=2e-2)


def test_tied_head_reads_the_embedding_once(tmp_path):
    path = _save(CASES["gpt2"]().eval(), str(tmp_path / "g"))
    (stage,) = _staged_logits(path, 1)
    assert stage.part("lm_head").weight is stage.part("transformer.wte").weight
    assert "lm_head.weight" not in stage.loaded_keys  # GPT-2 stores it once, as wte
    assert stage.get_output_embeddings() is stage.part("lm_head")


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "mistral", "sliding_window": 4096},
        {"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]},
        {"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
        {"model_type": "llama", "hidden_act": "gelu"},
        {"model_type": "gpt2", "activation_function": "relu"},
        {"model_type": "gpt2", "reorder_and_upcast_attn": True},
        {"model_type": "gemma"},
    ],
    ids=lambda c: "-".join(f"{v}" for v in c.values())[:40],
)
def test_uncovered_configs_fall_back_to_transformers(config):
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "n_embd": 8, "n_layer": 2, "n_head": 2, "n_positions": 8}
    assert native_model({**base, **config}) is None


def test_fallback_loads_through_transformers(tmp_path, monkeypatch):
    """A sliding-window Mistral is not covered: its stage is transformers' modules."""
    model = _llama_like("Mistral", sliding_window=4)
    path = _save(model.eval(), str(tmp_path / "m"))
    (stage,) = _staged_logits(path, 1)
    assert not isinstance(stage, NativeDecoderStage)
    assert type(stage.part("model.layers")["0"]).__module__.startswith("transformers.")
    monkeypatch.setenv("ENGRAM_RAY_NATIVE", "0")  # the escape hatch, for a covered model
    path = _save(CASES["llama"]().eval(), str(tmp_path / "l"))
    (stage,) = _staged_logits(path, 1)
    assert not isinstance(stage, NativeDecoderStage)


def test_defaults_are_the_config_classes_defaults():
    """The defaults used for keys an old config.json lacks are transformers' own."""
    for kind in native.LLAMA_LAYOUT:
        cls = transformers.AutoConfig.for_model(kind).__class__
        c = cls()
        for key, value in native.LLAMA_DEFAULTS.items():
            if key == "head_dim":
                want = native.QWEN3_HEAD_DIM if kind == "qwen3" else c.hidden_size // c.num_attention_heads
                assert getattr(c, "head_dim", want) == want, (kind, key)
            elif key == "num_key_value_heads":
                continue  # None means "as many as query heads", each class's own default differs
            elif hasattr(c, key):
                assert getattr(c, key) == value, (kind, key)
    g = transformers.GPT2Config()
    for key, value in native.GPT2_DEFAULTS.items():
        assert getattr(g, key) == value, key


def test_old_style_rope_keys(tmp_path):
    """config.json written before ``rope_parameters``: ``rope_theta`` + ``rope_scaling``."""
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    model = native_model(cfg)
    want = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    oracle = transformers.LlamaForCausalLM(want).model.rotary_emb.inv_freq
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, oracle, rtol=0, atol=0)
    json.dumps(cfg)  # the input is plain JSON data
