"""Forward pre-hooks that accumulate every selected module's input second moments in one pass.

Each supported layer is a linear map of a feature vector ``x``:

- ``nn.Linear``: ``y = W x + b``, features = the input's last dimension;
- transformers' GPT-2 ``Conv1D``: ``y = x W + b`` with ``W`` stored ``[in, out]``; same features;
- ``nn.Conv2d`` (groups = 1): ``y = W ∗ x + b`` is ``W_flat · patch`` for every output position,
  where ``patch`` is the ``C·kh·kw`` unfolded input window (stride, padding, dilation respected),
  so the layer is a Linear over patches and ``W_flat = W.reshape(out, -1)``.

With bias absorption a constant 1 is appended to every feature vector, so ``[W | b]`` is one
matrix and the engram edits the bias too. One forward pass accumulates Σ_total and Σ_c for every
concept in the batch (rows carry their concept; ``None`` rows count in Σ_total only); a token
mask restricts counting to e.g. answer tokens. Concepts with at most D/2 tokens keep their raw
feature rows (``low_rank``), so their engrams come out as exact rank-n_c factors (``solve.py``).
Modules that read the very same input tensor (q/k/v, gate/up) share one accumulator: one Σ, and
later one eigendecomposition, per input group.

Selection follows PEFT's conventions: ``target_modules`` as a list matches dotted-name suffixes,
as a string it is a regex over the full name (``"all-linear"``: every supported module but the
output layer); ``layers_to_transform`` keeps decoder layers by index.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from engram_ray.core.batch import Batch
from engram_ray.core.moments import ModuleInfo, Moments, Statistics, partition

__all__ = [
    "Capture",
    "collect_statistics",
    "feature_dim",
    "layer_index",
    "module_kind",
    "select_modules",
    "weight_matrix",
]

# Decoder-block containers across families: Llama/Mistral/Qwen "layers", GPT-2 "h",
# many vision/other models "blocks"/"layer".
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")


def _conv1d_type():
    # A Conv1D instance implies transformers was imported: skip the (seconds-long) import for
    # plain torch models, e.g. in every stage actor of an nn.Sequential.
    if "transformers" not in sys.modules:
        return None
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def module_kind(module: nn.Module) -> str | None:
    """"linear" | "conv1d" | "conv2d" for supported layers, else None."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def _check_supported(name: str, module: nn.Module) -> str:
    kind = module_kind(module)
    if kind is None:
        raise ValueError(
            f"module {name!r} ({type(module).__name__}) is not a supported layer; "
            "engrams are defined for nn.Linear, GPT-2 Conv1D and nn.Conv2d"
        )
    if kind == "conv2d" and module.groups != 1:
        raise ValueError(
            f"module {name!r} is a grouped Conv2d (groups={module.groups}); only groups=1 is "
            "supported (a grouped conv is several independent linear maps)"
        )
    return kind


