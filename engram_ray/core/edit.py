"""Engram arithmetic and edits: ``W' = W − α Σ_{c∈U} f_l W⁺_{c,l}`` (bias included).

Engrams are linear in Σ_c, so the engram of a union of concepts is the sum of theirs: one run
serves every subset U. ``α > 0`` forgets, ``α < 0`` amplifies. ``f_l`` scales layer l:

- ``uniform``: ``f_l = 1`` (the paper's plain edit);
- ``weight_norm``: ``r_l = ‖E_l‖_F / ‖W_l‖_F`` of the union engram ``E_l``, ``f_l = r_l / max r``
  (the paper's α_W-Norm: layers whose engram is a large part of the weight are edited most);
- ``effective_rank``: ``erank(E_l) = exp(H(σ / Σσ))`` over E_l's singular values, normalised
  to max 1 (spread-out engrams edited most);
- ``compose("weight_norm", "effective_rank")`` or the string ``"weight_norm*effective_rank"``:
  the product, renormalised to max 1.

Tied parameters (a tied lm_head and embedding, or one Linear reused) are edited exactly once.
An edit is planned first (:func:`plan_edit`: scales from the union engrams) and then applied to
a live model or streamed into a checkpoint one tensor at a time (``io/export.py``).

An edit never produces non-finite weights: :func:`plan_edit` refuses an α that is not finite or
that overflows float32 (the engrams' dtype: ``α·W⁺`` would be ``inf``), and every edited tensor
is checked (:func:`check_finite`) before it replaces the weight or is written, so a too-large α
for the model's dtype (float16 overflows at 65504) is refused instead of written as ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from engram_ray.core.select import match_modules

FLOAT32_MAX = torch.finfo(torch.float32).max

__all__ = [
    "EditPlan",
    "EngramSource",
    "SCALES",
    "SharedEngrams",
    "apply_edit",
    "check_finite",
    "compose",
    "plan_edit",
    "plan_edits",
    "union_engram",
]


class EngramSource(Protocol):
    """Anything with engrams: a committed :class:`~engram_ray.io.store.Run` (engrams formed on
    read from its statistics), or an in-memory set. ``union`` is optional: a source that has it
    forms a union's engram at once (a run: from the union's rows, never concept by concept)."""

    concepts: list[str]
    modules: list[str]

    def engram(self, concept: str, module: str) -> torch.Tensor: ...
    def bias(self, concept: str, module: str) -> torch.Tensor | None: ...
    def module_info(self, module: str) -> dict: ...


def union_engram(
    source: EngramSource, concepts: Sequence[str], module: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Σ_{c∈U} W⁺_c`` (weight, bias) for one module: exact, since engrams are linear in Σ_c.
    Formed by the source at once when it can (``source.union``), else summed concept by
    concept."""
    own = getattr(source, "union", None)
    if callable(own):
        return own(list(concepts), module)
    w = b = None
    for c in concepts:
        ew, eb = source.engram(c, module), source.bias(c, module)
        w = ew.clone() if w is None else w.add_(ew)
        if eb is not None:
            b = eb.clone() if b is None else b.add_(eb)
    return w, b


