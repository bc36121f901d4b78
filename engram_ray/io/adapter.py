"""Forget edits written as PEFT LoRA adapters (``apply --format peft``).

Why: an edit ``W' = W − ΔW`` stored as a full checkpoint costs the model's bytes per variant;
most engrams are exact low-rank factors, so the same edit fits in an adapter of
``(out + in)·Σ r_c`` numbers per module that PEFT loads onto the unchanged base model.

The math. The edit subtracts ``ΔW_m = α f_m Σ_{c∈U} W⁺_{c,m}`` from module ``m``
(``core/edit.py``; bias part included when the run absorbed the bias). PEFT's LoRA adds
``s · B A`` (``A = lora_A.weight``: r × in, ``B = lora_B.weight``: out × r, ``s = lora_alpha / r``).
Every module gets ``lora_alpha = r`` (ranks differ per module: ``rank_pattern`` and
``alpha_pattern``, equal), so ``s = 1`` exactly and ``B A`` must equal ``−ΔW_m``. Per module
(``form`` in ``adapter_meta.json``):

- ``factored`` (exact): a concept kept as token rows has its engram stored as factors
  ``W⁺_c = A_c B_c`` (out × r_c, r_c × in), so ``−α f Σ_c A_c B_c = [−α f A_1 … −α f A_k] ·
  [B_1; …; B_k]``: rank ``Σ r_c``, no SVD, no ``out × in`` matrix formed. Each rank-1 term is
  rescaled by a power of two so both factors have similar norms (exact in binary floating
  point; keeps float16 factors in range).
- ``full_rank`` (exact): when ``Σ r_c ≥ min(out, in)`` (concatenating would not be smaller), and
  for dense engrams with ``exact_dense=True``: ``−ΔW = I · (−ΔW)`` (out ≤ in) or ``(−ΔW) · I``,
  rank ``min(out, in)``. That is ``(out + in)·min(out, in) ≥ out·in`` numbers, more than the
  delta itself (2× for a square layer): a LoRA adapter has no slot for a full delta, and this is
  the one exact way to put one in it, so it is chosen knowingly and reported, never silently.
- ``svd`` (truncated): dense engrams (``select.low_rank: false``, or a concept with more tokens
  than half the layer's width) make ``ΔW`` dense and of full rank in general; the adapter keeps
  the smallest rank r of its SVD with ``‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(Σ_{i≥r} σ_i²) / ‖σ‖ ≤
  rtol`` (``full_rank`` when no rank below min(out, in) gets there).

Every module's relative Frobenius error of the factors *as stored* (in the base model's dtype)
is computed in float64 and written to ``adapter_meta.json``: against the dense
``plan.delta(m)`` for ``svd``/``full_rank``; for ``factored`` against the exact product of the
run's factors (what ``plan.delta`` rounds to float32, ~3e-8 away), from the factors alone.

Module kinds. ``nn.Linear`` as above. GPT-2 ``Conv1D`` (weight ``[in, out]``): the same factors
with ``fan_in_fan_out=True`` (PEFT transposes ``B A`` when merging). ``nn.Conv2d``: ``lora_A`` is
a conv with the base's kernel, stride and padding whose weight ``(r, C, kh, kw)`` is ``B``
reshaped (the engram's ``in`` is the ``C·kh·kw`` patch) and ``lora_B`` a 1×1 conv ``(out, r, 1,
1)``. PEFT builds ``lora_A`` without the base's dilation and padding mode, so a dilated,
non-zero-padded or grouped Conv2d is refused with a ``ValueError`` naming it. So is a module
whose weight is tied to another's (GPT-2's ``lm_head`` and ``wte``): the dense edit changes the
output layer *and* the input embedding through the shared tensor, a LoRA on the output layer
changes only the output, and PEFT's tied LoRA (``ensure_weight_tying``) merges the delta into
the shared tensor twice (peft 0.21, huggingface/peft#2777). Exclude it or use ``--format full``.

Biases (a bias change is not a low-rank factor). PEFT loads either of two exact encodings with
no helper. ``lora_bias=True`` (peft ≥ 0.14) gives every ``lora_B`` a bias, set to the change
``−α f Σ b⁺_c`` (zero where the run has none): it merges into the base bias and goes away with
the adapter, but the flag is global and PEFT refuses to merge it into a layer without a bias.
So ``lora_bias`` when every target has a bias; otherwise (Qwen2-like: biased q/k/v, bias-free
o/MLP) ``bias="lora_only"``: the file carries ``<module>.base_layer.bias``, the *edited* bias
values, bit for bit what ``--format full`` writes, which PEFT loads into the base layers (exact,
but ``disable_adapter()`` does not undo it). ``bias_mode`` in the metadata says which.

Batches. :func:`write_peft_adapters` writes many adapters of one run in one pass over the
modules (``engram-ray batch``): each module's factors are read once for all of them, and each
adapter's tensors are spooled to local disk module by module and streamed into its file at the
end, so neither the reads nor the memory grow with a whole adapter per request.
``apply.write_peft_adapter`` is the batch of one, so both write the same bytes. The base
model is opened by the caller (``runs.adapter_base``): io/ builds no model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engram_ray.config import ModelSpec
from engram_ray.core.edit import EditPlan
from engram_ray.core.layers import module_kind
from engram_ray.io.export import SafetensorsWriter, publish_stage, upload_dir
from engram_ray.io.outputs import IN_PROGRESS, file_records, new_stage, start
from engram_ray.io.storage import Location, Storage, as_storage
from engram_ray.io.store import Run

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_META",
    "ADAPTER_WEIGHTS",
    "DEFAULT_RTOL",
    "AdapterBase",
    "AdapterJob",
    "ModuleAdapter",
    "cap_rank",
    "module_adapter",
    "write_peft_adapters",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "adapter_meta.json"  # written last: an output with it is complete
DEFAULT_RTOL = 1e-3
_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64}


@dataclass
class ModuleAdapter:
    """One module's LoRA factors in float64, (out, in_flat) orientation: ``left @ right`` is
    the change PEFT adds (``−ΔW``); ``bias`` the amount the edit subtracts from the bias
    (float32, as ``plan.delta``); ``dense`` is ``−ΔW`` when it was formed (the error's
    reference for ``svd`` and ``full_rank``)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    form: str  # "factored" | "full_rank" | "svd", + "+truncated" past a max rank
    left: torch.Tensor  # (out, r): lora_B
    right: torch.Tensor  # (r, in_flat): lora_A
    bias: torch.Tensor | None
    dense: torch.Tensor | None = None
    exact: tuple[torch.Tensor, torch.Tensor] | None = None  # the factors before truncation

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


