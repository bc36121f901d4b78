"""Correctness anchors: engrams against exact, independent float64 oracles computed from the raw
activation matrices (never from our own Σ code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram_ray import Batch, SolverConfig, extract
from engram_ray.core.capture import collect_statistics
from engram_ray.core.layers import weight_matrix
from engram_ray.core.solve import default_rtol, engram_matrix, pseudo_inverse


def engrams_of(model, batches, **kw):
    """{(concept, module): (out, D) float64 engram matrix} via the single-process engine: a
    committed run (format 3: statistics), each engram formed on read through the public API."""
    import tempfile

    solver = kw.pop("solver", SolverConfig())
    batches = list(batches)
    stats = collect_statistics(model, batches, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        run = extract(model, batches, uri=f"{tmp}/run", solver=solver, **kw)
        out = {}
        for (c, m) in ((c, m) for c in run.concepts for m in run.modules):
            info = stats.modules[m]
            w = run.engram(c, m).double()
            w = w.T if info.kind == "conv1d" else w.reshape(w.shape[0], -1)
            bias = run.bias(c, m)
            if bias is not None:
                w = torch.cat([w, bias.double()[:, None]], 1)
            out[(c, m)] = w
    return out, stats


def kkt_oracle(w, x_plus, x_minus, rcond=1e-15):
    """Appendix A eq. 17: W [X⁺ 0] 𝒳† with 𝒳 = [X⁺ X⁻] (columns are inputs), numpy float64.

    ``rcond`` cuts singular values of the *data* matrix; the engine cuts eigenvalues of Σ = 𝒳𝒳ᵀ
    at ``D·eps32``, i.e. singular values at ``sqrt(D·eps32)``.
    """
    big = np.concatenate([x_plus, x_minus], axis=1)  # (D, n⁺ + n⁻)
    target = np.concatenate([x_plus, np.zeros_like(x_minus)], axis=1)
    return w @ target @ np.linalg.pinv(big, rcond=rcond)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("bias", [False, True])
def test_engram_equals_dense_kkt_solution(bias):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=bias)
    x = torch.randn(60, 6, dtype=torch.float64)
    labels = ["a"] * 15 + ["b"] * 20 + [None] * 25
    eng, _ = engrams_of(nn.Sequential(lin), [Batch(x.float(), labels)])
    xf = x.float().double().numpy()  # the engine sees float32 activations
    if bias:
        xf = np.concatenate([xf, np.ones((60, 1))], axis=1)
    w = weight_matrix(lin, bias).numpy()
    for c, rows in (("a", slice(0, 15)), ("b", slice(15, 35))):
        mask = np.zeros(60, bool)
        mask[rows] = True
        oracle = kkt_oracle(w, xf[mask].T, xf[~mask].T)
        assert rel(eng[(c, "0")], oracle) < 1e-6


def test_reference_in_disjoint_subspace_is_annihilated():
    torch.manual_seed(1)
    lin = nn.Linear(6, 5, bias=False)
    xp = torch.zeros(30, 6)
    xp[:, :3] = torch.randn(30, 3)  # target spans e1..e3
    xm = torch.zeros(30, 6)
    xm[:, 3:] = torch.randn(30, 3)  # reference spans e4..e6
    eng, _ = engrams_of(nn.Sequential(lin), [Batch(torch.cat([xp, xm]), ["t"] * 30 + [None] * 30)])
    e = eng[("t", "0")]
    assert torch.linalg.norm(e @ xm.double().T) < 1e-8 * torch.linalg.norm(e)
    w = lin.weight.double()
    assert rel(e @ xp.double().T, w.detach() @ xp.double().T) < 1e-6


def test_target_equal_total_gives_the_weight():
    torch.manual_seed(2)
    lin = nn.Linear(7, 3)
    eng, _ = engrams_of(nn.Sequential(lin), [Batch(torch.randn(50, 7), ["all"] * 50)])
    assert rel(eng[("all", "0")], weight_matrix(lin).numpy()) < 1e-6


def test_union_engram_is_sum_of_engrams():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(80, 6)
    labels = ["a"] * 20 + ["b"] * 25 + ["c"] * 15 + [None] * 20
    merged = ["ab" if c in ("a", "b") else c for c in labels]
    eng, _ = engrams_of(model, [Batch(x[:40], labels[:40]), Batch(x[40:], labels[40:])])
    union, _ = engrams_of(model, [Batch(x[:40], merged[:40]), Batch(x[40:], merged[40:])])
    for m in ("0", "2"):
        # Only float32 rounding of the per-batch Gram blocks differs (a∪b summed in one block).
        assert rel(union[("ab", m)], eng[("a", m)] + eng[("b", m)]) < 1e-5
    # Exactly linear in Σ_c: solving Σ_a + Σ_b equals the sum of the two solves.
    stats = collect_statistics(model, [Batch(x, labels)])
    for g, mom in stats.groups.items():
        mom.concepts["ab"] = mom.sigma("a") + mom.sigma("b")
        mom.counts["ab"] = mom.counts["a"] + mom.counts["b"]
        members = stats.members(g)
        weights = {i.name: weight_matrix(model.get_submodule(i.name)) for i in members}
        pinv = pseudo_inverse(mom.total)
        recs = {c: {i.name: engram_matrix(weights[i.name], mom.sigma(c), pinv) for i in members}
                for c in ("a", "b", "ab")}
        for i in members:
            summed = recs["a"][i.name] + recs["b"][i.name]
            assert rel(recs["ab"][i.name], summed) < 1e-9  # exactly linear in Σ_c (float64)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(stride=1, padding="same", dilation=2),
        dict(stride=1, padding=1, padding_mode="reflect"),
        dict(stride=(1, 2), padding=(0, 1), bias=False),
    ],
)
def test_conv2d_engram_equals_linear_engram_of_unfolded_problem(kwargs):
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, **kwargs)
    x = torch.randn(6, 2, 7, 7)
    labels = ["a", "a", "b", None, "b", None]
    eng, stats = engrams_of(nn.Sequential(conv), [Batch(x, labels)])
    # Oracle: compute the conv's output with the unfolded patches to prove they are its inputs,
    # then solve the Linear problem over patches in numpy.
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    cols = F.unfold(xp, conv.kernel_size, conv.dilation, 0, conv.stride)  # (B, D, L)
    wflat = conv.weight.reshape(3, -1)
    y = (wflat @ cols).reshape(6, 3, *conv(x).shape[2:])
    if conv.bias is not None:
        y = y + conv.bias[None, :, None, None]
    assert torch.allclose(y, conv(x), atol=1e-5)
    patches = cols.transpose(1, 2).double().numpy()  # (B, L, D)
    if conv.bias is not None:
        patches = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], axis=2)
    w = weight_matrix(conv).numpy()
    for c in ("a", "b"):
        sel = np.array([lab == c for lab in labels])
        xp_, xm_ = patches[sel].reshape(-1, w.shape[1]), patches[~sel].reshape(-1, w.shape[1])
        assert rel(eng[(c, "0")], kkt_oracle(w, xp_.T, xm_.T)) < 1e-5
    assert stats.modules["0"].weight_shape == tuple(conv.weight.shape)


def test_token_mask_equals_dropping_the_tokens():
    torch.manual_seed(5)
    lin = nn.Linear(5, 4)
    x = torch.randn(4, 12, 5)
    mask = torch.rand(4, 12) > 0.4
    labels = ["a", None, "b", "a"]
    eng, _ = engrams_of(nn.Sequential(lin), [Batch(x, labels, mask=mask)])
    # Oracle: only the kept tokens, as an unmasked batch of single-token rows.
    rows, lab = [], []
    for i in range(4):
        for t in range(12):
            if mask[i, t]:
                rows.append(x[i, t])
                lab.append(labels[i])
    flat, _ = engrams_of(nn.Sequential(lin), [Batch(torch.stack(rows), lab)])
    for c in ("a", "b"):
        assert rel(eng[(c, "0")], flat[(c, "0")]) < 1e-9


def test_shared_input_groups_match_one_accumulator_per_module():
    from engram_ray.models.tiny import tiny_llama

    model = tiny_llama(layers=2)
    torch.manual_seed(6)
    ids = torch.randint(3, 100, (6, 10))
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                  ["a", "b", None, "a", "b", None])
    shared, s_stats = engrams_of(model, [batch])
    alone, a_stats = engrams_of(model, [batch], share_inputs=False)
    # q/k/v and gate/up share: 4 groups per layer (qkv, o, gate/up, down) + lm_head.
    assert len(s_stats.groups) == 2 * 4 + 1
    assert len(a_stats.groups) == len(a_stats.modules) == 2 * 7 + 1
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert s_stats.modules[q].group == s_stats.modules[k].group
    assert set(shared) == set(alone)
    for key in shared:
        assert rel(shared[key], alone[key]) < 1e-9


def test_gpt2_conv1d_engrams_match_oracle_and_shapes_round_trip():
    from engram_ray.models.tiny import tiny_gpt2

    model = tiny_gpt2(layers=1)
    torch.manual_seed(7)
    ids = torch.randint(3, 100, (8, 12))
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["a"] * 3 + [None] * 5)
    stats = collect_statistics(model, [batch])
    modules = dict(model.named_modules())
    for name, info in stats.modules.items():
        assert info.weight_shape == tuple(modules[name].weight.shape)
    assert stats.modules["transformer.h.0.attn.c_attn"].kind == "conv1d"
    # Oracle for c_attn: capture its raw input with a plain hook and solve in numpy.
    captured = []
    h = modules["transformer.h.0.attn.c_attn"].register_forward_pre_hook(
        lambda m, a: captured.append(a[0].detach().double()))
    with torch.no_grad():
        model(**batch.inputs)
    h.remove()
    x = captured[0].numpy()  # (B, T, D)
    x = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)
    w = weight_matrix(modules["transformer.h.0.attn.c_attn"]).numpy()
    # LayerNorm output sums to 0 over features: Σ has an exact null direction (rank-deficient),
    # so the oracle must cut at the contract's level: σ > sqrt(D·eps32)·σ_max.
    d = w.shape[1]
    oracle = kkt_oracle(w, x[:3].reshape(-1, d).T, x[3:].reshape(-1, d).T,
                        rcond=np.sqrt(default_rtol(d)))
    eng, _ = engrams_of(model, [batch])
    assert rel(eng[("a", "transformer.h.0.attn.c_attn")], oracle) < 1e-4


def test_every_linear_module_of_tiny_llama_and_gpt2_gets_an_engram(tmp_path):
    from engram_ray import extract
    from engram_ray.core.layers import module_kind
    from engram_ray.models.tiny import tiny_gpt2, tiny_llama

    for model in (tiny_llama(), tiny_gpt2()):
        ids = torch.randint(3, 100, (4, 9))
        batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["x", "y", None, "x"])
        run = extract(model, [batch], uri=str(tmp_path / type(model).__name__))
        linear = sorted(n for n, m in model.named_modules() if module_kind(m) is not None)
        assert run.modules == linear and "lm_head" in linear
        assert run.concepts == ["x", "y"]
        for n in linear:
            assert run.engram("x", n).shape == model.get_submodule(n).weight.shape


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("solver", [SolverConfig(), SolverConfig(condition_cap=1e3),
                                    SolverConfig(ridge=0.05)])
def test_low_rank_factored_engram_equals_dense_oracle(bias, solver):
    """Concepts with ≤ D/2 tokens come out as rank-n_c factors; they must equal the dense
    float64 solution computed from the raw activations (and the dense-form engine)."""
    torch.manual_seed(12)
    lin = nn.Linear(40, 9, bias=bias)
    x = torch.randn(120, 40)
    labels = ["a"] * 8 + ["b"] * 30 + [None] * 82  # D = 40(+1): "a" stays rows, "b" does not
    batches = [Batch(x[:50], labels[:50]), Batch(x[50:], labels[50:])]
    eng, stats = engrams_of(nn.Sequential(lin), batches, solver=solver)
    dense, dstats = engrams_of(nn.Sequential(lin), batches, solver=solver, low_rank=False)
    (mom,) = stats.groups.values()
    assert set(mom.rows) == {"a"} and set(mom.concepts) == {"b"}
    assert not next(iter(dstats.groups.values())).rows
    xf = x.double().numpy()
    if bias:
        xf = np.concatenate([xf, np.ones((120, 1))], axis=1)
    w = weight_matrix(lin, bias).numpy()
    pinv = pseudo_inverse(torch.from_numpy(xf.T @ xf), solver).numpy()  # checked vs numpy above
    for c, rows in (("a", slice(0, 8)), ("b", slice(8, 38))):
        oracle = w @ (xf[rows].T @ xf[rows]) @ pinv
        assert rel(eng[(c, "0")], oracle) < 1e-6
        assert rel(dense[(c, "0")], oracle) < 1e-6
    if solver == SolverConfig():  # the default cut keeps every direction here: eq. 17 holds
        mask = np.zeros(120, bool)
        mask[:8] = True
        assert rel(eng[("a", "0")], kkt_oracle(w, xf[mask].T, xf[~mask].T)) < 1e-6


def test_low_rank_and_dense_runs_agree_on_tiny_llama_gpt2_and_conv(tmp_path):
    from engram_ray import extract
    from engram_ray.models.tiny import tiny_gpt2, tiny_llama

    torch.manual_seed(13)
    conv = nn.Sequential(nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    cases = [(conv, Batch(torch.randn(6, 8, 4, 4), ["x", "y", None, None, None, "y"]))]
    for model in (tiny_llama(), tiny_gpt2()):
        ids = torch.randint(3, 100, (6, 9))
        cases.append((model, Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                   ["x", "y", None, None, None, "y"])))
    for model, batch in cases:
        name = type(model).__name__
        low = extract(model, [batch], uri=str(tmp_path / f"{name}-low"))
        full = extract(model, [batch], uri=str(tmp_path / f"{name}-dense"), low_rank=False)
        forms = set(low.manifest.column("form").to_pylist())
        assert "factored" in forms, name
        assert set(full.manifest.column("form").to_pylist()) == {"dense"}
        for c in ("x", "y"):
            for m in low.modules:
                assert rel(low.engram(c, m), full.engram(c, m)) < 1e-5, (name, c, m)
                b = low.bias(c, m)
                if b is not None:
                    assert rel(b, full.bias(c, m)) < 1e-5, (name, c, m)
                rec_l, rec_f = low.record(c, m), full.record(c, m)
                assert abs(rec_l["rel_norm"] - rec_f["rel_norm"]) <= 1e-6 * rec_f["rel_norm"]


def test_solver_options():
    torch.manual_seed(8)
    a = torch.randn(40, 10, dtype=torch.float64)
    sigma = a.T @ a
    sigma[:, -1] = sigma[-1, :] = 0  # one exact null direction
    evals = np.linalg.eigvalsh(sigma.numpy())
    p = pseudo_inverse(sigma)
    assert rel(p, np.linalg.pinv(sigma.numpy(), rcond=default_rtol(10), hermitian=True)) < 1e-9
    # keep-top-k: rank(P) = k
    k = pseudo_inverse(sigma, SolverConfig(rank_fraction=0.5))
    assert np.linalg.matrix_rank(k.numpy(), tol=1e-12) == 5
    # condition cap: only eigenvalues ≥ λmax / cap survive
    cap = float(evals[-1] / evals[-4]) * 0.999
    c = pseudo_inverse(sigma, SolverConfig(condition_cap=cap))
    assert np.linalg.matrix_rank(c.numpy(), tol=1e-12) == 3
    # ridge: (Σ + λI)⁻¹ with λ = ridge · mean eigenvalue
    r = pseudo_inverse(sigma, SolverConfig(ridge=0.1))
    lam = 0.1 * np.clip(evals, 0, None).mean()
    assert rel(r, np.linalg.inv(sigma.numpy() + lam * np.eye(10))) < 1e-9
    with pytest.raises(ValueError, match="ridge"):
        SolverConfig(ridge=0.1, rtol=1e-3)
    with pytest.raises(ValueError, match="rank_fraction"):
        SolverConfig(rank_fraction=1.5)


def test_default_cut_is_float32_eps_times_dim_not_float64():
    # An eigenvalue just below D·eps32·λmax is dropped even though float64 could invert it.
    d = 8
    evals = np.array([1.0] * 6 + [d * 1.1920928955078125e-07 * 0.5, 1e-3])
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
    sigma = torch.from_numpy(q @ np.diag(evals) @ q.T)
    p = pseudo_inverse(sigma).numpy()
    assert np.linalg.matrix_rank(p, tol=1e-9) == 7
