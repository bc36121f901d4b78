"""``apply --format peft``: the forget edit as a PEFT LoRA adapter equals the dense edit.

PEFT itself is the judge: ``PeftModel.from_pretrained(base, out)`` loads what
:func:`write_peft_adapter` wrote, unchanged, and its logits and merged weights
(``merge_and_unload``) are compared with ``apply_edit(model, plan_edit(run, forget, α))``, for a
tiny Llama (every linear module, lm_head included), a tiny GPT-2 (Conv1D, absorbed biases), a
Llama with biased attention only (mixed biases) and a CNN (Conv2d). Dense engrams are
truncated within the requested tolerance and the reported errors are recomputed here from the
stored factors. What PEFT cannot hold exactly (a tied lm_head, a dilated Conv2d) is refused
by name.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engram_ray import Batch, apply_edit, extract, plan_edit
from engram_ray.apply import write_peft_adapter
from engram_ray.io.adapter import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS
from engram_ray.models.loading import ModelSpec, load_model
from engram_ray.models.tiny import save_tiny_llama

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'engram-ray[peft]')")

ALPHA = 0.9
FORGETS = [["a"], ["a", "b", "c"]]


def _batch(seed: int = 0) -> Batch:
    """One row of 8 tokens per concept: 8 ≤ D/2 at every module of the tiny models, so the
    engrams are low-rank factors (rank 8 per concept)."""
    torch.manual_seed(seed)
    ids = torch.randint(3, 100, (8, 8))
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                 ["a", "b", "c", None, None, None, "d", None])


def _run(src: str, path, **select):
    return extract(load_model(ModelSpec(path=src)), [_batch()], uri=str(path),
                   config={"model": {"path": src}}, **select)


def _load_peft(base: nn.Module, out: str):
    """PEFT's own loader on the unchanged files; no key may be missing or unexpected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, out)
    bad = [str(w.message) for w in caught
           if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return model.eval()


def _assert_equals_dense_edit(load_base, run, forget, out, x, *, modules=None, atol=1e-5):
    """Logits of the loaded adapter and the merged weights equal the in-memory dense edit."""
    oracle = load_base()
    apply_edit(oracle, plan_edit(run, forget, alpha=ALPHA, modules=modules))
    adapted = _load_peft(load_base(), out)
    with torch.no_grad():
        got, want = adapted(x), oracle(x)
    got, want = getattr(got, "logits", got), getattr(want, "logits", want)
    assert torch.allclose(got, want, atol=atol), float((got - want).abs().max())
    merged = adapted.merge_and_unload().state_dict()
    for k, v in oracle.state_dict().items():
        assert torch.allclose(merged[k], v, atol=1e-6), k
    return adapted


def _stored_change(out: str, name: str, kind: str, shape) -> torch.Tensor:
    """``lora_B @ lora_A`` from the file, float64, in the module's weight layout."""
    st = load_file(os.path.join(out, ADAPTER_WEIGHTS))
    a = st[f"base_model.model.{name}.lora_A.weight"].double()
    b = st[f"base_model.model.{name}.lora_B.weight"].double()
    prod = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    return prod.T if kind == "conv1d" else prod.reshape(shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, tmp_path_factory):
    return _run(tiny_llama_dir, tmp_path_factory.mktemp("runs") / "llama")


@pytest.mark.parametrize("forget", FORGETS, ids=["1-concept", "3-concepts"])
def test_llama_adapter_equals_dense_edit(forget, llama_run, tiny_llama_dir, tmp_path):
    run, out = llama_run, str(tmp_path / "adapter")
    meta = write_peft_adapter(run, forget, alpha=ALPHA, out=out)
    assert set(meta["modules"]) == set(run.modules)  # every linear module, lm_head included
    config = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert set(config["target_modules"]) == set(run.modules)
    forms = {s["form"] for s in meta["modules"].values()}
    # 3 concepts × rank 8 = 24 ≥ min(out, in) = 16 at k/v_proj: the exact full-rank form
    assert forms == ({"factored"} if len(forget) == 1 else {"factored", "full_rank"})
    for m, s in meta["modules"].items():
        assert s["rel_error"] < 1e-6, (m, s)
        if s["form"] == "factored":
            assert s["rank"] == 8 * len(forget)
    x = torch.randint(3, 100, (2, 9))
    _assert_equals_dense_edit(lambda: load_model(ModelSpec(path=tiny_llama_dir)), run, forget,
                              out, x)
    adapted = _load_peft(load_model(ModelSpec(path=tiny_llama_dir)), out)
    layers = {n: m for n, m in adapted.base_model.model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(layers) == set(run.modules)
    for n, m in layers.items():  # lora_alpha / r = 1 exactly, at every module's own rank
        assert m.scaling["default"] == 1.0 and m.r["default"] == meta["modules"][n]["rank"]
    assert sorted(os.listdir(out)) == sorted([ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS])
    assert not os.path.exists(out + ".partial")


def test_reported_errors_are_float64_errors_against_plan_delta(llama_run, tmp_path):
    """bfloat16 factors: the reported error is the merged adapter's error against the dense
    ``plan.delta``, recomputed here in float64 (to the float32 rounding of plan.delta)."""
    run, out = llama_run, str(tmp_path / "bf16")
    meta = write_peft_adapter(run, ["a", "b"], alpha=ALPHA, out=out, dtype="bfloat16")
    plan = plan_edit(run, ["a", "b"], alpha=ALPHA)
    st = load_file(os.path.join(out, ADAPTER_WEIGHTS))
    assert {v.dtype for v in st.values()} == {torch.bfloat16}
    for m, s in meta["modules"].items():
        info = run.module_info(m)
        dw, _ = plan.delta(m)
        err = _rel(_stored_change(out, m, info["kind"], info["shape"]), -dw)
        assert abs(err - s["rel_error"]) < 1e-6, (m, err, s["rel_error"])
        assert 1e-4 < s["rel_error"] < 1e-2  # bfloat16 rounding, no more
    a, b, bias = run.factors("a", run.modules[0])
    assert _rel(a.double() @ b.double(), run.engram("a", run.modules[0])) < 1e-6
    assert bias is None  # Llama has no biases


def test_gpt2_conv1d_with_absorbed_biases(tiny_gpt2_dir, tmp_path):
    """Conv1D (weight [in, out]) with fan_in_fan_out, and the absorbed bias engrams carried
    exactly as lora_B biases (every target has a bias)."""
    run = _run(tiny_gpt2_dir, tmp_path / "run")
    blocks = r"transformer\.h\..*"  # lm_head is tied to wte: see the next test
    for forget in FORGETS:
        out = str(tmp_path / f"adapter-{len(forget)}")
        meta = write_peft_adapter(run, forget, alpha=ALPHA, modules=blocks, out=out)
        assert meta["bias_mode"] == "lora_bias"
        assert {s["kind"] for s in meta["modules"].values()} == {"conv1d"}
        config = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
        assert config["fan_in_fan_out"] and config["lora_bias"]
        x = torch.randint(3, 100, (2, 9))
        _assert_equals_dense_edit(lambda: load_model(ModelSpec(path=tiny_gpt2_dir)), run,
                                  forget, out, x, modules=blocks)


def test_tied_lm_head_is_refused_by_name(tiny_gpt2_dir, tmp_path):
    run = _run(tiny_gpt2_dir, tmp_path / "run")
    out = tmp_path / "adapter"
    with pytest.raises(ValueError, match=r"'lm_head'.*transformer\.wte"):
        write_peft_adapter(run, ["a"], out=str(out))
    assert not out.exists()


def test_mixed_biases_carry_the_edited_bias_values(tmp_path):
    """Biased q/k/v/o and bias-free MLP/lm_head (Qwen2-like): lora_bias cannot merge into a
    layer without a bias, so the adapter carries the edited biases (bias="lora_only")."""
    src = save_tiny_llama(str(tmp_path / "llama-bias"), attention_bias=True)
    run = _run(src, tmp_path / "run")
    out = str(tmp_path / "adapter")
    meta = write_peft_adapter(run, ["a", "b", "c"], alpha=ALPHA, out=out)
    assert meta["bias_mode"] == "lora_only"
    assert json.load(open(os.path.join(out, ADAPTER_CONFIG)))["bias"] == "lora_only"
    keys = load_file(os.path.join(out, ADAPTER_WEIGHTS))
    assert any(k.endswith("q_proj.base_layer.bias") for k in keys)
    assert not any(k.endswith("down_proj.base_layer.bias") for k in keys)
    x = torch.randint(3, 100, (2, 9))
    _assert_equals_dense_edit(lambda: load_model(ModelSpec(path=src)), run, ["a", "b", "c"],
                              out, x)


def test_dense_engrams_are_truncated_within_rtol(tiny_llama_dir, tmp_path):
    run = _run(tiny_llama_dir, tmp_path / "run", low_rank=False)
    assert set(run.manifest.column("form").to_pylist()) == {"dense"}
    forget, rtol = ["a", "b", "c"], 0.05
    out = str(tmp_path / "svd")
    meta = write_peft_adapter(run, forget, alpha=ALPHA, out=out, rtol=rtol)
    plan = plan_edit(run, forget, alpha=ALPHA)
    svd = [m for m, s in meta["modules"].items() if s["form"] == "svd"]
    assert svd
    for m, s in meta["modules"].items():
        info = run.module_info(m)
        err = _rel(_stored_change(out, m, info["kind"], info["shape"]), -plan.delta(m)[0])
        assert abs(err - s["rel_error"]) < 1e-6, (m, err, s)
        assert s["rel_error"] <= rtol + 1e-6, (m, s)
        if s["form"] == "svd":
            assert s["rank"] < min(info["shape"])
    assert max(meta["modules"][m]["rel_error"] for m in svd) > 1e-4  # truncation happened
    exact = str(tmp_path / "exact")
    meta = write_peft_adapter(run, forget, alpha=ALPHA, out=exact, exact_dense=True)
    assert {s["form"] for s in meta["modules"].values()} == {"full_rank"}
    assert meta["max_rel_error"] < 1e-7
    x = torch.randint(3, 100, (2, 9))
    _assert_equals_dense_edit(lambda: load_model(ModelSpec(path=tiny_llama_dir)), run,
                              forget, exact, x)


def _cnn(dilation: int = 1) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(),
                         nn.Conv2d(8, 48, 3, stride=2, padding=1, dilation=dilation), nn.ReLU(),
                         nn.Flatten(), nn.Linear(48 * (4 if dilation == 1 else 3) ** 2, 5)).eval()


def test_conv2d_adapter_equals_dense_edit(tmp_path):
    """A 1×1 conv (dense engrams: 64 positions per image; exact full rank), a 3×3 strided
    conv (factored: lora_A a 3×3 conv, lora_B 1×1) and a Linear, biases absorbed."""
    model = _cnn()
    torch.manual_seed(4)
    batch = Batch(torch.randn(6, 3, 8, 8), ["a", "b", None, None, "c", None])
    run = extract(model, [batch], uri=str(tmp_path / "run"))
    out = str(tmp_path / "adapter")
    meta = write_peft_adapter(run, ["a", "b"], alpha=ALPHA, out=out,
                              base_model_dir_or_spec=model, exact_dense=True)
    forms = {m: s["form"] for m, s in meta["modules"].items()}
    assert forms == {"0": "full_rank", "2": "factored", "5": "factored"}
    assert meta["bias_mode"] == "lora_bias"
    st = load_file(os.path.join(out, ADAPTER_WEIGHTS))
    assert st["base_model.model.2.lora_A.weight"].shape == (32, 8, 3, 3)  # rank 2 × 16 positions
    assert st["base_model.model.2.lora_B.weight"].shape == (48, 32, 1, 1)
    x = torch.randn(3, 3, 8, 8)
    _assert_equals_dense_edit(lambda: copy.deepcopy(model), run, ["a", "b"], out, x)


def test_dilated_conv2d_is_refused_by_name(tmp_path):
    model = _cnn(dilation=2)
    run = extract(model, [Batch(torch.randn(4, 3, 8, 8), ["a", None, None, None])],
                  uri=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"module '2' \(dilation=\(2, 2\)\)"):
        write_peft_adapter(run, ["a"], out=str(tmp_path / "a"), base_model_dir_or_spec=model)
    meta = write_peft_adapter(run, ["a"], out=str(tmp_path / "b"), modules=["0", "5"],
                              base_model_dir_or_spec=model)
    assert set(meta["modules"]) == {"0", "5"}


def test_refuses_a_non_empty_output(llama_run, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        write_peft_adapter(llama_run, ["a"], out=str(out))
    assert (out / "keep.txt").read_text() == "user data"
    assert not (out / ADAPTER_META).exists()


def test_s3_output_is_uploaded_whole(llama_run, tiny_llama_dir, s3_bucket, tmp_path):
    """An ``s3://`` output is written locally, then uploaded with the metadata last."""
    out = f"{s3_bucket.uri}/adapters/a"
    write_peft_adapter(llama_run, ["a"], alpha=ALPHA, out=out,
                       storage_options=s3_bucket.storage_options)
    keys = [o["Key"] for o in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]]
    names = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_META]
    assert sorted(keys) == sorted(f"adapters/a/{n}" for n in names)
    local = tmp_path / "download"
    local.mkdir()
    for n in names:
        s3_bucket.client.download_file(s3_bucket.name, f"adapters/a/{n}", str(local / n))
    x = torch.randint(3, 100, (2, 9))
    _assert_equals_dense_edit(lambda: load_model(ModelSpec(path=tiny_llama_dir)), llama_run,
                              ["a"], str(local), x)
    with pytest.raises(FileExistsError):
        write_peft_adapter(llama_run, ["a"], out=out, storage_options=s3_bucket.storage_options)


