"""The solver says when its cut mattered (issue 13): a Σ of condition number ~1e60 silently kept
1 of 5 directions, and engrams many times their weight's norm passed unnoticed. Now every
group's kept directions are in run.json, and a group keeping almost none or an engram over 10×
its weight is a ``warnings`` entry naming group, module and concept, and a line on stderr."""

from __future__ import annotations

import io

import torch
from torch import nn

from engram_ray import Batch, open_run
from engram_ray.config import StoreConfig
from engram_ray.core.solve import solution_warnings, spectral_inverse
from engram_ray.extraction import plan_for, run_extraction
from engram_ray.local import LocalExecutor


def run_with_log(model, batches, uri):
    """``extract`` with its progress log kept (the Python API discards it)."""
    store = StoreConfig(uri=uri.rsplit("/", 1)[0])
    plan = plan_for(uri, store, uri.rsplit("/", 1)[1], sources=[])
    log = io.StringIO()
    once = iter([batches])
    run_extraction(plan, LocalExecutor(model, lambda files: next(once)), log=log)
    return open_run(uri), log.getvalue()


def test_condition_number_1e60_warns_kept_directions(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    x = torch.randn(60, 5)
    x[:, 1:] *= 1e-30  # scales 1 and 1e-30: Σ's condition number ~1e60
    run, log = run_with_log(model, [Batch(x, ["a"] * 20 + [None] * 40)],
                            str(tmp_path / "r"))
    group = run.module_info("0")["group"]
    assert run.info["groups"][group]["kept"] == 1 and run.record("a", "0")["kept"] == 1
    found = [w for w in run.info["warnings"] if w["kind"] == "directions"]
    assert found == [{"kind": "directions", "group": group, "kept": 1, "dim": 5,
                      "message": found[0]["message"]}]
    assert f"warning: input group {group!r}: the pseudo-inverse of Σ kept 1 of 5" in log


def test_engram_far_larger_than_its_weight_warns(tmp_path):
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
    t = torch.randn(40, generator=torch.Generator().manual_seed(1))
    delta = 0.01  # concept rows (t, δt), the others (s, -δs): ‖W⁺_a‖ ≈ ‖W‖ / 2δ
    x = torch.stack([t, delta * t * torch.where(torch.arange(40) < 20, 1.0, -1.0)], 1)
    run, log = run_with_log(model, [Batch(x, ["a"] * 20 + [None] * 20)], str(tmp_path / "r"))
    ratio = run.record("a", "0")["rel_norm"]
    assert ratio > 10
    norm = [w for w in run.info["warnings"] if w["kind"] == "norm"]
    assert [(w["module"], w["concept"]) for w in norm] == [("0", "a")]
    assert "engram of concept 'a' at module '0'" in log and "its weight's norm" in log


def test_well_conditioned_run_has_no_warnings(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(60, 5)
    run, log = run_with_log(model, [Batch(x, ["a"] * 20 + ["b"] * 20 + [None] * 20)],
                            str(tmp_path / "r"))
    assert run.info["warnings"] == [] and "warning" not in log
    assert all(g["kept"] == g["dim"] for g in run.info["groups"].values())


def test_spectral_inverse_counts_and_warning_caps():
    sigma = torch.diag(torch.tensor([1.0, 1e-30, 1e-30, 1e-30, 1e-30], dtype=torch.float64))
    assert spectral_inverse(sigma)[1] == 1
    assert spectral_inverse(torch.zeros(3, 3))[1] == 0
    many = [("g", f"m{i}", "c", 11.0 + i) for i in range(25)]
    out = solution_warnings({"g": (100, 100)}, many)
    assert len(out) == 21 and out[0]["rel_norm"] == 35.0 and "5 more" in out[-1]["message"]
    assert solution_warnings({"g": (1, 1)}, []) == []  # a 1-wide input keeps its 1 direction