class SharedEngrams:
    """An :class:`EngramSource` that forms each module's unions once for a batch of edits.

    Edits of one run made together (``apply.apply``) walk the modules in the same order,
    in lockstep; the first to need module m's union of a forget set forms it (and its factors,
    for adapters) and the others, and the later steps of the same edit (scales, then the
    write), reuse it. Only the last ``keep`` modules stay in memory (a weight and its bias may
    be a few tensors apart in a checkpoint), so memory is a few modules' updates, not a
    model's worth. ``reads`` counts unions formed by the source.
    """

    def __init__(self, source: EngramSource, concepts: Sequence[str] = (), keep: int = 4) -> None:
        self.source, self.keep = source, keep
        self.concepts, self.modules = source.concepts, source.modules
        self._held: dict[str, dict[tuple, tuple]] = {}  # module → (kind, forget set) → value
        self.reads = 0

    def module_info(self, module: str) -> dict:
        return self.source.module_info(module)

    def _cached(self, module: str, key: tuple, make):
        if module in self._held:
            self._held[module] = self._held.pop(module)  # most recently used last
        else:
            self._held[module] = {}
            while len(self._held) > self.keep:
                del self._held[next(iter(self._held))]
        held = self._held[module]
        if key not in held:
            held[key] = make()
            self.reads += 1
        return held[key]

    def union(self, concepts: Sequence[str], module: str):
        key = ("union", tuple(concepts))
        return self._cached(module, key, lambda: union_engram(self.source, concepts, module))

    def union_parts(self, concepts: Sequence[str], module: str, factors: bool = False):
        key = ("parts", tuple(concepts), factors)
        return self._cached(module, key,
                            lambda: self.source.union_parts(list(concepts), module, factors))

    def engram(self, concept: str, module: str) -> torch.Tensor:
        return self.union([concept], module)[0]

    def bias(self, concept: str, module: str) -> torch.Tensor | None:
        return self.union([concept], module)[1]


def _as_matrix(w: torch.Tensor, b: torch.Tensor | None, kind: str) -> torch.Tensor:
    w = w.T if kind == "conv1d" else w.reshape(w.shape[0], -1)
    return torch.cat([w, b[:, None]], 1) if b is not None else w


class _UnionEngrams(Mapping):
    """module → its union engram as an (out, D) matrix, read when looked up and not kept: a
    scale function walking every module holds one engram at a time, not a model's worth."""

    def __init__(self, source: EngramSource, forget: Sequence[str], modules: Sequence[str],
                 infos: Mapping[str, dict]) -> None:
        self._source, self._forget, self._modules, self._infos = source, forget, modules, infos

    def __getitem__(self, module: str) -> torch.Tensor:
        if module not in self._infos:
            raise KeyError(module)
        w, b = union_engram(self._source, self._forget, module)
        return _as_matrix(w, b, self._infos[module]["kind"])

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def _weight_norm_of(e: torch.Tensor, info: Mapping) -> float:
    """One module's ``r_l = ‖E_l‖_F / ‖W_l‖_F`` (before normalising over layers)."""
    return float(torch.linalg.norm(e)) / max(info["weight_norm"], 1e-30)


def _effective_rank_of(e: torch.Tensor, info: Mapping) -> float:
    """One module's ``erank(E_l)`` (before normalising over layers)."""
    s = torch.linalg.svdvals(e.double())
    p = s / s.sum() if s.sum() > 0 else s
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum())) if p.numel() else 0.0


def _weight_norm(engrams, infos) -> dict[str, float]:
    return _normalise({m: _weight_norm_of(e, infos[m]) for m, e in engrams.items()})


def _effective_rank(engrams, infos) -> dict[str, float]:
    return _normalise({m: _effective_rank_of(e, infos[m]) for m, e in engrams.items()})


def _uniform(engrams, infos) -> dict[str, float]:
    return {m: 1.0 for m in engrams}


def _normalise(r: Mapping[str, float]) -> dict[str, float]:
    top = max(r.values(), default=0.0)
    return {m: (v / top if top > 0 else 0.0) for m, v in r.items()}


ScaleFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, dict]], dict[str, float]]
SCALES: dict[str, ScaleFn] = {
    "uniform": _uniform,
    "weight_norm": _weight_norm,
    "effective_rank": _effective_rank,
}
# The named scales that are one number per module, normalised over the modules: what
# :func:`plan_edits` computes module by module for many edits at once.
_PER_MODULE = {"weight_norm": _weight_norm_of, "effective_rank": _effective_rank_of}


def compose(*scales: str | ScaleFn) -> ScaleFn:
    """Product of scaling functions, renormalised so the largest layer gets 1."""
    fns = [_scale_fn(s) for s in scales]

    def composed(engrams, infos):
        total = {m: 1.0 for m in engrams}
        for fn in fns:
            for m, v in fn(engrams, infos).items():
                total[m] *= v
        return _normalise(total)

    return composed