@dataclass
class AdapterJob:
    """One adapter of :func:`write_peft_adapters`: ``plan`` (``core.edit.plan_edit``'s, or
    ``plan_edits``'s) written to ``out``; ``scale`` names how the plan's scales were chosen
    (for the metadata); ``rtol`` and ``exact_dense`` as in ``apply.write_peft_adapter``;
    ``extra``: more entries for ``adapter_meta.json`` (a batch request's ``eval`` summary)."""

    plan: EditPlan
    out: Location  # a URI, or its Storage (built once by the driver)
    scale: str = "uniform"
    rtol: float | None = None
    exact_dense: bool = False
    extra: Mapping | None = None
    max_rank: int | None = None


def write_peft_adapters(
    run: Run,
    jobs: Sequence[AdapterJob],
    *,
    base: AdapterBase,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping | None = None,
) -> list[dict | BaseException]:
    """Many adapters of one run for the base model ``base`` (``runs.adapter_base`` opens it),
    each exactly what ``apply.write_peft_adapter`` writes for its plan; returns each job's
    metadata, or its error (one failed job never stops the others).

    Why: a batch of N adapters made one by one reads the run's engrams N times. Here the
    modules are walked once, in order (module-major): at each module the factors of every
    concept any job forgets are read once (:class:`_SharedFactors`; dense engrams through the
    plans' source, a ``core.edit.SharedEngrams`` in a batch) and every job's factors of that
    module are computed from them and spooled to that job's scratch file (:class:`_Spool`),
    so memory holds one module's factors per job, not whole adapters. Each adapter is then
    written whole, ``adapter_meta.json`` last. What every job needs (the base model) failing
    raises."""
    t0 = time.perf_counter()
    results: list = [None] * len(jobs)
    states: dict[int, _State] = {}
    try:
        for i, job in enumerate(jobs):
            try:
                states[i] = _prepare(run, job, base, storage_options)
            except Exception as e:  # noqa: BLE001 - this job fails, the others go on
                results[i] = e
        _fill(run, jobs, states, results, base, dtype)
        for i, state in states.items():
            if results[i] is None:
                try:
                    results[i] = _finish(run, jobs[i], state, base, t0)
                except Exception as e:  # noqa: BLE001 - this job fails, the others go on
                    results[i] = e
    finally:
        for state in states.values():
            state.spool.discard()
    return results


