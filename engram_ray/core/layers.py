"""What a supported layer is: its kind, the width of its feature vectors, its weight matrix.

Each supported layer is a linear map of a feature vector ``x``:

- ``nn.Linear``: ``y = W x + b``, features = the input's last dimension;
- transformers' GPT-2 ``Conv1D``: ``y = x W + b`` with ``W`` stored ``[in, out]``; same features;
- ``nn.Conv2d`` (groups = 1): ``y = W ∗ x + b`` is ``W_flat · patch`` for every output position,
  where ``patch`` is the ``C·kh·kw`` unfolded input window, so the layer is a Linear over
  patches and ``W_flat = W.reshape(out, -1)``.

With bias absorption the matrix is ``[W_flat | b]`` of shape (out, D): one matrix, so the engram
edits the bias too.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["Conv1D", "as_matrix", "check_supported", "feature_dim", "module_kind",
           "weight_matrix"]


class Conv1D(nn.Module):
    """GPT-2's linear layer without transformers: ``y = x W + b``, ``W`` stored ``[in, out]``.

    Same constructor order (``nf`` outputs, ``nx`` inputs), parameter names and shapes as
    transformers' ``Conv1D``, so GPT-2 checkpoints load into it by key; the product is the
    same ``addmm`` for the same bits. Used by the pure-torch GPT-2 stage
    (:mod:`engram_ray.models.native`).
    """

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


def _conv1d_types() -> tuple[type, ...]:
    # transformers' Conv1D only when transformers is already imported: a Conv1D instance implies
    # it, and the (seconds-long) import is skipped for plain torch models, e.g. in every stage
    # actor of an nn.Sequential or of a native (pure-torch) decoder.
    if "transformers" not in sys.modules:
        return (Conv1D,)
    from transformers.pytorch_utils import Conv1D as HFConv1D

    return (Conv1D, HFConv1D)


def module_kind(module: nn.Module) -> str | None:
    """"linear" | "conv1d" | "conv2d" for supported layers, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _conv1d_types()):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def check_supported(name: str, module: nn.Module) -> str:
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


def feature_dim(module: nn.Module, absorb_bias: bool = True) -> int:
    """Width D of the feature vectors (bias column included) whose Σ the module needs."""
    kind = module_kind(module)
    w = module.weight
    d = w.shape[0] if kind == "conv1d" else w[0].numel()
    return d + int(absorb_bias and module.bias is not None)


def weight_matrix(module: nn.Module, absorb_bias: bool = True) -> torch.Tensor:
    """The module as one float64 matrix ``[W_flat | b]`` of shape (out, D)."""
    bias = module.bias.detach() if absorb_bias and module.bias is not None else None
    return as_matrix(module.weight.detach(), bias, module_kind(module))


def as_matrix(weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    """A layer of ``kind`` given by its tensors, as one float64 (out, D) matrix ``[W_flat |
    b]``: a checkpoint's tensors need no module built around them (``runs.py`` reads them so)."""
    w = (weight.T if kind == "conv1d" else weight.reshape(weight.shape[0], -1)).double()
    if bias is not None:
        w = torch.cat([w, bias.double()[:, None]], dim=1)
    return w


