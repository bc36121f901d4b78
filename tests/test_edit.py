"""Edits: W' = W − α Σ f_l W⁺_c against hand arithmetic; scales; selection; tied weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engram_ray import Batch, apply_edit, extract, plan_edit
from engram_ray.core.edit import compose, union_engram


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
    x = torch.randn(120, 6)
    labels = [["a", "b", "c", None][i % 4] for i in range(120)]
    run = extract(model, [Batch(x[:60], labels[:60]), Batch(x[60:], labels[60:])],
                  uri=str(tmp_path_factory.mktemp("runs") / "mlp"))
    return model, run


def clone(model):
    import copy

    return copy.deepcopy(model)


def test_uniform_edit_subtracts_alpha_times_sum(mlp_run):
    model, run = mlp_run
    edited = clone(model)
    apply_edit(edited, plan_edit(run, ["a", "c"], alpha=0.7))
    for name in ("0", "2", "4"):
        w0, w1 = model.get_submodule(name), edited.get_submodule(name)
        expect_w = w0.weight - 0.7 * (run.engram("a", name) + run.engram("c", name))
        expect_b = w0.bias - 0.7 * (run.bias("a", name) + run.bias("c", name))
        assert torch.allclose(w1.weight, expect_w, atol=1e-6)
        assert torch.allclose(w1.bias, expect_b, atol=1e-6)


def test_negative_alpha_amplifies(mlp_run):
    model, run = mlp_run
    edited = clone(model)
    apply_edit(edited, plan_edit(run, ["b"], alpha=-2.0))
    assert torch.allclose(edited[0].weight, model[0].weight + 2.0 * run.engram("b", "0"), atol=1e-6)


def test_forgetting_all_concepts_at_alpha_one_is_near_zero_output_for_full_data():
    # target = total: W⁺ = W, so α=1 zeroes the layer (full-rank inputs).
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3))
    import tempfile

    run = extract(model, [Batch(torch.randn(30, 4), ["all"] * 30)], uri=tempfile.mkdtemp() + "/r")
    apply_edit(model, plan_edit(run, ["all"], alpha=1.0))
    assert model[0].weight.abs().max() < 1e-5 and model[0].bias.abs().max() < 1e-5


def test_weight_norm_scale(mlp_run):
    _, run = mlp_run
    plan = plan_edit(run, ["a", "b"], alpha=1.0, scale="weight_norm")
    ratios = {}
    for m in run.modules:
        w, b = union_engram(run, ["a", "b"], m)
        e = torch.cat([w, b[:, None]], 1)
        ratios[m] = float(torch.linalg.norm(e)) / run.module_info(m)["weight_norm"]
    top = max(ratios.values())
    for m in run.modules:
        assert math.isclose(plan.scales[m], ratios[m] / top, rel_tol=1e-6)
    assert max(plan.scales.values()) == pytest.approx(1.0)


def test_scales_read_engrams_on_demand_one_at_a_time(mlp_run):
    """A scale function sees the union engrams lazily: each is read when looked up and none is
    kept, so planning a model-wide scale never holds every engram at once."""
    _, run = mlp_run

    class Counting:
        def __init__(self, inner):
            self.inner, self.reads = inner, []
            self.concepts, self.modules = inner.concepts, inner.modules

        def engram(self, c, m):
            self.reads.append((c, m))
            return self.inner.engram(c, m)

        def bias(self, c, m):
            return self.inner.bias(c, m)

        def module_info(self, m):
            return self.inner.module_info(m)

    seen = []

    def spy(engrams, infos):
        assert not isinstance(engrams, dict) and sorted(engrams) == sorted(infos)
        for m, e in engrams.items():
            seen.append((m, tuple(e.shape)))
        return {m: 1.0 for m in engrams}

    src = Counting(run)
    plan_edit(src, ["a", "b"], scale=spy)
    assert sorted(src.reads) == sorted((c, m) for c in ("a", "b") for m in run.modules)
    assert [m for m, _ in seen] == list(run.modules)
    assert plan_edit(src, ["a"], scale="weight_norm").scales == plan_edit(
        run, ["a"], scale="weight_norm").scales


def test_effective_rank_and_compose(mlp_run):
    _, run = mlp_run
    er = plan_edit(run, ["a"], scale="effective_rank").scales
    wn = plan_edit(run, ["a"], scale="weight_norm").scales
    both = plan_edit(run, ["a"], scale="weight_norm*effective_rank").scales
    fn = plan_edit(run, ["a"], scale=compose("weight_norm", "effective_rank")).scales
    prod = {m: er[m] * wn[m] for m in er}
    top = max(prod.values())
    for m in er:
        assert both[m] == pytest.approx(prod[m] / top) == pytest.approx(fn[m])
        assert 0 < er[m] <= 1
    with pytest.raises(ValueError, match="unknown scale"):
        plan_edit(run, ["a"], scale="nope")


def test_module_selection_at_apply_time(mlp_run):
    model, run = mlp_run
    edited = clone(model)
    applied = apply_edit(edited, plan_edit(run, ["a"], modules=["2"]))
    assert list(applied) == ["2"]
    assert torch.equal(edited[0].weight, model[0].weight)
    assert not torch.equal(edited[2].weight, model[2].weight)
    with pytest.raises(ValueError, match="matches none"):
        plan_edit(run, ["a"], modules=["q_proj"])


def test_unknown_concept_is_named(mlp_run):
    _, run = mlp_run
    with pytest.raises(ValueError, match="'zzz'"):
        plan_edit(run, ["zzz"])


def test_tied_parameters_are_edited_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight  # one parameter, two modules

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(2)
    model = Tied()
    run = extract(model, [Batch(torch.randn(40, 4), ["k"] * 20 + [None] * 20)], uri=str(tmp_path / "r"))
    before = model.a.weight.detach().clone()
    plan = plan_edit(run, ["k"], alpha=1.0)
    applied = apply_edit(model, plan)
    assert list(applied) == ["a"]
    assert torch.allclose(model.a.weight, before - run.engram("k", "a"), atol=1e-6)
    assert any("tied" in n for n in plan.notes)