@dataclass
class _State:
    """A job of :func:`write_peft_adapters` under way: what it edits and what it has so far."""

    targets: list[str]
    zero: list[str]
    bias_mode: str
    rtol: float
    spool: _Spool
    stats: dict
    dest: Storage  # the job's output, built once


def _prepare(run: Run, job: AdapterJob, base: AdapterBase, storage_options) -> _State:
    """A job's checks, before any work: output free, rtol valid, every module carriable."""
    dest = as_storage(job.out, storage_options)
    _check_output(dest)
    rtol, plan = _rtol(job.rtol), job.plan
    zero = [m for m in sorted(plan.scales) if plan.alpha * plan.scales[m] == 0.0]
    targets = [m for m in sorted(plan.scales) if m not in zero]
    if not targets:
        raise ValueError(f"the edit changes nothing (alpha={plan.alpha:g}, every module's "
                         "scale is 0): no adapter to write")
    for m in targets:
        _check_module(base, m, run.module_info(m))
    return _State(targets, zero, _bias_mode(run, targets, base), rtol, _Spool(), {}, dest)


def _fill(run: Run, jobs: Sequence[AdapterJob], states: Mapping[int, _State], results: list,
          base: AdapterBase, dtype) -> None:
    """Every live job's factors, module-major (see :func:`write_peft_adapters`)."""
    live = {i: s for i, s in states.items() if results[i] is None}
    dtypes, old_bias = _shared_inputs(run, live, results, base, dtype)
    for m in sorted({m for s in live.values() for m in s.targets}):
        for i, s in live.items():
            if results[i] is not None or m not in s.targets:
                continue
            try:
                a = cap_rank(module_adapter(jobs[i].plan, m, s.rtol, jobs[i].exact_dense),
                             jobs[i].max_rank)
                tensors: dict = {}
                s.stats[m] = _module_tensors(a, dtypes[i][m], s.bias_mode, old_bias.get(m),
                                             tensors)
                s.spool.add(tensors)
            except Exception as e:  # noqa: BLE001 - this job fails, the others go on
                results[i] = e


def _shared_inputs(run: Run, live: Mapping[int, _State], results: list, base: AdapterBase, dtype):
    """Each job's factor dtypes and the base biases ``lora_only`` jobs rewrite, read once for
    all jobs (a job whose own modules cannot be read gets that error)."""
    names = sorted({m for s in live.values() for m in s.targets})
    try:
        every = _dtypes(base, names, dtype)
        dtypes = {i: every for i in live}
    except ValueError:  # one module's dtype is unreadable: only the jobs that edit it fail
        dtypes = {}
        for i, s in live.items():
            try:
                dtypes[i] = _dtypes(base, s.targets, dtype)
            except ValueError as e:
                results[i] = e
    biased = sorted({m for i, s in live.items() if s.bias_mode == "lora_only"
                     and results[i] is None for m in s.targets
                     if run.module_info(m)["has_bias"]})
    return dtypes, (_base_biases(base, biased) if biased else {})


def _finish(run: Run, job: AdapterJob, state: _State, base: AdapterBase, t0: float) -> dict:
    """A job's config and metadata, then its files (metadata last); returns the metadata."""
    plan, stats = job.plan, state.stats
    config = _adapter_config(stats, base, state.bias_mode)
    meta = {"format": "engram-ray peft adapter", "format_version": 1, "run": run.uri,
            "forget": plan.forget, "alpha": plan.alpha, "scale": job.scale,
            "rtol": state.rtol, "exact_dense": bool(job.exact_dense),
            "bias_mode": state.bias_mode, "modules": stats,
            "skipped": {m: "scale 0: no change" for m in state.zero},
            "max_rel_error": max(s["rel_error"] for s in stats.values()),
            "notes": list(plan.notes), **(job.extra or {})}
    _write(state.dest, state.spool, config, meta, t0)
    return meta


def _rtol(rtol) -> float:
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be in [0, 1), got {rtol}")
    return rtol


def _scale_name(scale) -> str:
    return scale if isinstance(scale, str) else getattr(scale, "__name__", str(scale))


# --- the base model ---------------------------------------------------------------------------

