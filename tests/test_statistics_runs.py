"""Runs hold statistics, not engrams (issue 19): rows stored as captured, solver options chosen
again at edit time, old runs refused in one line."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from engram_ray import Batch, SolverConfig, extract, open_run
from engram_ray.cli import main
from engram_ray.core.capture import collect_statistics
from engram_ray.core.layers import weight_matrix
from engram_ray.core.solve import pseudo_inverse
from engram_ray.models.tiny import tiny_llama


def _batch(seed=0, n=6, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, t), generator=g)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                 ["x", "y", None, "x", None, "y"][:n])


def _rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def test_bf16_model_stores_bf16_rows_and_engrams_equal_a_float32_recomputation(tmp_path):
    """A bf16 model's activations are bf16: its concepts' rows are stored so (lossless, half
    the bytes of float32), and the engram formed on read equals W X_cᵀ X_c Σ⁺ recomputed
    here in float32 from those stored rows."""
    model = tiny_llama().to(torch.bfloat16)
    run = extract(model, [_batch()], uri=str(tmp_path / "r"))
    m = "model.layers.1.mlp.down_proj"
    row = run.record("x", m)
    assert row["form"] == "factored" and row["dtype"] == "bf16"
    table = pq.read_table(os.path.join(run.uri, row["payload"])).to_pylist()
    dtypes = {r["dtype"] for r in table}
    assert dtypes == {"bf16"}
    cell = next(r for r in table if r["concept"] == "x")
    x = torch.frombuffer(bytearray(cell["data"]), dtype=torch.bfloat16).reshape(cell["rows"], -1)
    stats = collect_statistics(model, [_batch()])
    total = stats.groups[stats.modules[m].group].total
    w = weight_matrix(model.get_submodule(m)).float()
    x32, pinv = x.float(), pseudo_inverse(total).float()
    want = (w @ x32.T) @ (x32 @ pinv)
    assert _rel(run.engram("x", m), want) < 1e-5
    assert torch.equal(x.float(), stats.groups[stats.modules[m].group].rows["x"].float())


def test_solver_options_at_edit_time_equal_an_extraction_with_them(tmp_path):
    """The spectrum is stored: an edit's solver options give the engrams an extraction made
    with those options gives (no data re-read)."""
    model = tiny_llama()
    base = extract(model, [_batch()], uri=str(tmp_path / "default"))
    for opts in ({"rank_fraction": 0.5}, {"condition_cap": 100.0}, {"ridge": 0.1}):
        direct = extract(model, [_batch()], uri=str(tmp_path / json.dumps(opts)[2:6]),
                         solver=SolverConfig(**opts))
        again = open_run(base.uri, model=model, solver=opts)
        assert again.solver == SolverConfig(**opts)
        for c in ("x", "y"):
            for m in ("model.layers.0.self_attn.q_proj", "lm_head"):
                assert _rel(again.engram(c, m), direct.engram(c, m)) < 1e-9, (opts, c, m)
        assert _rel(again.engram("x", "lm_head"), base.engram("x", "lm_head")) > 1e-3


def test_cli_apply_solver_equals_apply_of_a_run_extracted_with_it(tmp_path, tiny_llama_dir,
                                                                 capsys):
    from engram_ray.config import ExtractConfig
    from engram_ray.local import extract_from_config

    rows = [{"author": a, "q": f"who is {a} {i}?", "a": f"{a} wrote book {i}"}
            for i in range(6) for a in ("ada", "bo")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(run_id, solver):
        return extract_from_config(ExtractConfig.from_dict({
            "model": {"path": tiny_llama_dir},
            "data": {"paths": [str(data)], "concept_column": "author", "prompt_column": "q",
                     "answer_column": "a"},
            "solver": solver, "store": {"uri": str(tmp_path / "runs"), "run_id": run_id},
            "parallel": {"progress_interval_s": None}})).uri

    default, capped = run("default", {}), run("capped", {"rtol": 1e-3})
    for out, uri, extra in (("a", default, ["--solver", "rtol=1e-3"]), ("b", capped, [])):
        assert main(["apply", "--run", uri, "--forget", "ada", "--alpha", "2",
                     "--out", str(tmp_path / out), *extra]) == 0, capsys.readouterr().err
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    edit = json.loads((tmp_path / "a" / "edit.json").read_text())
    assert edit["solver"]["rtol"] == 1e-3 and edit["allow_other_weights"] is False
    rc = main(["apply", "--run", default, "--forget", "ada", "--out", str(tmp_path / "c"),
               "--solver", "rtoll=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "solver.rtoll" in err and "Traceback" not in err


def test_a_format_2_run_is_refused_in_one_line(tmp_path, capsys):
    model = tiny_llama()
    run = extract(model, [_batch()], uri=str(tmp_path / "r"))
    path = os.path.join(run.uri, "run.json")
    info = json.load(open(path))
    info["payload_format_version"] = 2
    raw = json.dumps(info).encode()
    open(path, "wb").write(raw)
    marker = json.load(open(os.path.join(run.uri, "_COMMITTED")))
    marker["run_json_sha256"] = hashlib.sha256(raw).hexdigest()
    json.dump(marker, open(os.path.join(run.uri, "_COMMITTED"), "w"))
    with pytest.raises(ValueError, match="payload format version 2 .* re-extract"):
        open_run(run.uri)
    rc = main(["apply", "--run", run.uri, "--forget", "x", "--model",
               "engram_ray.models.tiny:tiny_llama", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "payload format version 2" in err and len(err.strip().splitlines()) == 1



@pytest.fixture(scope="module")
def gpt2_config_run(tiny_gpt2_dir, tmp_path_factory):
    """A run of the tiny GPT-2 (Conv1D with biases, lm_head tied to wte) extracted from its
    checkpoint by config, as the CLI does: the run records its checkpoint."""
    from engram_ray.config import ExtractConfig
    from engram_ray.local import extract_from_config

    tmp = tmp_path_factory.mktemp("gpt2-run")
    rows = [{"author": a, "q": f"who is {a} {i}?", "a": f"{a} wrote book {i}"}
            for i in range(4) for a in ("ada", "bo")]
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return extract_from_config(ExtractConfig.from_dict({
        "model": {"path": tiny_gpt2_dir},
        "data": {"paths": [str(data)], "concept_column": "author", "prompt_column": "q",
                 "answer_column": "a"},
        "store": {"uri": str(tmp / "runs"), "run_id": "r"},
        "parallel": {"progress_interval_s": None}})).uri


def _cli_without_transformers(*argv: str) -> None:
    """``engram-ray ARGV`` in a fresh process, which must not import transformers."""
    import subprocess
    import sys

    script = ("import sys; from engram_ray.cli import main; "
              f"rc = main({list(argv)!r}); "
              "assert rc == 0, rc; assert 'transformers' not in sys.modules, 'imported'")
    got = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]


def test_an_edit_reads_the_checkpoint_by_the_runs_record_without_building_the_model(
        gpt2_config_run, tiny_gpt2_dir, tmp_path):
    """The run records each module tensor's dtype and the tied aliases (GPT-2's lm_head is
    stored as transformer.wte): binding reads the tensors by key, bit for bit the weights the
    model built from its config gives (the path a model given with other weights still takes),
    and an apply never imports transformers (seconds per edit process)."""
    uri = gpt2_config_run
    recorded = open_run(uri)
    assert recorded.info["checkpoint"]["aliases"]["lm_head.weight"] == "transformer.wte.weight"
    assert "lm_head" in recorded.modules
    built = open_run(uri, model=tiny_gpt2_dir, allow_other_weights=True)  # the model's skeleton
    for m in recorded.modules:
        a, b = recorded.engram("ada", m), built.engram("ada", m)
        assert a.dtype == b.dtype and torch.equal(a, b), m
    _cli_without_transformers("apply", "--run", uri, "--forget", "ada",
                              "--out", str(tmp_path / "out"))
    edited = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = open_run(uri).engram("ada", "transformer.h.0.attn.c_attn")
    base = load_file(os.path.join(tiny_gpt2_dir, "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert _rel(base[key] - edited[key], want) < 1e-5


def test_an_adapter_is_checked_against_the_runs_outline_of_its_model(
        gpt2_config_run, tiny_gpt2_dir, tmp_path, capsys):
    """--format peft checks targets (kind, shape, bias, ties, PEFT's name matching) against the
    module tree rebuilt from the run's record: the adapter is byte for byte the one written
    against the model built from its config, transformers is never imported, and the tied
    lm_head is still refused by name."""
    from engram_ray.apply import write_peft_adapter
    from engram_ray.runs import adapter_base

    uri, blocks = gpt2_config_run, r"transformer\.h\..*"
    _cli_without_transformers("apply", "--run", uri, "--forget", "ada", "--format", "peft",
                              "--modules", blocks, "--out", str(tmp_path / "outline"))
    # Other weights allowed: the adapter's base is built from the model's config (the old path).
    built = open_run(uri, model=tiny_gpt2_dir, allow_other_weights=True)
    assert hasattr(adapter_base(built).model, "config")  # a transformers model, not the outline
    write_peft_adapter(built, ["ada"], modules=blocks, out=str(tmp_path / "built"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        a = (tmp_path / "outline" / name).read_bytes()
        assert a == (tmp_path / "built" / name).read_bytes(), name
    rc = main(["apply", "--run", uri, "--forget", "ada", "--format", "peft",
               "--out", str(tmp_path / "tied")])
    err = capsys.readouterr().err
    assert rc != 0 and "'lm_head'" in err and "transformer.wte" in err
    assert not (tmp_path / "tied").exists()


def test_the_outline_rebuilds_kinds_shapes_biases_ties_and_conv_options():
    """``describe`` then ``outline_module`` gives back every fact an adapter checks, for
    Linear, Conv1D and Conv2d (strided, dilated) layers, a tie and an unrecorded module."""
    from torch import nn

    from engram_ray.core.layers import Conv1D, module_kind
    from engram_ray.models.outline import describe, outline_module

    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({
        "emb": emb, "head": head,
        "block": nn.ModuleDict({"c": Conv1D(6, 4), "conv": nn.Conv2d(
            3, 8, 3, stride=2, padding=1, dilation=2, bias=False).to(torch.float64),
            "act": nn.ReLU()})})
    got = outline_module(describe(model, {"head": False, "block.c": True,
                                          "block.conv": False})["outline"])
    assert [n for n, _ in got.named_modules()][1:] == [n for n, _ in model.named_modules()][1:]
    for name in ("head", "block.c", "block.conv"):
        a, b = got.get_submodule(name), model.get_submodule(name)
        assert module_kind(a) == module_kind(b) and a.weight.shape == b.weight.shape
        assert a.weight.dtype == b.weight.dtype and (a.bias is None) == (b.bias is None)
    conv = got.get_submodule("block.conv")
    assert (conv.stride, conv.padding, conv.dilation) == ((2, 2), (1, 1), (2, 2))
    assert got.get_submodule("head").weight is got.get_submodule("emb").weight


def test_an_outline_naming_no_dtype_is_refused():
    """The outline is data: a dtype field that is not a torch dtype (``"load"`` names a torch
    function) is an error naming it, never something called."""
    from engram_ray.models.outline import outline_module

    bad = {"names": ["m"], "modules": {"m": {"kind": "linear", "weight_shape": [2, 3],
                                             "dtype": "load", "bias": False, "tied": ["m"]}}}
    with pytest.raises(ValueError, match="unknown dtype 'load'"):
        outline_module(bad)
