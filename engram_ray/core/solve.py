"""The paper's closed-form engram: ``W⁺_c = W Σ_c Σ_total⁺`` per module and concept.

Why this formula: among all matrices that reproduce the layer's outputs on the concept's inputs
and map every other input to zero, ``W Σ_c Σ_total⁺`` is the minimum-norm least-squares one (the
KKT solution ``W [X⁺ 0] 𝒳†`` of AI Engram's Appendix A, written with Gram matrices so it never
needs the raw activations). It is linear in Σ_c, so engrams of disjoint concepts add up.

Numeric contract (the defaults reproduce the reference implementation's TOFU numbers):

- ``Σ_total⁺`` comes from the symmetric eigendecomposition solved in float64;
- eigenvalues ``λ > rtol · λ_max`` are kept with ``rtol = D · 1.1920928955078125e-07``: a
  *float32* epsilon, fixed whatever the compute dtype. Σ was formed from float32 products, so
  directions below that level are rounding noise; a float64-eps cut keeps them and their huge
  inverses ruin the edit;
- alternatives: an explicit ``rtol``, a ``condition_cap`` (keep ``λ ≥ λ_max / cap``),
  ``rank_fraction`` (keep the top ⌈f·D⌉ eigenpairs) — cuts intersect when combined — or
  ``ridge`` damping ``(Σ + λI)⁻¹`` with ``λ = ridge · mean eigenvalue`` (UCE's closed form; scaled
  by the mean eigenvalue so the same ridge means the same thing for 1k or 1M tokens).

One eigendecomposition serves every concept and every module of an input group.

Telling the user when the cut mattered: every record carries how many directions of the
group's D the pseudo-inverse kept (``kept``) and its norm ratio ``rel_norm = ‖W⁺_c‖/‖W‖``.
:func:`solution_warnings` turns them into warnings (``run.json`` ``warnings`` and stderr) when a
group kept fewer than ``max(MIN_KEPT, 5 %)`` of its directions (Σ nearly singular or extremely
ill-conditioned: the engram only sees that span) or an engram is more than ``MAX_REL_NORM`` times
its weight (a rescaled inverse of tiny eigenvalues; applying it would wreck the layer). Neither
stops the run: both can be legitimate (few tokens, a deliberate ``rank_fraction``), so they are
reported, never silent.

Concepts kept as raw rows ``X_c`` (fewer tokens than half the layer's width, see ``moments.py``)
get their engram as exact rank-n_c factors instead of a dense matrix:

    W Σ_c Σ⁺ = (W X_cᵀ)(X_c Σ⁺) = A B,    A: (out, n_c),  B: (n_c, D)

which costs ``(out + D)·D·n_c`` flops instead of ``2·out·D²`` and stores ``(out + D)·n_c`` numbers
instead of ``out·D``. A and B are formed in float64 and kept in float32 like dense engrams. Could
float32 factors lose accuracy by cancellation inside the product? Measured on the benchmark's
Llama (50 authors, every group): the product of the float32 factors is within 2.6e-8 (median) /
3.8e-8 (worst) of the float64 engram, the same as rounding the dense engram to float32 (2.5e-8);
orthonormalizing B by a QR first gave the same accuracy at a third of the solve's cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from engram_ray.config import FLOAT32_EPS, SolverConfig
from engram_ray.core.moments import ModuleInfo, Moments

__all__ = [
    "FLOAT32_EPS",
    "EngramRecord",
    "FactoredEngram",
    "SolverConfig",
    "default_rtol",
    "engram_matrix",
    "pseudo_inverse",
    "solution_warnings",
    "solve_group",
    "spectral_inverse",
    "to_weight_shape",
]

# Warning thresholds (see the module docstring).
MIN_KEPT_FRACTION = 0.05
MIN_KEPT = 2
MAX_REL_NORM = 10.0
MAX_LISTED = 20  # norm warnings listed one by one; the rest are counted in one entry


def default_rtol(dim: int) -> float:
    """``D × eps(float32)``: the reference implementation's pinned spectral cut."""
    return dim * FLOAT32_EPS


