"""Where the engine computes: the device a config names, and full-precision matmuls for Σ.

``parallel.device`` is ``auto`` (default), ``cpu``, ``cuda`` or ``cuda:N``:

- ``auto``: CUDA when GPUs were asked for (``parallel.num_gpus > 0``; on Ray: when Ray gave the
  stage actor a GPU) and torch sees one, else the CPU. A CPU-only config therefore stays on
  the CPU on a machine with GPUs, exactly as before this key existed;
- ``cpu`` / ``cuda`` / ``cuda:N``: that device; CUDA without a visible GPU is an error.

Σ sums are float64 (``core/moments.py``): float32 activations multiply exactly there, so TF32
never touches them. With ``select.gram_dtype: float32`` (the fast path on GPUs whose float64 is
slow) the Gram products are float32 matmuls, and TF32 (a 10-bit mantissa, enabled by
``torch.set_float32_matmul_precision("high")`` or ``allow_tf32``, often set by training code
in the same process) would make them ~1e-3 relative instead of ~1e-7: :func:`no_tf32` turns it
off around every Gram product, whatever the process chose, and restores the choice after.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

import torch

__all__ = ["DEVICES", "batch_to", "check_device_name", "module_device", "no_tf32",
           "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str, key: str = "parallel.device") -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; else a ValueError naming
    ``key``. Needs no torch device (configs are validated where there is none)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_device(name: str = "auto", num_gpus: float = 0.0, *,
                   key: str = "parallel.device") -> torch.device:
    """The ``torch.device`` for config value ``name`` (see the module docstring).

    ``num_gpus``: the GPUs the caller was given (``parallel.num_gpus``, or on Ray
    ``len(ray.get_gpu_ids())``); ``auto`` picks CUDA only when it is > 0 and torch sees one.
    """
    check_device_name(name, key)
    if name == "auto":
        return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key} is {name!r} but torch sees no CUDA device "
                             f"(torch {torch.__version__}; set {key}: cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{key} is {name!r} but torch sees {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for an empty module."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def batch_to(batch, device: torch.device | str):
    """``batch`` (a :class:`~engram_ray.core.batch.Batch`) with its inputs on ``device``;
    the same object when they are there already. The token mask stays where it is: the
    capture moves it once per batch, and the CPU copy serves the progress counters."""
    device = torch.device(device)
    inputs = batch.inputs
    if isinstance(inputs, torch.Tensor):
        if inputs.device == device:
            return batch
        moved = inputs.to(device)
    elif isinstance(inputs, Mapping):
        if all(not isinstance(v, torch.Tensor) or v.device == device for v in inputs.values()):
            return batch
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in inputs.items()}
    else:
        return batch
    return type(batch)(inputs=moved, concepts=batch.concepts, mask=batch.mask)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 matmuls on CUDA in full IEEE precision inside the block (TF32 off), the
    process's own setting restored after.

    torch ≥ 2.9 has a per-backend setting (``torch.backends.cuda.matmul.fp32_precision``) and
    raises if code reads the legacy global after the two APIs were mixed; setting and restoring
    the per-backend value keeps both readable (the legacy ``allow_tf32`` and
    ``get_float32_matmul_precision`` read the same state). Older torch: the legacy flags.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        if old == "ieee":
            yield
            return
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
        return
    old_flag, old_prec = matmul.allow_tf32, torch.get_float32_matmul_precision()
    matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_prec)
        matmul.allow_tf32 = old_flag