@dataclass
class AdapterBase:
    """The model an adapter is for: its modules (``model``, meta-device parameters when built
    from a spec: shapes, kinds and ties without memory), its ``spec`` (None: a live module),
    and ``weights``, the checkpoint's tensors read key by key (None for a live module or a
    factory without weights). Opened by ``runs.adapter_base``: io/ builds no model."""

    model: nn.Module
    spec: ModelSpec | None
    storage_options: Mapping | None
    weights: object | None = None
    tied: dict[str, list[str]] = field(init=False)  # module → the others sharing its weight

    def __post_init__(self) -> None:
        self.tied = _tied(self.model)


def _tied(model: nn.Module) -> dict[str, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and name:
            owners.setdefault(id(w), []).append(name)
    return {n: [o for o in names if o != n]
            for names in owners.values() if len(names) > 1 for n in names}


def _check_module(base: AdapterBase, name: str, info: Mapping) -> None:
    """Refuse (``ValueError`` naming the module) what a LoRA adapter cannot hold exactly."""
    try:
        mod = base.model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} of the run is not in the base model") from None
    kind = module_kind(mod)
    if kind != info["kind"] or tuple(mod.weight.shape) != tuple(info["shape"]):
        raise ValueError(f"module {name!r}: the run has a {info['kind']} of weight shape "
                         f"{tuple(info['shape'])}, the base model a {type(mod).__name__} of "
                         f"{tuple(mod.weight.shape)}; is this the run's model?")
    if name in base.tied:
        raise ValueError(
            f"module {name!r} shares its weight with {base.tied[name]} (tied weights): the "
            "dense edit changes both through the shared tensor, a LoRA on one changes only "
            "that one, and PEFT's tied LoRA merges the change twice (huggingface/peft#2777); "
            "exclude it (modules=...) or use --format full")
    if info.get("has_bias") and getattr(mod, "bias", None) is None:
        raise ValueError(f"module {name!r}: the run has a bias engram but the base module "
                         "has no bias")
    if kind == "conv2d":
        drops = [f"{k}={v!r}" for k, v, ok in (
            ("groups", mod.groups, mod.groups == 1),
            ("dilation", tuple(mod.dilation), all(d == 1 for d in mod.dilation)),
            ("padding_mode", mod.padding_mode, mod.padding_mode == "zeros")) if not ok]
        if drops:
            raise ValueError(
                f"module {name!r} ({', '.join(drops)}) cannot be a LoRA target: PEFT builds "
                "its lora_A as Conv2d(in, r, kernel_size, stride, padding), without "
                "dilation, padding mode or groups, so the adapter would not compute this "
                "layer's edit; exclude it (modules=...) or use --format full")


def _dtypes(base: AdapterBase, names: Sequence[str], dtype) -> dict[str, torch.dtype]:
    """The stored factors' dtype per module: ``dtype``, else the weight's in the checkpoint."""
    if dtype is not None:
        dt = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"adapter dtype must be a floating dtype, got {dt}")
        return dict.fromkeys(names, dt)
    weights = base.weights
    if weights is None:
        return {n: base.model.get_submodule(n).weight.dtype for n in names}
    headers: dict[str, dict] = {}
    out = {}
    for n in names:
        key = f"{n}.weight"
        if key not in weights:
            raise ValueError(f"the base checkpoint {weights.location} has no tensor {key!r}")
        file = next(iter(weights.files_for([key])))
        if file not in headers:
            headers[file] = _safetensors_header(weights.location_of(file))
        name = headers[file][key]["dtype"]
        if name not in _ST_DTYPES:
            raise ValueError(f"{key} is stored as {name}: pass an adapter dtype explicitly")
        out[n] = _ST_DTYPES[name]
    return out