def test_failed_s3_upload_leaves_nothing_so_a_rerun_succeeds(llama_run, s3_bucket,
                                                            monkeypatch):
    """An upload that dies after the first object removes what it uploaded (as ``--format
    full`` does): a prefix left holding part of an adapter would refuse every re-run of the
    request ("not empty") though it was never complete."""
    import s3fs

    calls, real = [], s3fs.S3FileSystem._put_file

    async def fails_second(self, lpath, rpath, *a, **kw):
        calls.append(rpath)
        if len(calls) == 2:
            raise OSError("connection reset by peer")
        return await real(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", fails_second)
    out, opts = f"{s3_bucket.uri}/adapters/b", {**s3_bucket.storage_options,
                                                 "skip_instance_cache": True}
    with pytest.raises(OSError, match="connection reset"):
        write_peft_adapter(llama_run, ["a"], out=out, storage_options=opts)
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="adapters/b")
    assert len(calls) == 2 and listed.get("KeyCount", 0) == 0
    monkeypatch.undo()
    meta = write_peft_adapter(llama_run, ["a"], out=out, storage_options=opts)
    assert meta["forget"] == ["a"]


def wrapped_mlp(sizes, seed=0):
    from engram_ray.models.sequential import mlp

    return mlp(sizes, seed=seed)


