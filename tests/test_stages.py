"""Pipeline stages reproduce the unsplit model exactly, keep its module names, read only their keys.

Every comparison is against the unsplit model (in memory, or ``from_pretrained`` on the same
directory), on a right-padded batch, at the unpadded positions only.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engram_ray.models import (
    ModelSpec,
    assign_layers,
    load_model,
    load_stage,
    split_model,
    stage_family,
)
from engram_ray.models import weights as weights_module
from engram_ray.models.sequential import mlp
from engram_ray.models.tiny import (
    build_tokenizer,
    save_tiny_gpt2,
    save_tiny_llama,
    tiny_gpt2,
    tiny_llama,
)

ATOL = 1e-5


# --- helpers -------------------------------------------------------------------------------------
def _batch(vocab: int, seed: int = 0):
    """(3, 7) right-padded ids: row 0 full, row 1 five tokens, row 2 two tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _chain(stages, payload):
    """Run stages in order; also return what each non-last stage handed on."""
    handed = []
    with torch.no_grad():
        for s in stages:
            payload = s(**payload)
            assert all(isinstance(v, torch.Tensor) for v in payload.values())
            handed.append(payload)
    assert set(payload) == {"logits"}
    return payload["logits"], handed[:-1]


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _layer_outputs(model, ids, mask):
    """Logits and the output of every decoder layer of the unsplit model."""
    outs = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(_blocks(model))
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


def _close_unpadded(a, b, mask):
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=ATOL)


def _close_everywhere(a, b, mask):
    """Unpadded positions, then padded ones too: with right padding only the padded queries
    see the padding mask, so this is what catches a mask that fails to reach a stage."""
    _close_unpadded(a, b, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    cfg = MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
    )  # fmt: skip
    return MistralForCausalLM(cfg).eval()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    cfg = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=3, max_window_layers=1,
    )  # fmt: skip
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    return Qwen2ForCausalLM(cfg).eval()


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    cfg = Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval()


LMS = {
    "llama-gqa": lambda: tiny_llama(layers=4),
    "llama-tied": lambda: tiny_llama(layers=3, tie_word_embeddings=True),
    "gpt2": lambda: tiny_gpt2(layers=3),
    "mistral-sliding": _mistral,
    "qwen2-mixed-sliding": _qwen2,
    "qwen3": _qwen3,
}


@pytest.fixture(scope="module", params=sorted(LMS))
def lm(request):
    return request.param, LMS[request.param]()


