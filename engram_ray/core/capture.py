"""Forward pre-hooks that accumulate every selected module's input second moments in one pass.

The feature vectors of a layer are those of :mod:`engram_ray.core.layers` (a Conv2d's unfolded
patches; a 1 appended when the bias is absorbed). One forward pass accumulates Σ_total and Σ_c
for every concept in the batch (rows carry their concept; ``None`` rows count in Σ_total only);
a token mask restricts counting to e.g. answer tokens. Concepts with at most D/2 tokens keep
their raw feature rows (``select.low_rank``), so their engrams come out as exact rank-n_c
factors (``solve.py``). Modules that read the very same input tensor (q/k/v, gate/up) share one
accumulator: one Σ, and later one eigendecomposition, per input group.

A :class:`~engram_ray.config.SelectConfig` travels whole into :class:`Capture`: the stage
actors and the single-process driver hook modules with the very same settings.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from engram_ray.config import SelectConfig
from engram_ray.core.batch import Batch
from engram_ray.core.layers import check_supported
from engram_ray.core.moments import ModuleInfo, Moments, Statistics, partition
from engram_ray.core.select import layer_index, select_modules

__all__ = ["Capture", "collect_statistics"]

def _features(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """Input → (B, T', D) feature vectors (before masking and bias absorption)."""
    if kind == "conv2d":
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x[None]
        pad = module._reversed_padding_repeated_twice  # covers int, tuple and "same" padding
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        cols = F.unfold(x, module.kernel_size, module.dilation, 0, module.stride)  # (B, D, L)
        return cols.transpose(1, 2)  # (B, L, C·kh·kw)
    if x.dim() == 1:
        x = x[None]
    return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T', D)


class Capture:
    """Hooks on the selected modules; accumulate Σ while a batch context is open.

    Use :meth:`accumulate` for a whole model, or :meth:`observe` around any forward call (a
    pipeline stage) that runs the hooked modules.
    """

    def __init__(self, modules: dict[str, nn.Module], select: SelectConfig | None = None) -> None:
        select = select or SelectConfig()
        self.modules = modules
        self.gram_dtype = getattr(torch, select.gram_dtype)  # validated by SelectConfig
        self.absorb_bias = select.absorb_bias
        self.share_inputs = select.share_inputs
        self.low_rank = select.low_rank
        self.kinds = {n: check_supported(n, m) for n, m in modules.items()}
        self.group_of: dict[str, str] = {}
        self.groups: dict[str, Moments] = {}
        self._ctx: tuple[torch.Tensor | None, torch.Tensor, list[str]] | None = None
        self._seen: dict[tuple, tuple[weakref.ref, str]] = {}
        self._layouts: dict[tuple, tuple] = {}
        self._sums: list[tuple[str, torch.Tensor]] = []  # CUDA: finiteness checked per batch
        self._handles = [
            m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()
        ]
        for n, m in modules.items():
            for p in m.parameters(recurse=False):
                if not torch.isfinite(p).all():
                    raise ValueError(f"module {n!r} has non-finite weights")

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def observe(self, concepts: Sequence[str | None], mask: torch.Tensor | None = None):
        """Within this context, hooked forwards count rows with these concepts and mask."""
        names = sorted({c for c in concepts if c is not None})
        index = torch.tensor([names.index(c) if c is not None else -1 for c in concepts])
        self._ctx = (mask, index, names)
        self._seen = {}
        self._layouts = {}
        self._sums = []
        try:
            yield
            self._check_sums()
        finally:
            self._ctx = None
            self._seen = {}
            self._layouts = {}
            self._sums = []

    def _check_sums(self) -> None:
        """The batch's deferred finiteness checks (CUDA): one wait for the GPU per batch; a
        failure names the first module, in hook order, whose input was not finite."""
        if not self._sums:
            return
        ok = torch.isfinite(torch.stack([s for _, s in self._sums])).tolist()
        for (name, _), fine in zip(self._sums, ok):
            if not fine:
                raise ValueError(f"non-finite activations entering module {name!r}")

    def accumulate(self, model: nn.Module, batch: Batch):
        """One forward of ``model`` on ``batch`` under ``torch.no_grad``; returns its output."""
        with torch.no_grad(), self.observe(batch.concepts, batch.token_mask()):
            return batch.call(model)

    def _signature(self, name: str, module: nn.Module) -> tuple:
        # Two modules may share an accumulator only if they turn the input into the same
        # feature vectors: same transform (Linear ≡ Conv1D), same bias absorption.
        bias = self.absorb_bias and module.bias is not None
        kind = self.kinds[name]
        if kind == "conv2d":
            sig = ("conv2d", module.kernel_size, module.stride, module.dilation,
                   tuple(module._reversed_padding_repeated_twice), module.padding_mode, bias)
        else:
            sig = ("linear", bias)
        return sig if self.share_inputs else (*sig, name)

    def _hook(self, name: str):
        def hook(module: nn.Module, args) -> None:
            if self._ctx is None or not args:
                return
            self._record(name, module, args[0])

        return hook

    def _record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        # id() is only trusted while the tensor is alive (the weakref proves it), so a freed
        # tensor whose address is reused can never be mistaken for a shared input.
        key = (id(x), self._signature(name, module))
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is x:
            group = hit[1]
            known = self.group_of.setdefault(name, group)
            if known != group:
                raise RuntimeError(
                    f"module {name!r} shares its input with group {group!r} in this batch but "
                    f"was grouped with {known!r} before; use share_inputs=False for this model"
                )
            return
        group = self.group_of.setdefault(name, name)
        self._seen[key] = (weakref.ref(x), group)
        self._accumulate(name, module, group, x)

    def _accumulate(self, name: str, module: nn.Module, group: str, x: torch.Tensor) -> None:
        mask, index, names = self._ctx
        feats = _features(module, self.kinds[name], x.detach())  # (B, T', D)
        b, t, d = feats.shape
        keep, concept, parts, unlabelled = self._layout(name, b, t, feats.device)
        rows = feats.reshape(b * t, d)
        rows = rows if keep is None else rows[keep]  # (n, D)
        # One float64 reduction instead of an elementwise test: a NaN or ±inf anywhere makes the
        # sum non-finite, and float32 values cannot overflow a float64 sum. On CUDA reading the
        # sum would wait for the GPU at every module: the sums are checked once per batch.
        total = rows.sum(dtype=torch.float64)
        if total.is_cuda:
            self._sums.append((name, total))
        elif not math.isfinite(total):
            raise ValueError(f"non-finite activations entering module {name!r}")
        if self.absorb_bias and module.bias is not None:
            # The constant 1 is exact in every float dtype: bf16/fp16 rows stay in their dtype
            # (Moments keeps small concepts' rows as captured; Grams are formed from float32).
            dt = rows.dtype if rows.dtype in (torch.bfloat16, torch.float16) else torch.float32
            rows = torch.cat([rows.to(dt), rows.new_ones(rows.shape[0], 1, dtype=dt)], 1)
        mom = self.groups.get(group)
        if mom is None:
            mom = self.groups[group] = Moments.zeros(
                rows.shape[1], device=rows.device, max_rows=None if self.low_rank else 0)
        mom.add(rows, concept, names, self.gram_dtype, parts=parts, unlabelled=unlabelled)
        for c in names:  # a labelled concept whose tokens were all masked shows up with 0
            mom.counts.setdefault(c, 0)

    def _layout(self, name: str, b: int, t: int, device):
        """(kept flat positions or None, concept per kept token, its partition, the positions
        of unlabelled kept tokens) for a (b, t) input: computed once per batch and shape,
        shared by every hooked module."""
        key = (b, t, str(device))
        hit = self._layouts.get(key)
        if hit is not None:
            return hit
        mask, index, _ = self._ctx
        concept = index.to(device)[:, None].expand(b, t).reshape(-1)
        keep = None
        if mask is not None:
            if tuple(mask.shape) != (b, t):
                raise ValueError(
                    f"token mask of shape {tuple(mask.shape)} does not fit the input of module "
                    f"{name!r} ({b} rows × {t} positions)"
                )
            keep = mask.to(device).reshape(-1).nonzero().squeeze(1)
            concept = concept[keep]
        unlabelled = (concept < 0).nonzero().squeeze(1)
        hit = self._layouts[key] = (keep, concept, partition(concept), unlabelled)
        return hit

    def module_infos(self) -> dict[str, ModuleInfo]:
        """Metadata of every hooked module (modules that never ran are an error)."""
        missing = sorted(set(self.modules) - set(self.group_of))
        if missing:
            raise ValueError(f"selected modules never ran in the forward pass: {missing[:5]}")
        return {
            n: ModuleInfo(
                name=n,
                kind=self.kinds[n],
                group=self.group_of[n],
                weight_shape=tuple(m.weight.shape),
                bias=bool(self.absorb_bias and m.bias is not None),
                layer=layer_index(n),
            )
            for n, m in self.modules.items()
        }

    def statistics(self) -> Statistics:
        """The accumulated Σ with module metadata."""
        return Statistics(modules=self.module_infos(), groups=dict(self.groups))


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    select: SelectConfig | None = None,
    *,
    progress=None,
    **fields,
) -> Statistics:
    """One pass over ``batches`` accumulating Σ_total and every concept's Σ_c.

    ``select`` says which modules and how (``fields`` are a shorthand for ``SelectConfig``'s
    own, e.g. ``target_modules=["q_proj"]``). ``progress``, if given, is called as
    ``progress(rows, tokens)`` after each batch.
    """
    select = _select(select, fields)
    modules = select_modules(model, select.target_modules, select.layers_to_transform)
    with Capture(modules, select) as cap:
        rows = 0
        for batch in batches:
            cap.accumulate(model, batch)
            rows += batch.batch_size
            if progress is not None:
                progress(rows, _tokens(batch))
        stats = cap.statistics()
    stats.check_concepts()
    return stats


def _select(select: SelectConfig | None, fields: dict) -> SelectConfig:
    """``select`` with ``fields`` replaced (defaults come from SelectConfig alone)."""
    if select is None:
        return SelectConfig(**fields)
    return dataclasses.replace(select, **fields) if fields else select


def _tokens(batch: Batch) -> int:
    mask = batch.token_mask()
    return int(mask.sum()) if mask is not None else batch.batch_size