def _safetensors_header(file: Storage) -> dict:
    """A safetensors file's JSON header, read without its tensors (a range read on S3)."""
    with file.open("", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


# --- the factors of one module ------------------------------------------------------------------

def module_adapter(plan: EditPlan, name: str, rtol: float = DEFAULT_RTOL,
                   exact_dense: bool = False) -> ModuleAdapter:
    """The LoRA factors of ``plan``'s change to module ``name`` (module docstring: factored,
    full_rank or svd)."""
    info = plan.source.module_info(name)
    kind, shape = info["kind"], tuple(info["shape"])
    k = plan.alpha * plan.scales[name]
    union = _low_rank_union(plan.source, plan.forget, name, k, info["has_bias"])
    if union is not None:
        left, right, bias = union
        if left.shape[1] < min(left.shape[0], right.shape[1]):
            left, right = _balance(left, right)
            return ModuleAdapter(name, kind, shape, "factored", left, right, bias)
        dense = left @ right
    else:
        dw, bias = plan.delta(name)
        dw, bias = dw.double().cpu(), None if bias is None else bias.cpu()
        dense = -(dw.T if kind == "conv1d" else dw.reshape(dw.shape[0], -1))
        if not exact_dense:
            svd = _svd_factors(dense, rtol)
            if svd is not None:
                return ModuleAdapter(name, kind, shape, "svd", *svd, bias, dense)
    return ModuleAdapter(name, kind, shape, "full_rank", *_full_rank(dense), bias, dense)


def _low_rank_union(source, forget: Sequence[str], name: str, k: float, has_bias: bool):
    """``(−k W X_Uᵀ, X_U Σ⁺, k b⁺_U)`` when the union's update is low rank (every concept kept
    as rows, however many: ``source.union_parts(..., factors=True)``), else None: a union
    adapter is exact at rank n_U. The bias is the product the run's ``union`` forms, scaled
    like ``plan.delta``'s, so it is bit for bit the amount ``--format full`` subtracts."""
    parts = getattr(source, "union_parts", None)
    if not callable(parts):
        return None
    a, b = parts(list(forget), name, True)
    if b is None:
        return None
    bias = (a @ b[:, -1]).float().cpu() * k if has_bias else None
    return (a * -k).cpu(), (b[:, :-1] if has_bias else b).cpu(), bias  # written from the host


def cap_rank(a: ModuleAdapter, max_rank: int | None) -> ModuleAdapter:
    """``a`` truncated to rank ``max_rank`` when it is larger (servers cap LoRA ranks: vLLM at
    512): the best rank-k approximation of ``left @ right`` (Eckart–Young), from the SVD of the
    small ``R_L R_Rᵀ`` after QR of each factor, so the (out × in) product is never formed. The
    exact factors are kept so the stored error is reported against them."""
    if max_rank is None or a.rank <= max_rank:
        return a
    q_left, r_left = torch.linalg.qr(a.left)
    q_right, r_right = torch.linalg.qr(a.right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    root = s[:max_rank].sqrt()
    left = (q_left @ u[:, :max_rank]) * root
    right = root[:, None] * (vh[:max_rank] @ q_right.T)
    return dataclasses.replace(a, form=f"{a.form}+truncated", left=left, right=right,
                               dense=None, exact=(a.left, a.right))


def _balance(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each rank-1 term ``l_j r_j`` to ``(l_j s_j)(r_j / s_j)`` with ``s_j`` the power of
    two nearest ``sqrt(‖r_j‖ / ‖l_j‖)``: the product is unchanged bit for bit and both factors
    get similar magnitudes (float16 and bfloat16 factors stay in range)."""
    nl, nr = left.norm(dim=0), right.norm(dim=1)
    ok = (nl > 0) & (nr > 0)
    ratio = torch.where(ok, nr / torch.where(ok, nl, 1.0), 1.0)
    s = torch.exp2(torch.round(0.5 * torch.log2(ratio)))
    return left * s, right / s[:, None]


def _svd_factors(dense: torch.Tensor, rtol: float):
    """``(U_r √Σ_r, √Σ_r V_rᵀ)`` at the smallest rank r with relative Frobenius error ≤ rtol,
    or None when that rank is min(out, in) (then the exact full-rank form is no larger)."""
    if not bool(dense.any()):
        return dense.new_zeros(dense.shape[0], 1), dense.new_zeros(1, dense.shape[1])
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    energy = s.square()
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j≥i} σ_j²
    err = torch.cat([tail[1:], tail.new_zeros(1)]).div(tail[0]).sqrt()  # err[r-1]: at rank r
    r = int(torch.nonzero(err <= rtol)[0]) + 1
    if r >= min(dense.shape):
        return None
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def _full_rank(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``I · D`` (out ≤ in) or ``D · I``: exact, rank min(out, in)."""
    out_dim, in_dim = dense.shape
    if out_dim <= in_dim:
        return torch.eye(out_dim, dtype=dense.dtype), dense
    return dense, torch.eye(in_dim, dtype=dense.dtype)


# --- PEFT tensors, config and files -------------------------------------------------------------

def _bias_mode(run: Run, targets: Sequence[str], base: AdapterBase) -> str:
    """"none" | "lora_bias" | "lora_only" (module docstring), from the run's bias flags."""
    if not any(run.module_info(m)["has_bias"] for m in targets):
        return "none"
    biased = all(getattr(base.model.get_submodule(m), "bias", None) is not None
                 for m in targets)
    return "lora_bias" if biased else "lora_only"


def _module_tensors(a: ModuleAdapter, dt: torch.dtype, bias_mode: str,
                    old_bias: torch.Tensor | None, tensors: dict) -> dict:
    """Add one module's PEFT tensors to ``tensors``; return its statistics."""
    lora_a, lora_b = a.right.to(dt), a.left.to(dt)
    if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
        raise ValueError(f"module {a.name!r}: the adapter's factors overflow {dt} "
                         "(alpha too large for this dtype); nothing was written")
    key = _PREFIX + a.name
    tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = (
        (lora_a.reshape(a.rank, *a.shape[1:]), lora_b[:, :, None, None])
        if a.kind == "conv2d" else (lora_a, lora_b))
    stats = {"kind": a.kind, "form": a.form, "rank": a.rank,
             "dtype": str(dt).removeprefix("torch."), "rel_error": _rel_error(a, lora_b, lora_a)}
    if bias_mode == "lora_bias":
        change = torch.zeros(a.left.shape[0]) if a.bias is None else -a.bias
        stored = tensors[f"{key}.lora_B.bias"] = change.to(dt)
        stats["bias_rel_error"] = _ratio(stored.double() - change.double(), change)
    elif a.bias is not None:  # lora_only: the edited bias, as --format full writes it
        stored = (old_bias.float() - a.bias.float()).to(old_bias.dtype)
        tensors[f"{key}.base_layer.bias"] = stored
        stats["bias_rel_error"] = _ratio(stored.double() - old_bias.double() + a.bias.double(),
                                         a.bias)
    return stats


def _base_biases(base: AdapterBase, names: Sequence[str]) -> dict[str, torch.Tensor]:
    if base.weights is None:
        return {n: base.model.get_submodule(n).bias.detach().cpu() for n in names}
    got = base.weights.read([f"{n}.bias" for n in names])
    return {n: got[f"{n}.bias"] for n in names}


def _ratio(diff: torch.Tensor, ref: torch.Tensor) -> float:
    num, den = float(torch.linalg.norm(diff.double())), float(torch.linalg.norm(ref.double()))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _rel_error(a: ModuleAdapter, lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    """‖B̂ Â − (−ΔW)‖_F / ‖ΔW‖_F for the stored factors, float64."""
    lb, la = lora_b.double(), lora_a.double()
    if a.exact is not None:  # truncated to a max rank: against the exact factors
        left, right = a.exact
        err = _lowrank_norm(torch.cat([lb, -left], 1), torch.cat([la, right], 0))
        ref = _lowrank_norm(left, right)
        return err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    if a.form == "full_rank":  # one factor is the identity, exact in any dtype
        return _ratio((la if lb.shape[0] <= la.shape[1] else lb) - a.dense, a.dense)
    if a.dense is not None:
        return _ratio(lb @ la - a.dense, a.dense)
    # stored − exact = δL R̂ + L δR = [δL, L] [R̂; δR]; δL, δR are exact in float64
    err = _lowrank_norm(torch.cat([lb - a.left, a.left], 1), torch.cat([la, la - a.right], 0))
    ref = _lowrank_norm(a.left, a.right)
    return err / ref if ref > 0 else (0.0 if err == 0 else math.inf)


def _lowrank_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖_F from the factors: ``sqrt(Σ (LᵀL) ∘ (R Rᵀ))``."""
    return math.sqrt(max(float(((left.T @ left) * (right @ right.T)).sum()), 0.0))


def _adapter_config(stats: Mapping[str, dict], base: AdapterBase, bias_mode: str) -> dict:
    """``adapter_config.json``: every target by its full name, ``lora_alpha = r`` per module."""
    names = list(stats)
    _check_matching(names, base.model)
    ranks = {m: s["rank"] for m, s in stats.items()}
    common = max(sorted(set(ranks.values())), key=list(ranks.values()).count)
    hf = base.spec is not None and base.spec.path is not None
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if hf else None,
        **_base_name(base.spec.path if hf else None),
        "target_modules": names, "r": common, "lora_alpha": common,
        "rank_pattern": ranks, "alpha_pattern": dict(ranks), "use_rslora": False,
        "fan_in_fan_out": any(s["kind"] == "conv1d" for s in stats.values()),
        "bias": "lora_only" if bias_mode == "lora_only" else "none",
        "lora_dropout": 0.0, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None,
    }
    if bias_mode == "lora_bias":  # only then: a PEFT without lora_bias must fail, not ignore it
        config["lora_bias"] = True
    return config


def _base_name(path: str | None) -> dict:
    """``base_model_name_or_path`` and ``revision`` as the user named the model, so PEFT's
    ``AutoPeftModelForCausalLM`` finds it: a Hub id without its ``hf://`` (and the revision
    apart), a local directory or URI as given."""
    revision = None
    if path is not None and path.startswith("hf://"):
        path, _, revision = path.removeprefix("hf://").partition("@")
    return {"base_model_name_or_path": path, "revision": revision or None}


def _check_matching(names: Sequence[str], model: nn.Module) -> None:
    """PEFT matches a ``target_modules`` list by name or ``.``-suffix and ``rank_pattern`` keys
    as regexes ``(.*\\.)?(key)$``, first match wins: check that each full name matches itself
    only, so no other module gets an adapter and none gets another's rank."""
    wanted = set(names)
    for n, _ in model.named_modules():
        parts = n.split(".")
        if n not in wanted and wanted & {".".join(parts[i:]) for i in range(1, len(parts))}:
            raise ValueError(f"module {n!r} would also match a target module by PEFT's suffix "
                             "rule; the adapter cannot name its targets unambiguously")
    patterns = [(k, re.compile(rf"(.*\.)?({k})$")) for k in names]
    for n in names:
        first = next(k for k, p in patterns if p.match(n))
        if first != n:
            raise ValueError(f"module {n!r}: PEFT would give it the rank of {first!r} "
                             "(rank_pattern keys are regexes)")


def _check_output(dest: Storage) -> None:
    if dest.exists() and (not dest.fs.isdir(dest.root) or dest.ls()):
        raise FileExistsError(f"output {dest.uri} exists and is not an empty directory")


class _Spool:
    """One adapter's tensors kept on local disk module by module, then streamed into its
    ``adapter_model.safetensors``: the adapter is never whole in memory (a dense module's
    exact form is as large as its weight, and a batch builds many adapters at once)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="engram-adapter-spool-")
        self.parts: list[tuple[str, list[str]]] = []
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.dir, f"{len(self.parts):06d}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        self.parts.append((path, sorted(tensors)))
        self.layout.update({k: (tensors[k].dtype, tuple(tensors[k].shape))
                            for k in sorted(tensors)})

    def write(self, path: str) -> None:
        """Every spooled tensor, in the order added, into the safetensors file ``path``."""
        from safetensors.torch import load_file

        writer = SafetensorsWriter(path, self.layout, {"format": "pt"})
        try:
            for part, keys in self.parts:
                tensors = load_file(part)
                for k in keys:
                    writer.write(k, tensors[k])
        finally:
            writer.close()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _write(dest: Storage, spool: _Spool, config: dict, meta: dict, t0: float) -> None:
    """Write into a stage (``io/outputs.py``), metadata last: a local ``out`` appears whole or
    not at all (the stage renamed), a remote one is uploaded with the attempt's note first and
    the metadata last. The metadata lists every file's size and sha256 (what a later batch
    verifies before it skips the output)."""
    _check_output(dest)
    stage = new_stage(dest)
    try:
        if meta.get("request_digest"):
            start(stage, meta["request_digest"])
        spool.write(os.path.join(stage, ADAPTER_WEIGHTS))
        with open(os.path.join(stage, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        meta["bytes"] = {n: os.path.getsize(os.path.join(stage, n))
                         for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
        meta["files"] = file_records(stage, ADAPTER_META)
        meta["seconds"] = round(time.perf_counter() - t0, 4)
        with open(os.path.join(stage, ADAPTER_META), "w") as f:
            json.dump(meta, f, indent=2)
        if dest.remote:  # marker last; a failed upload removes what it had uploaded
            upload_dir(stage, dest, ADAPTER_META)
        else:
            if os.path.exists(os.path.join(stage, IN_PROGRESS)):
                os.remove(os.path.join(stage, IN_PROGRESS))
            publish_stage(stage, dest.root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