def layer_index(name: str) -> int | None:
    """Decoder-layer index parsed from a dotted name (``model.layers.3.mlp`` → 3)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _matches(name: str, target: str | Sequence[str] | None) -> bool:
    if target is None:
        return True
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == key or name.endswith("." + key) for key in target)


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    *,
    allow_empty: bool = False,
) -> dict[str, nn.Module]:
    """The named modules to capture, by PEFT's rules; an empty selection is an error.

    ``None`` selects every supported module (lm_head included); ``"all-linear"`` every
    supported module except the model's output layer, like PEFT. ``allow_empty`` is for one
    pipeline stage, whose slice may hold none of the targets (the union is checked instead).
    """
    named = list(model.named_modules())
    candidates = [(n, m) for n, m in named if n and module_kind(m) is not None]
    if target_modules == "all-linear":
        out = _output_layer_name(model)
        picked = [(n, m) for n, m in candidates if n != out]
    elif target_modules is None:
        picked = candidates
    else:
        if isinstance(target_modules, str):
            picked = [(n, m) for n, m in named if n and _matches(n, target_modules)]
        else:
            picked = [(n, m) for n, m in named if n and _matches(n, list(target_modules))]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(
            layers_to_transform
        )
        picked = [(n, m) for n, m in picked if layer_index(n) in wanted]
    if not picked:
        if allow_empty:
            return {}
        raise ValueError(_no_match_message(target_modules, layers_to_transform, candidates))
    # A target that names a module explicitly must be supported; reject rather than skip it.
    if target_modules not in (None, "all-linear"):
        picked = [(n, m) for n, m in picked if not _is_container(m)]
        for n, m in picked:
            _check_supported(n, m)
    else:
        for n, m in picked:
            _check_supported(n, m)
    return dict(picked)


def _is_container(module: nn.Module) -> bool:
    # A regex may also match a parent block (``.*attn``); only leaves can be layers.
    return module_kind(module) is None and any(True for _ in module.children())


def _output_layer_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for n, m in model.named_modules():
        if out is not None and m is out:
            return n
    return None


def _no_match_message(target, layers, candidates) -> str:
    names = [n for n, _ in candidates]
    suffixes = sorted({n.split(".")[-1] for n in names})
    keys = [target] if isinstance(target, str) else list(target or [])
    close = []
    for k in keys:
        close += difflib.get_close_matches(str(k).split(".")[-1], suffixes, n=3, cutoff=0.5)
    msg = f"target_modules={target!r} layers_to_transform={layers!r} matched no supported module"
    if close:
        msg += f"; did you mean {sorted(set(close))}?"
    msg += f" Supported module names end in: {suffixes[:20]}"
    return msg


def feature_dim(module: nn.Module, absorb_bias: bool = True) -> int:
    """Width D of the feature vectors (bias column included) whose Σ the module needs."""
    kind = module_kind(module)
    w = module.weight
    d = w.shape[0] if kind == "conv1d" else w[0].numel()
    return d + int(absorb_bias and module.bias is not None)


def weight_matrix(module: nn.Module, absorb_bias: bool = True) -> torch.Tensor:
    """The module as one float64 matrix ``[W_flat | b]`` of shape (out, D)."""
    kind = module_kind(module)
    w = module.weight.detach()
    w = (w.T if kind == "conv1d" else w.reshape(w.shape[0], -1)).double()
    if absorb_bias and module.bias is not None:
        w = torch.cat([w, module.bias.detach().double()[:, None]], dim=1)
    return w


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

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        absorb_bias: bool = True,
        share_inputs: bool = True,
        gram_dtype: str | torch.dtype = "float64",
        low_rank: bool = True,
    ) -> None:
        self.modules = modules
        self.gram_dtype = getattr(torch, gram_dtype) if isinstance(gram_dtype, str) else gram_dtype
        if self.gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"gram_dtype must be float32 or float64, got {gram_dtype!r}")
        self.absorb_bias = absorb_bias
        self.share_inputs = share_inputs
        self.low_rank = low_rank
        self.kinds = {n: _check_supported(n, m) for n, m in modules.items()}
        self.group_of: dict[str, str] = {}
        self.groups: dict[str, Moments] = {}
        self._ctx: tuple[torch.Tensor | None, torch.Tensor, list[str]] | None = None
        self._seen: dict[tuple, tuple[weakref.ref, str]] = {}
        self._layouts: dict[tuple, tuple] = {}
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
        try:
            yield
        finally:
            self._ctx = None
            self._seen = {}
            self._layouts = {}

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
        keep, concept, parts = self._layout(name, b, t, feats.device)
        rows = feats.reshape(b * t, d)
        rows = rows if keep is None else rows[keep]  # (n, D)
        # One float64 reduction instead of an elementwise test: a NaN or ±inf anywhere makes the
        # sum non-finite, and float32 values cannot overflow a float64 sum.
        if not math.isfinite(rows.sum(dtype=torch.float64)):
            raise ValueError(f"non-finite activations entering module {name!r}")
        if self.absorb_bias and module.bias is not None:
            rows = torch.cat([rows.float(), rows.new_ones(rows.shape[0], 1, dtype=torch.float32)], 1)
        mom = self.groups.get(group)
        if mom is None:
            mom = self.groups[group] = Moments.zeros(
                rows.shape[1], device=rows.device, max_rows=None if self.low_rank else 0)
        mom.add(rows, concept, names, self.gram_dtype, parts=parts)
        for c in names:  # a labelled concept whose tokens were all masked shows up with 0
            mom.counts.setdefault(c, 0)

    def _layout(self, name: str, b: int, t: int, device):
        """(kept flat positions or None, concept per kept token, its partition) for a (b, t)
        input: computed once per batch and shape, shared by every hooked module."""
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
        hit = self._layouts[key] = (keep, concept, partition(concept))
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
    *,
    target_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    absorb_bias: bool = True,
    share_inputs: bool = True,
    gram_dtype: str = "float64",
    low_rank: bool = True,
    progress=None,
) -> Statistics:
    """One pass over ``batches`` accumulating Σ_total and every concept's Σ_c.

    ``progress``, if given, is called as ``progress(rows, tokens)`` after each batch.
    """
    modules = select_modules(model, target_modules, layers_to_transform)
    with Capture(modules, absorb_bias=absorb_bias, share_inputs=share_inputs,
                 gram_dtype=gram_dtype, low_rank=low_rank) as cap:
        rows = 0
        for batch in batches:
            cap.accumulate(model, batch)
            rows += batch.batch_size
            if progress is not None:
                progress(rows, _tokens(batch))
        stats = cap.statistics()
    stats.check_concepts()
    return stats


def _tokens(batch: Batch) -> int:
    mask = batch.token_mask()
    return int(mask.sum()) if mask is not None else batch.batch_size