def _scale_fn(scale: str | ScaleFn) -> ScaleFn:
    if callable(scale):
        return scale
    if "*" in scale:
        return compose(*scale.split("*"))
    try:
        return SCALES[scale]
    except KeyError:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)} or "
                         "a product like 'weight_norm*effective_rank'") from None


@dataclass
class EditPlan:
    """What an edit subtracts: ``alpha · scales[m] · Σ_{c∈forget} W⁺_c`` for each module m."""

    source: EngramSource
    forget: list[str]
    alpha: float
    scales: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def delta(self, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The amount to subtract from (weight, bias) of ``module``, float32."""
        w, b = union_engram(self.source, self.forget, module)
        k = self.alpha * self.scales[module]
        return w * k, (b * k if b is not None else None)


def plan_edit(
    source: EngramSource,
    forget: Sequence[str],
    alpha: float = 1.0,
    scale: str | ScaleFn = "uniform",
    modules: str | Sequence[str] | None = None,
) -> EditPlan:
    """Choose modules and per-layer scales for forgetting ``forget`` at strength ``alpha``."""
    forget, picked, fn = _checked(source, forget, alpha, scale, modules)
    infos = {m: source.module_info(m) for m in picked}
    if fn is _uniform:
        scales = {m: 1.0 for m in picked}
    else:
        scales = fn(_UnionEngrams(source, forget, picked, infos), infos)
    return EditPlan(source=source, forget=forget, alpha=float(alpha), scales=scales)


def _checked(source: EngramSource, forget, alpha, scale, modules):
    """(forget deduplicated, modules picked, scale function) of an edit, or its ValueError."""
    forget = list(dict.fromkeys(forget))
    if not forget:
        raise ValueError("nothing to forget: the concept list is empty")
    unknown = [c for c in forget if c not in source.concepts]
    if unknown:
        raise ValueError(f"concept(s) {unknown} not in the run (known: {source.concepts[:10]})")
    _check_alpha(alpha)
    return forget, match_modules(source.modules, modules), _scale_fn(scale)


def plan_edits(source: EngramSource, edits: Sequence[tuple]
               ) -> list[EditPlan | BaseException]:
    """:func:`plan_edit` of every ``(forget, alpha, scale, modules)`` in ``edits``, equal to it
    number for number, with the engrams read module-major: per-layer scales (``weight_norm``,
    ``effective_rank`` and their products) need every module's union engram, so planning N
    edits one by one would read the run N times; here each module is visited once for all
    edits (with a :class:`SharedEngrams` source, one read of its engrams). An edit that
    cannot be planned gets its error in its place. A scale given as a function goes alone."""
    out: list = []
    needs: dict[int, tuple] = {}  # edit → (forget, picked, infos, per-module statistics)
    for i, (forget, alpha, scale, modules) in enumerate(edits):
        try:
            forget, picked, fn = _checked(source, forget, alpha, scale, modules)
            names = _factors(scale) if fn is not _uniform else []
            if names is None:  # a function: plan_edit's own way
                out.append(plan_edit(source, forget, alpha, scale, modules))
                continue
            out.append(EditPlan(source, forget, float(alpha), dict.fromkeys(picked, 1.0)))
            if names:
                infos = {m: source.module_info(m) for m in picked}
                needs[i] = (forget, picked, infos, {n: {} for n in names})
        except Exception as e:  # noqa: BLE001 - this edit's error, the others go on
            out.append(e)
    for m in source.modules:  # module-major: every edit's statistic of m, then the next m
        for forget, picked, infos, stats in needs.values():
            if m in infos:
                e = _UnionEngrams(source, forget, picked, infos)[m]
                for name, per in stats.items():
                    per[m] = _PER_MODULE[name](e, infos[m])
    for i, (_, picked, _, stats) in needs.items():
        scales = _combined(_factors(edits[i][2]), stats)
        out[i].scales = {m: scales[m] for m in picked}  # plan_edit's order
    return out


def _factors(scale) -> list[str] | None:
    """The named per-module statistics a scale multiplies (``uniform`` factors dropped: they
    are 1), or None for a scale plan_edits cannot split (a function)."""
    if callable(scale):
        return None
    return [n for n in (scale.split("*") if "*" in scale else [scale]) if n != "uniform"]


def _combined(names: Sequence[str], stats: Mapping[str, dict[str, float]]) -> dict[str, float]:
    """The scales :func:`_scale_fn` would give: one statistic normalised, or a product of
    normalised statistics renormalised (:func:`compose`), in the same order of operations."""
    if len(names) == 1 and len(stats) == 1:
        return _normalise(stats[names[0]])
    total = dict.fromkeys(next(iter(stats.values())), 1.0)
    for name in names:
        for m, v in _normalise(stats[name]).items():
            total[m] *= v
    return _normalise(total)


def _check_alpha(alpha: float) -> None:
    """α must be finite and representable in float32, the dtype engrams are scaled in: a
    larger α turns every non-zero engram entry into ``inf``."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if abs(alpha) > FLOAT32_MAX:
        raise ValueError(f"alpha {alpha:g} overflows float32 (|alpha| must be at most "
                         f"{FLOAT32_MAX:.4g}): the edited weights would be infinite")


def check_finite(where: str, before: torch.Tensor, after: torch.Tensor, alpha: float) -> None:
    """Refuse an edit that makes a finite entry of ``before`` non-finite in ``after`` (α too
    large for the weight's dtype); entries already non-finite in the source are left alone."""
    if not after.is_floating_point() or bool(torch.isfinite(after).all()):
        return
    if bool((torch.isfinite(before) & ~torch.isfinite(after)).any()):
        raise ValueError(f"{where}: the edit at alpha={alpha:g} makes non-finite weights "
                         f"(overflows {str(after.dtype).removeprefix('torch.')}); "
                         "nothing was written")


def _targets(model: nn.Module, plan: EditPlan) -> list[tuple[str, nn.Module]]:
    """The planned modules, each weight once: a parameter shared by several modules (tied
    weights) goes to the first in name order, the others are noted in ``plan.notes``."""
    done: dict[int, str] = {}
    out = []
    for name in sorted(plan.scales):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"module {name!r} of the run is not in this model") from None
        if id(mod.weight) in done:
            plan.notes.append(f"{name}: weight tied to {done[id(mod.weight)]}, edited once")
            continue
        done[id(mod.weight)] = name
        out.append((name, mod))
    return out


