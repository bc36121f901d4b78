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

What a run stores (format 3): per input group, Σ_total's eigendecomposition and each concept's
statistics — its feature rows ``X_c`` (fewer tokens than half the layer's width, see
``moments.py``) or its Σ_c block — never the (concept, module) engrams. Every module of a group
shares one Σ_total⁺ and each concept's rows, and the weight ``W_m`` is in the base model, which an
edit reads anyway, so an engram is formed on read:

    W Σ_c Σ⁺ = (W X_cᵀ)(X_c Σ⁺) = A B,    A: (out, n_c),  B: (n_c, D)     (:func:`row_factors`)

which costs ``(out + D)·D·n_c`` flops instead of ``2·out·D²``, or ``W Σ_c Σ⁺`` for a block. An
edit of a set U never forms per-concept engrams: :func:`group_update` forms ``W Σ_U Σ⁺`` once
per module from the union's rows (rank n_U) or blocks. At extraction only the norms are formed
(Gram identities in :func:`solve_group`), for ``show``, warnings and ``weight_norm`` scaling.
Why this trade: a TOFU run of Llama-3.2-1B stored 400 GB of engrams (lm_head's 128k × n_c
factor once per concept) where its statistics take a fraction (docs/scaling.md), and the solver
options stay open until the edit because the spectrum is kept.
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
    "GroupSolution",
    "SolverConfig",
    "default_rtol",
    "engram_matrix",
    "apply_right",
    "group_update",
    "inverse_from_spectrum",
    "pseudo_inverse",
    "row_factors",
    "solution_warnings",
    "solve_group",
    "spectral_inverse",
    "spectrum",
    "to_weight_shape",
    "union_right",
    "weight_layout",
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


def spectrum(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ ascending, V)`` of a symmetric ``(D, D)`` matrix, float64, on its device: the one
    eigendecomposition of an input group, which a run stores so that every solver option
    (:func:`inverse_from_spectrum`) stays open until the edit."""
    sym = sigma.double()
    sym = (sym + sym.T) / 2  # remove fp asymmetry before eigh
    return torch.linalg.eigh(sym)


def spectral_inverse(sigma: torch.Tensor,
                     config: SolverConfig = SolverConfig()) -> tuple[torch.Tensor, int]:
    """:func:`pseudo_inverse` and how many of the D directions it kept (D for ridge: every
    direction is damped, none dropped; 0 for a zero Σ)."""
    return inverse_from_spectrum(*spectrum(sigma), config)


def inverse_from_spectrum(evals: torch.Tensor, evecs: torch.Tensor,
                          config: SolverConfig = SolverConfig()) -> tuple[torch.Tensor, int]:
    """``V diag(1/λ) Vᵀ`` over the eigenpairs ``config`` keeps (module docstring), and how
    many it kept; ridge: ``V diag(1/(λ + r·mean λ)) Vᵀ`` over all of them."""
    d = evals.shape[0]
    lam_max = evals[-1].clamp_min(0)
    if lam_max <= 0:
        return torch.zeros_like(evecs), 0
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


def row_factors(w: torch.Tensor, x: torch.Tensor,
                pinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W Xᵀ, X Σ⁺)``, float64: the exact rank-n factors of ``W Σ_c Σ⁺`` when
    ``Σ_c = Xᵀ X`` (X: the concept's n feature rows, exact in float64 whatever their dtype)."""
    x = x.to(pinv.device, torch.float64)
    return w.to(pinv.device, torch.float64) @ x.T, x @ pinv


