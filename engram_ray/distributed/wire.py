"""What crosses between processes: numpy arrays, which Ray's object store shares zero-copy.

Ray serializes a numpy array (also inside a dict or a dataclass) as an out-of-band buffer:
written once into the object store, and mapped, not copied, by a reader on the same node. A
torch tensor has no such path: it is pickled, i.e. copied into the message and copied again
out of it. So hidden states between stages, weights for the solver and partial Σ
(:class:`~engram_ray.distributed.reduce.SigmaBlocks`) travel as numpy, and become tensors again
on arrival without a copy (:func:`from_wire`). numpy has no bfloat16: such a tensor travels as
its int16 bit pattern with its dtype named, and is viewed back as bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from engram_ray.distributed.reduce import as_tensor

__all__ = ["from_wire", "payload_nbytes", "to_wire"]

_BF16 = "bfloat16"


def to_wire(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors of a stage payload as numpy arrays (CPU tensors: a view, no copy).

    A bfloat16 tensor becomes ``(int16 bits, "bfloat16")``; anything else passes as is.
    """
    out: dict[str, Any] = {}
    for k, v in payload.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[k] = (v.view(torch.int16).numpy(), _BF16) if v.dtype == torch.bfloat16 \
                else v.numpy()
        else:
            out[k] = v
    return out


def from_wire(payload: Mapping[str, Any], device: str | torch.device = "cpu") -> dict[str, Any]:
    """The inverse of :func:`to_wire`, on ``device`` (CPU: tensors over the received memory)."""
    out: dict[str, Any] = {}
    for k, v in payload.items():
        if isinstance(v, tuple) and len(v) == 2 and v[1] == _BF16:
            out[k] = as_tensor(v[0]).view(torch.bfloat16).to(device)
        elif isinstance(v, np.ndarray):
            out[k] = as_tensor(v).to(device)
        else:
            out[k] = v
    return out


def payload_nbytes(payload: Mapping[str, Any]) -> int:
    """Bytes of array data in a wire payload (what one hop between stages moves)."""
    total = 0
    for v in payload.values():
        if isinstance(v, tuple):
            v = v[0]
        if isinstance(v, np.ndarray):
            total += v.nbytes
    return total