def pseudo_inverse(sigma: torch.Tensor, config: SolverConfig = SolverConfig()) -> torch.Tensor:
    """Spectral pseudo-inverse (or ridge inverse) of a symmetric PSD ``(D, D)`` matrix, float64."""
    return spectral_inverse(sigma, config)[0]


def spectral_inverse(sigma: torch.Tensor,
                     config: SolverConfig = SolverConfig()) -> tuple[torch.Tensor, int]:
    """:func:`pseudo_inverse` and how many of the D directions it kept (D for ridge: every
    direction is damped, none dropped; 0 for a zero Σ)."""
    d = sigma.shape[0]
    sym = sigma.double()
    sym = (sym + sym.T) / 2  # remove fp asymmetry before eigh
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    lam_max = evals[-1].clamp_min(0)
    if lam_max <= 0:
        return torch.zeros_like(sym), 0
    if config.ridge is not None:
        lam = config.ridge * evals.clamp_min(0).mean()
        inv = 1.0 / (evals.clamp_min(0) + lam)
        return (evecs * inv) @ evecs.T, d
    rtol = config.rtol if config.rtol is not None else default_rtol(d)
    cut = rtol * lam_max
    if config.condition_cap is not None:
        cut = torch.maximum(cut, lam_max / config.condition_cap)
    keep = evals > cut
    if config.rank_fraction is not None:
        k = math.ceil(config.rank_fraction * d)
        top = torch.zeros_like(keep)
        top[-k:] = True
        keep &= top
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    return (evecs * inv) @ evecs.T, int(keep.sum())  # V diag(1/λ) Vᵀ over kept eigenpairs


def engram_matrix(w: torch.Tensor, sigma_c: torch.Tensor, pinv: torch.Tensor) -> torch.Tensor:
    """``W Σ_c Σ⁺`` for ``W`` (out, D), float64, in the cheaper association order.

    ``(W Σ_c) Σ⁺`` costs 2·out·D² flops, ``W (Σ_c Σ⁺)`` costs D³ + out·D²: the second wins
    when out > D (gate/up projections, lm_head).
    """
    w, sigma_c = w.double(), sigma_c.double()
    if w.shape[0] > w.shape[1]:
        return w @ (sigma_c @ pinv)
    return (w @ sigma_c) @ pinv


def weight_layout(mat: torch.Tensor, kind: str, shape: Sequence[int]) -> torch.Tensor:
    """An (out, in_flat) matrix in the module's own weight layout (GPT-2 Conv1D is [in, out])."""
    if kind == "conv1d":
        mat = mat.T
    return mat.reshape(tuple(shape)).contiguous()