def _edited(name: str, mod: nn.Module, plan: EditPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``mod``'s edited (weight, bias), checked for shape and finiteness; the module is not
    touched."""
    w = mod.weight
    dw, db = plan.delta(name)
    if tuple(dw.shape) != tuple(w.shape):
        raise ValueError(f"module {name!r}: engram shape {tuple(dw.shape)} does not "
                         f"match weight {tuple(w.shape)}; is this the same model?")
    new_w = w - dw.to(w.device, w.dtype)
    check_finite(f"{name}.weight", w, new_w, plan.alpha)
    new_b = None
    if db is not None:
        if mod.bias is None:
            raise ValueError(f"module {name!r}: the run has a bias engram but the "
                             "module has no bias")
        new_b = mod.bias - db.to(mod.bias.device, mod.bias.dtype)
        check_finite(f"{name}.bias", mod.bias, new_b, plan.alpha)
    return new_w, new_b


def apply_edit(model: nn.Module, plan: EditPlan) -> dict[str, float]:
    """Subtract the plan's deltas from ``model`` in place; returns each module's scale.

    A parameter shared by several modules (tied weights) is edited once, by the first module
    in name order; the others are noted in ``plan.notes``. Every edited tensor is checked
    (shape, finiteness) before the first weight changes, so a refused edit leaves the model
    as it was; the price is computing each module's delta twice.
    """
    _check_alpha(plan.alpha)
    with torch.no_grad():
        targets = _targets(model, plan)
        for name, mod in targets:  # check everything first: all or nothing
            _edited(name, mod, plan)
        for name, mod in targets:
            new_w, new_b = _edited(name, mod, plan)
            mod.weight.copy_(new_w)
            if new_b is not None:
                mod.bias.copy_(new_b)
    return {name: plan.scales[name] for name, _ in targets}