def test_factory_model_named_by_the_run_needs_trust(tmp_path):
    """The run's own factory is imported only with trust_factory (or when named by the caller);
    then the adapter fits the factory's model: an MLP, every Linear with an absorbed bias."""
    from engram_ray.models.sequential import mlp

    # Not a built-in factory (those construct plain modules and need no consent): this one is
    # code a run names, importable as the tests run.
    factory = {"factory": "test_adapter:wrapped_mlp", "kwargs": {"sizes": [6, 16, 4], "seed": 2}}
    torch.manual_seed(5)
    run = extract(mlp([6, 16, 4], seed=2), [Batch(torch.randn(9, 6), list("aab") + [None] * 6)],
                  uri=str(tmp_path / "run"), config={"model": factory})
    with pytest.raises(PermissionError, match="test_adapter:wrapped_mlp"):
        write_peft_adapter(run, ["a"], out=str(tmp_path / "refused"))
    out = str(tmp_path / "adapter")
    meta = write_peft_adapter(run, ["a", "b"], alpha=ALPHA, out=out, trust_factory=True)
    assert meta["bias_mode"] == "lora_bias"
    assert {s["form"] for s in meta["modules"].values()} <= {"factored", "full_rank"}
    _assert_equals_dense_edit(lambda: mlp([6, 16, 4], seed=2).eval(), run, ["a", "b"], out,
                              torch.randn(3, 6))