def union_right(rows: Sequence[torch.Tensor], blocks: Sequence[torch.Tensor],
                pinv: torch.Tensor, *, factors: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The half of a union's update that every module of the input group shares, float64.

    For a set U of concepts (``rows``: feature rows of those kept as rows; ``blocks``: the Σ_c
    blocks of the others): ``(X_U, X_U Σ⁺)`` while U has only rows and fewer than D/2 of them
    (the update ``(W X_Uᵀ)(X_U Σ⁺)`` has rank n_U), else ``(Σ_U Σ⁺, None)`` with ``Σ_U = X_Uᵀ X_U
    + Σ blocks``. Linearity in Σ_c is what makes both the sum of the concepts' engrams.
    ``factors=True`` keeps the factored form whenever U has only rows, however many (an adapter
    is exact at rank n_U; the D/2 switch only picks the cheaper form for a dense edit).
    """
    d = pinv.shape[0]
    x = torch.cat([r.to(pinv.device, torch.float64) for r in rows]) if rows else None
    if not blocks and x is not None and (factors or 2 * x.shape[0] < d):
        return x, x @ pinv
    sigma = torch.zeros(d, d, dtype=torch.float64, device=pinv.device)
    for b in blocks:
        sigma += b.to(pinv.device, torch.float64)
    if x is not None:
        sigma += x.T @ x
    return sigma @ pinv, None


def apply_right(w: torch.Tensor, right: tuple[torch.Tensor, torch.Tensor | None]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One module's update from :func:`union_right`'s half: ``(W X_Uᵀ, X_U Σ⁺)`` (factors) or
    ``(W Σ_U Σ⁺, None)`` (dense, out·D² flops: ``Σ_U Σ⁺`` was formed once for the group)."""
    first, second = right
    w = w.to(first.device, torch.float64)
    return (w @ first, None) if second is None else (w @ first.T, second)


def group_update(w: torch.Tensor, rows: Sequence[torch.Tensor], blocks: Sequence[torch.Tensor],
                 pinv: torch.Tensor, *, factors: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Σ_{c∈U} W⁺_c = W Σ_U Σ⁺`` for a set U of concepts of one input group: the update of an
    edit, formed once from the union's statistics, never concept by concept; as factors or
    dense (:func:`union_right`)."""
    return apply_right(w, union_right(rows, blocks, pinv, factors=factors))


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
class EngramRecord:
    """What a run's manifest says of one (concept, module) engram, without the engram: the
    engram itself is formed on read from the group's statistics and the base weight.

    ``form``: ``"factored"`` (the concept's feature rows are stored: the engram is formed as
    rank-n factors) or ``"dense"`` (its Σ_c block is stored: the engram is dense)."""

    concept: str
    module: str
    n: int  # concept tokens
    n_total: int  # all tokens of the input group
    rel_norm: float  # ‖W⁺‖_F / ‖W‖_F (bias included when absorbed)
    weight_norm: float  # ‖W‖_F (bias included when absorbed)
    form: str = "factored"
    kept: int | None = None  # directions of the group's D that Σ_total⁺ kept

    @property
    def rank(self) -> int | None:
        return self.n if self.form == "factored" else None


@dataclass
class GroupSolution:
    """One input group solved: its spectrum (stored by the run) and every engram's record."""

    evals: torch.Tensor
    evecs: torch.Tensor
    kept: int
    records: list[EngramRecord]


def solve_group(
    moments: Moments,
    members: Sequence[ModuleInfo],
    weights: Mapping[str, torch.Tensor],
    config: SolverConfig = SolverConfig(),
    concepts: Sequence[str] | None = None,
) -> GroupSolution:
    """One eigh of Σ_total, then every (concept, module) engram's norm, never the engram.

    ``weights[name]`` is the module as an (out, D) matrix (see ``core.layers.weight_matrix``).
    Norms come from Gram identities: ``‖A_m B‖²_F`` from an (out, n_c) and an (n_c, n_c)
    product for concepts kept as rows, ``⟨W_mᵀW_m, P Pᵀ⟩`` with ``P = Σ_c Σ⁺`` for blocks, so
    no (out × D) engram is formed at extraction; the edit forms what it needs on read.
    """
    for info in members:
        w = weights[info.name]
        if w.shape[1] != moments.dim:
            raise ValueError(f"module {info.name!r}: weight width {w.shape[1]} ≠ Σ dim {moments.dim}")
        if not torch.isfinite(w).all():
            raise ValueError(f"module {info.name!r} has non-finite weights")
    device = moments.total.device
    evals, evecs = spectrum(moments.total)
    pinv, kept = inverse_from_spectrum(evals, evecs, config)
    mats = [weights[i.name].to(device, torch.float64) for i in members]
    norms = {i.name: float(torch.linalg.norm(m)) for i, m in zip(members, mats)}
    names = list(concepts if concepts is not None else moments.names)
    for c in names:
        if moments.counts.get(c, 0) == 0:
            raise ValueError(f"concept {c!r} has zero tokens after masking; no engram exists")
    norm_of = _GroupNorms(mats, moments.dim, pinv, bool(set(names) - set(moments.rows)))
    records: list[EngramRecord] = []
    for c in (c for c in names if c not in moments.rows):
        records += _records(c, members, moments, norm_of.block(moments.concepts[c]), norms,
                            "dense")
    small = [c for c in names if c in moments.rows]
    for chunk in _chunks(small, moments, _rows_per_chunk(moments.dim, norm_of.width)):
        xs = [moments.rows[c] for c in chunk]
        for c, vals in zip(chunk, norm_of.rows(xs)):
            records += _records(c, members, moments, vals, norms, "factored")
    for r in records:
        r.kept = kept
    return GroupSolution(evals, evecs, kept, records)


class _GroupNorms:
    """``‖W_m Σ_c Σ⁺‖_F`` of every module m of a group, without forming the (out, D) engram.

    Rows (``Σ_c = XᵀX``, B = X Σ⁺, K = B Bᵀ): ``‖A_m B‖² = Σ (A_mᵀ A_m) ∘ K`` with either
    ``A_m = W_m Xᵀ`` (out·D·n flops: modules narrower than D, stacked into one matmul per
    chunk of concepts) or ``A_mᵀ A_m = X G_m Xᵀ``, ``G_m = W_mᵀ W_m`` formed once (D²·n:
    modules wider than D — gate/up, and lm_head, whose vocabulary-wide ``W Xᵀ`` would cost
    V·D·n, 64× more at Llama-3.2-1B's 128k × 2048). Blocks: ``⟨G_m, P Pᵀ⟩``, ``P = Σ_c Σ⁺``.
    """

    def __init__(self, mats: Sequence[torch.Tensor], dim: int, pinv: torch.Tensor,
                 blocks: bool) -> None:
        self.pinv, self.count = pinv, len(mats)
        self.wide = [k for k, m in enumerate(mats) if blocks or m.shape[0] > dim]
        narrow = [k for k in range(len(mats)) if k not in self.wide]
        self.narrow = narrow if not blocks else []
        self.stacked = torch.cat([mats[k] for k in self.narrow]) if self.narrow else None
        self.splits = [mats[k].shape[0] for k in self.narrow]
        self.grams = {k: mats[k].T @ mats[k] for k in self.wide}  # once per module
        self.width = (self.stacked.shape[0] if self.narrow else 0) + dim * len(self.grams)

    def block(self, sigma_c: torch.Tensor) -> list[float]:
        p = sigma_c.to(self.pinv.device, torch.float64) @ self.pinv
        q = p @ p.T
        return [math.sqrt(float((self.grams[k] * q).sum().clamp_min(0)))
                for k in range(self.count)]

    def rows(self, xs: Sequence[torch.Tensor]) -> list[list[float]]:
        """Every module's norm for each concept of ``xs`` (one chunk): two matmuls for the
        chunk (``X Σ⁺``; ``W Xᵀ`` of the narrow modules, ``X G_m`` of the wide), then
        n×n products per concept."""
        xs = [x.to(self.pinv.device, torch.float64) for x in xs]  # exact
        x = torch.cat(xs)
        b_all = x @ self.pinv
        a_all = self.stacked @ x.T if self.narrow else None
        y_all = {k: x @ g for k, g in self.grams.items()}
        out, start = [], 0
        for xc in xs:
            cols = slice(start, start + xc.shape[0])
            start += xc.shape[0]
            b = b_all[cols]
            k_c = b @ b.T
            vals = [0.0] * self.count
            if a_all is not None:
                a = a_all[:, cols]
                # Σ_rows of A_m of (A_m K) ∘ A_m: every narrow module from one (Σout, n) product
                sq = (a @ k_c).mul_(a).sum(1)
                for k, part in zip(self.narrow, sq.split(self.splits)):
                    vals[k] = float(part.sum().clamp_min(0).sqrt())
            for k, y in y_all.items():
                vals[k] = float(((y[cols] @ xc.T) * k_c).sum().clamp_min(0).sqrt())
            out.append(vals)
        return out


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


def _records(concept: str, members, moments: Moments, engram_norms, weight_norms,
             form: str) -> list[EngramRecord]:
    """Each member's record of ``concept``: counts from ``moments``, ``‖W⁺_c‖/‖W‖`` (0 for a
    zero weight)."""
    out = []
    for info, norm in zip(members, engram_norms):
        wn = weight_norms[info.name]
        out.append(EngramRecord(concept=concept, module=info.name, n=moments.counts[concept],
                                n_total=moments.n_total, weight_norm=wn, form=form,
                                rel_norm=norm / wn if wn > 0 else 0.0))
    return out


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