def to_weight_shape(mat: torch.Tensor, info: ModuleInfo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split an (out, D) matrix into (weight in the module's own layout, bias or None)."""
    bias = mat[:, -1].contiguous() if info.bias else None
    w = mat[:, :-1] if info.bias else mat
    return weight_layout(w, info.kind, info.weight_shape), bias


@dataclass
class FactoredEngram:
    """A weight engram ``A @ B`` in (out, in_flat) orientation, ``kind``/``shape`` its layout.

    ``a``: (out, r); ``b``: (r, in_flat) — ``in_flat`` is ``C·kh·kw`` for Conv2d; GPT-2's Conv1D
    is transposed back to ``[in, out]`` by :meth:`weight`. The bias part is kept dense.
    """

    a: torch.Tensor
    b: torch.Tensor
    kind: str = "linear"
    shape: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def weight(self) -> torch.Tensor:
        """The dense engram in the module's layout, float32 (product taken in float64)."""
        mat = self.a.double() @ self.b.double()
        shape = self.shape if self.shape is not None else tuple(mat.shape)
        return weight_layout(mat, self.kind, shape).float()


@dataclass
class EngramRecord:
    """One (concept, module) engram in the module's weight layout, float32.

    Dense engrams carry ``weight``; engrams of concepts kept as rows carry ``factors`` instead
    (``weight`` is None). :meth:`dense` gives the weight either way.
    """

    concept: str
    module: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    n: int  # concept tokens
    n_total: int  # all tokens of the input group
    rel_norm: float  # ‖W⁺‖_F / ‖W‖_F (bias included when absorbed)
    weight_norm: float  # ‖W‖_F (bias included when absorbed)
    factors: FactoredEngram | None = None
    kept: int | None = None  # directions of the group's D that Σ_total⁺ kept

    def dense(self) -> torch.Tensor:
        return self.weight if self.weight is not None else self.factors.weight()


def solve_group(
    moments: Moments,
    members: Sequence[ModuleInfo],
    weights: Mapping[str, torch.Tensor],
    config: SolverConfig = SolverConfig(),
    concepts: Sequence[str] | None = None,
) -> Iterator[EngramRecord]:
    """Yield every (concept, module) engram of one input group: one eigh, then matmuls.

    ``weights[name]`` is the module as an (out, D) matrix (see ``capture.weight_matrix``).
    Records come concept by concept so a writer can stream them with one engram in memory.
    """
    for info in members:
        w = weights[info.name]
        if w.shape[1] != moments.dim:
            raise ValueError(f"module {info.name!r}: weight width {w.shape[1]} ≠ Σ dim {moments.dim}")
        if not torch.isfinite(w).all():
            raise ValueError(f"module {info.name!r} has non-finite weights")
    device = moments.total.device
    pinv, kept = spectral_inverse(moments.total, config)
    norms = {i.name: float(torch.linalg.norm(weights[i.name].double())) for i in members}
    # All modules of the group as one (Σ out, D) matrix: one matmul chain per concept.
    stacked = torch.cat([weights[i.name].double() for i in members]).to(device)
    splits = [weights[i.name].shape[0] for i in members]
    names = list(concepts if concepts is not None else moments.names)
    for c in names:
        if moments.counts.get(c, 0) == 0:
            raise ValueError(f"concept {c!r} has zero tokens after masking; no engram exists")
    small = [c for c in names if c in moments.rows]
    for c in (c for c in names if c not in moments.rows):
        mats = engram_matrix(stacked, moments.concepts[c], pinv).split(splits)
        for info, mat in zip(members, mats):
            w, b = to_weight_shape(mat.float().cpu(), info)
            yield _record(c, info, moments, float(torch.linalg.norm(mat)), norms[info.name],
                          weight=w, bias=b, kept=kept)
    for chunk in _chunks(small, moments, _rows_per_chunk(moments.dim, stacked.shape[0])):
        for rec in _factored(chunk, moments, members, stacked, splits, pinv, norms):
            rec.kept = kept
            yield rec


def _rows_per_chunk(dim: int, outputs: int, budget_bytes: int = 256 << 20) -> int:
    """How many concept rows to solve at once: the float64 ``A`` and ``B`` of a chunk take
    ``8·rows·(outputs + dim)`` bytes; one big matmul per chunk instead of two per concept."""
    return max(1, budget_bytes // (8 * (outputs + dim)))


def _chunks(names: Sequence[str], moments: Moments, limit: int) -> Iterator[list[str]]:
    chunk, rows = [], 0
    for c in names:
        n = moments.rows[c].shape[0]
        if chunk and rows + n > limit:
            yield chunk
            chunk, rows = [], 0
        chunk.append(c)
        rows += n
    if chunk:
        yield chunk


def _factored(chunk, moments, members, stacked, splits, pinv, norms) -> Iterator[EngramRecord]:
    """Rank-n_c engrams ``(W X_cᵀ)(X_c Σ⁺)`` of concepts kept as rows (module docstring),
    every concept of the chunk in one pair of matmuls."""
    xs = [moments.rows[c].to(stacked.device, torch.float64) for c in chunk]  # exact float32
    x = torch.cat(xs)  # (Σ n_c, D)
    b_all = x @ pinv  # X_c Σ⁺ for every concept, stacked by rows
    a_all = stacked @ x.T  # W X_cᵀ for every module (rows) and concept (columns)
    start = 0
    for c, xc in zip(chunk, xs):
        cols = slice(start, start + xc.shape[0])
        start += xc.shape[0]
        b = b_all[cols]  # (n_c, D)
        a = a_all[:, cols]  # (Σout, n_c)
        # ‖A_m B‖²_F = Σ_rows of A_m of (A_m B Bᵀ) ∘ A_m: every module's norm from one (Σout, n_c)
        # product, without forming A B; the bias column is included, as for dense engrams.
        sq = (a @ (b @ b.T)).mul_(a).sum(1)
        norms_c = [float(part.sum().clamp_min(0).sqrt()) for part in sq.split(splits)]
        a32 = a.float().cpu().contiguous()  # module blocks below are contiguous row ranges
        # Modules of one input group share the bias flag (it is part of the group's signature).
        bias = members[0].bias
        right = (b[:, :-1] if bias else b).float().cpu().contiguous()
        biases = (a @ b[:, -1]).float().cpu().split(splits) if bias else [None] * len(members)
        for info, a_m, bias_m, norm in zip(members, a32.split(splits), biases, norms_c):
            yield _record(c, info, moments, norm, norms[info.name], weight=None, bias=bias_m,
                          factors=FactoredEngram(a_m, right, info.kind, tuple(info.weight_shape)))


def _record(concept: str, info: ModuleInfo, moments: Moments, norm: float, weight_norm: float,
            **payload) -> EngramRecord:
    """An engram's record: counts from ``moments``, ``‖W⁺_c‖/‖W‖`` (0 for a zero weight)."""
    return EngramRecord(concept=concept, module=info.name, n=moments.counts[concept],
                        n_total=moments.n_total, weight_norm=weight_norm,
                        rel_norm=norm / weight_norm if weight_norm > 0 else 0.0, **payload)


def solution_warnings(groups: Mapping[str, tuple[int | None, int]],
                      engrams: Iterable[tuple[str, str, str, float]]) -> list[dict]:
    """Warnings for a solved run (module docstring): ``groups`` maps an input group to
    (directions kept, D); ``engrams`` yields (group, module, concept, rel_norm). Each warning
    is a dict naming what it is about, with a one-line ``message``."""
    out = []
    for group, (kept, dim) in sorted(groups.items()):
        floor = min(dim, max(MIN_KEPT, math.ceil(MIN_KEPT_FRACTION * dim)))
        if kept is not None and kept < floor:
            out.append({"kind": "directions", "group": group, "kept": kept, "dim": dim,
                        "message": f"input group {group!r}: the pseudo-inverse of Σ kept {kept} "
                                   f"of {dim} directions (Σ is nearly singular or extremely "
                                   "ill-conditioned); its engrams only act on that span"})
    large = sorted((e for e in engrams if e[3] > MAX_REL_NORM), key=lambda e: -e[3])
    for group, module, concept, ratio in large[:MAX_LISTED]:
        out.append({"kind": "norm", "group": group, "module": module, "concept": concept,
                    "rel_norm": ratio,
                    "message": f"engram of concept {concept!r} at module {module!r} (group "
                               f"{group!r}) is {ratio:.3g}× its weight's norm (> "
                               f"{MAX_REL_NORM:g}×): applying it would overwhelm the layer"})
    if len(large) > MAX_LISTED:
        out.append({"kind": "norm", "count": len(large) - MAX_LISTED,
                    "message": f"... and {len(large) - MAX_LISTED} more engrams over "
                               f"{MAX_REL_NORM:g}× their weight's norm"})
    return out