# --- assign_layers -------------------------------------------------------------------------------
def test_assign_layers_examples():
    assert assign_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert assign_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert assign_layers(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    assert assign_layers(7, 1) == [range(0, 7)]


@pytest.mark.parametrize("n_layers", range(0, 13))
@pytest.mark.parametrize("n_stages", range(1, 6))
def test_assign_layers_contiguous_and_balanced(n_layers, n_stages):
    ranges = assign_layers(n_layers, n_stages)
    assert len(ranges) == n_stages
    assert [i for r in ranges for i in r] == list(range(n_layers))
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("args", [(3, 0), (-1, 2), (3, 1.5)])
def test_assign_layers_rejects_bad_counts(args):
    with pytest.raises(ValueError):
        assign_layers(*args)


# --- in-memory split: exactness and names --------------------------------------------------------
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_split_lm_reproduces_logits_and_layer_outputs(lm, n_stages):
    name, model = lm
    expected_family = "gpt2" if name == "gpt2" else "llama"
    assert stage_family(model) == expected_family == stage_family(model.config)
    ids, mask = _batch(model.config.vocab_size)
    ref_logits, ref_layers = _layer_outputs(model, ids, mask)
    stages = split_model(model, n_stages)
    assert [s.index for s in stages] == list(range(n_stages))
    assert all(s.n_stages == n_stages for s in stages)
    assert [s.layer_range for s in stages] == assign_layers(len(_blocks(model)), n_stages)
    logits, handed = _chain(stages, {"input_ids": ids, "attention_mask": mask})
    _close_everywhere(logits, ref_logits, mask)
    for stage, out in zip(stages, handed):
        assert set(out) == {"hidden_states", "attention_mask"}
        _close_everywhere(out["hidden_states"], ref_layers[stage.layer_range.stop - 1], mask)


def test_explicit_position_ids_travel_with_the_payload(lm):
    _, model = lm
    ids, mask = _batch(model.config.vocab_size, seed=3)
    # Gaps (not a uniform shift, which relative RoPE would not see): differs from the default.
    pos = torch.tensor([[0, 1, 2, 5, 6, 9, 10]]).expand(3, -1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        default = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ref, default)
    payload = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    logits, handed = _chain(split_model(model, 2), payload)
    assert torch.equal(handed[0]["position_ids"], pos)
    _close_everywhere(logits, ref, mask)


def test_split_with_more_stages_than_layers():
    model = tiny_llama(layers=2)
    ids, mask = _batch(model.config.vocab_size, seed=1)
    stages = split_model(model, 3)
    assert stages[-1].layer_range == range(2, 2)  # last stage: final norm + lm_head only
    logits, _ = _chain(stages, {"input_ids": ids, "attention_mask": mask})
    _close_unpadded(logits, model(input_ids=ids, attention_mask=mask).logits, mask)


def _linear_names(module):
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


@pytest.mark.parametrize("n_stages", [2, 3])
def test_stages_keep_original_names(lm, n_stages):
    _, model = lm
    stages = split_model(model, n_stages)
    per_stage = [_linear_names(s) for s in stages]
    assert set().union(*per_stage) == _linear_names(model)
    assert sum(len(p) for p in per_stage) == len(_linear_names(model))  # disjoint
    for stage, names in zip(stages, per_stage):
        for n in names:
            assert stage.get_submodule(n) is model.get_submodule(n)
    keys = [set(s.state_dict()) for s in stages]
    assert set().union(*keys) == set(model.state_dict())
    assert sum(len(k) for k in keys) == len(model.state_dict())
    # lm_head is the last stage's output layer, exactly as for the unsplit model.
    assert stages[-1].get_output_embeddings() is model.get_output_embeddings()
    assert all(s.get_output_embeddings() is None for s in stages[:-1])
    assert stages[0].get_input_embeddings() is model.get_input_embeddings()


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_split_sequential(n_stages):
    model = mlp([6, 16, 16, 16, 5], seed=4).eval()
    assert stage_family(model) == "sequential"
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    stages = split_model(model, n_stages)
    _, handed = _chain(stages, {"x": x})
    with torch.no_grad():
        logits = stages[-1](**(handed[-1] if handed else {"x": x}))["logits"]
        torch.testing.assert_close(logits, model(x), rtol=0, atol=ATOL)
        for stage, out in zip(stages, handed):
            assert set(out) == {"x"}
            torch.testing.assert_close(
                out["x"], model[: stage.layer_range.stop](x), rtol=0, atol=ATOL
            )
    names = [{n for n, _ in s.named_modules() if n} for s in stages]
    assert set().union(*names) == {n for n, _ in model.named_modules() if n}
    assert names[0] >= {"0"} and str(len(model) - 1) in names[-1]


class _Unsplittable(nn.Module):
    """Not a supported family; has a parameter and a buffer on the root itself."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("shift", torch.tensor(0.5))
        self.inner = nn.Linear(4, 3)

    def forward(self, x):
        return self.inner(x) * self.scale + self.shift


def test_single_stage_fallback():
    model = _Unsplittable()
    assert stage_family(model) == "single"
    stages = split_model(model, 3)
    assert len(stages) == 1 and stages[0].n_stages == 1
    (stage,) = stages
    assert dict(stage.named_modules()).keys() == dict(model.named_modules()).keys()
    assert stage.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 4)
    torch.testing.assert_close(stage(x=x)["logits"], model(x), rtol=0, atol=0)
    stage.to(torch.float64)  # conversions reach the wrapped model's own tensors
    assert model.scale.dtype == model.shift.dtype == model.inner.weight.dtype == torch.float64
    assert stage.shift is model.shift


# --- load_stage from HF directories --------------------------------------------------------------
class _SpyOpen:
    """Wraps ``safe_open`` to record which files were opened and which keys were read."""

    def __init__(self, original):
        self.original, self.files, self.keys = original, set(), set()

    def __call__(self, path, *args, **kwargs):
        spy = self
        handle = self.original(path, *args, **kwargs)

        class _Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, key):
                spy.files.add(os.path.basename(path))
                spy.keys.add(key)
                return self.f.get_tensor(key)

        return _Handle()


@pytest.fixture
def spy(monkeypatch):
    s = _SpyOpen(weights_module.safe_open)
    monkeypatch.setattr(weights_module, "safe_open", s)
    return s


def _save_sharded_llama(path) -> str:
    tok = build_tokenizer()
    model = tiny_llama(vocab_size=len(tok), layers=4, seed=5)
    model.save_pretrained(path, max_shard_size="20KB")
    tok.save_pretrained(path)
    return str(path)


SAVED = {
    "llama": lambda p: save_tiny_llama(p, layers=4),
    "llama-tied": lambda p: save_tiny_llama(p, layers=3, tie_word_embeddings=True),
    "gpt2": lambda p: save_tiny_gpt2(p, layers=3),
    "llama-sharded": _save_sharded_llama,
}


@pytest.fixture(scope="module", params=sorted(SAVED))
def saved(request, tmp_path_factory):
    path = SAVED[request.param](str(tmp_path_factory.mktemp("ckpt") / request.param))
    spec = ModelSpec(path=path)
    return request.param, spec, load_model(spec)


def _checkpoint_keys(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_load_stage_reads_only_its_keys_and_matches(saved, n_stages, spy):
    name, spec, full = saved
    weight_map = _checkpoint_keys(spec.path)
    if name == "llama-sharded":
        assert len(set(weight_map.values())) > 2
    ids, mask = _batch(full.config.vocab_size, seed=2)
    ref = full(input_ids=ids, attention_mask=mask).logits
    reference = split_model(full, n_stages)
    stages = []
    for i in range(n_stages):
        spy.files.clear(), spy.keys.clear()
        stage = load_stage(spec, i, n_stages)
        # Exactly the tensors the matching in-memory stage holds; a tied lm_head comes from
        # the input embedding's key, the only one a tied checkpoint stores.
        own = set(reference[i].state_dict())
        expected = {k if k in weight_map else k.replace("lm_head", _embed_key(name)) for k in own}
        assert spy.keys == expected == stage.loaded_keys
        assert spy.files == {weight_map[k] for k in expected}
        assert set(stage.state_dict()) == own
        assert not any(p.is_meta for p in stage.parameters())
        assert not stage.training
        stages.append(stage)
    logits, _ = _chain(stages, {"input_ids": ids, "attention_mask": mask})
    _close_unpadded(logits, ref, mask)


def _embed_key(name: str) -> str:
    return "transformer.wte" if name == "gpt2" else "model.embed_tokens"


def test_sharded_stage_skips_other_shards(tmp_path, spy):
    spec = ModelSpec(path=_save_sharded_llama(tmp_path / "sharded"))
    all_files = set(_checkpoint_keys(spec.path).values())
    stage = load_stage(spec, 1, 3)  # one middle layer
    assert stage.layer_range == range(2, 3)
    assert spy.files and spy.files < all_files
    assert spy.files == {_checkpoint_keys(spec.path)[k] for k in stage.loaded_keys}


def test_load_stage_dtype_and_family(tmp_path):
    spec = ModelSpec(path=save_tiny_llama(str(tmp_path / "m"), layers=2))
    assert stage_family(spec) == "llama"
    stage = load_stage(spec, 1, 2, dtype="float64")
    assert {p.dtype for p in stage.parameters()} == {torch.float64}
    assert stage.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it


# --- factory specs -------------------------------------------------------------------------------
MLP = "engram_ray.models.sequential:mlp"


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_load_stage_factory_with_weights(tmp_path, n_stages, spy):
    kwargs = {"sizes": [6, 16, 16, 5], "seed": 7}
    trained = mlp(**kwargs)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # differs from the factory's own init: the weights file must be read
    weights = str(tmp_path / "w.safetensors")
    save_file(trained.state_dict(), weights)
    spec = ModelSpec(factory=MLP, kwargs=kwargs, weights=weights)
    assert stage_family(spec) == "sequential"
    x = torch.randn(3, 6)
    stages = [load_stage(spec, i, n_stages) for i in range(n_stages)]
    logits, _ = _chain(stages, {"x": x})
    torch.testing.assert_close(logits, trained(x), rtol=0, atol=ATOL)
    assert spy.keys == set(trained.state_dict())
    assert sum(len(s.loaded_keys) for s in stages) == len(trained.state_dict())
    torch.testing.assert_close(load_model(spec)(x), trained(x), rtol=0, atol=0)


def test_load_stage_factory_without_weights_is_the_factory_model():
    spec = ModelSpec(factory=MLP, kwargs={"sizes": [4, 8, 3], "seed": 1})
    stages = [load_stage(spec, i, 2) for i in range(2)]
    x = torch.randn(2, 4)
    logits, _ = _chain(stages, {"x": x})
    torch.testing.assert_close(logits, mlp([4, 8, 3], seed=1)(x), rtol=0, atol=0)


def test_load_stage_single_family(tmp_path):
    linear = nn.Linear(4, 3)
    weights = str(tmp_path / "lin.safetensors")
    save_file(linear.state_dict(), weights)
    spec = ModelSpec(
        factory="torch.nn:Linear", kwargs={"in_features": 4, "out_features": 3}, weights=weights
    )
    assert stage_family(spec) == "single"
    stage = load_stage(spec, 0, 1)
    x = torch.randn(2, 4)
    torch.testing.assert_close(stage(x=x)["logits"], linear(x), rtol=0, atol=0)
    assert {n for n, _ in stage.named_parameters()} == {"weight", "bias"}
    with pytest.raises(ValueError, match="n_stages must be 1"):
        load_stage(spec, 0, 2)


# --- errors --------------------------------------------------------------------------------------
def test_missing_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    spec = ModelSpec(path=missing)
    for call in (
        lambda: load_stage(spec, 0, 2),
        lambda: load_model(spec),
        lambda: stage_family(spec),
    ):
        with pytest.raises(FileNotFoundError, match="no-such-model"):
            call()


def test_missing_weights_and_bad_factory_are_named(tmp_path):
    missing = str(tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_stage(ModelSpec(factory=MLP, kwargs={"sizes": [2, 2]}, weights=missing), 0, 1)
    for factory in ("engram_ray.no_such_module:f", "engram_ray.models.sequential:no_such_fn"):
        with pytest.raises(ImportError, match=factory.replace(".", r"\.")):
            load_stage(ModelSpec(factory=factory), 0, 1)


def test_stage_index_out_of_range(tmp_path):
    spec = ModelSpec(factory=MLP, kwargs={"sizes": [2, 2]})
    with pytest.raises(ValueError, match="out of range"):
        load_stage(spec, 2, 2)
