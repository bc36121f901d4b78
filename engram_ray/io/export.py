"""Edited checkpoints written tensor by tensor: never the whole model in memory.

For an HF checkpoint, each source safetensors file is rewritten to the output directory in the
same layout (same shard names and index), streaming: the header is computed from the source's
metadata (names, dtypes, shapes — no tensor is read for it), then tensors are read, edited if
they are a planned module's weight or bias, cast back to their stored dtype and appended one at
a time. Peak memory is one tensor plus its engrams. Config, tokenizer and other small files are
copied as they are. A tied output layer (GPT-2's ``lm_head`` stored as ``transformer.wte``) is
edited through the key the checkpoint stores it under, once.

The output directory is written under a temporary name and renamed into place at the end, so a
failed export never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open

from engram_ray.core.edit import EditPlan

__all__ = ["edit_tensor_stream", "write_edited_checkpoint", "write_safetensors_stream"]

_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors_stream(
    path: str,
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file from ``(name, tensor)`` pairs arriving one at a time.

    ``layout`` (name → dtype, shape), in file order, fixes the header up front; each tensor
    must then arrive in that order with that dtype and shape.
    """
    header: dict = {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    names = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors:
            expect = next(names)
            dtype, shape = layout[expect]
            if name != expect or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r} does not match the planned layout entry {expect!r}")
            f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def edit_tensor_stream(
    plan: EditPlan, keys: Iterable[str], read, aliases: Mapping[str, str] | None = None
) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` with planned edits applied; ``read(key)`` loads one tensor."""
    aliases = dict(aliases or {})
    targets: dict[str, tuple[str, str]] = {}
    for module in sorted(plan.scales):
        for part in ("weight", "bias"):
            key = f"{module}.{part}"
            key = aliases.get(key, key)
            if key in targets:
                plan.notes.append(f"{module}.{part}: stored as {key}, already edited; edited once")
                continue
            targets[key] = (module, part)
    cache: dict[str, tuple] = {}
    for key in keys:
        t = read(key)
        hit = targets.get(key)
        if hit is not None:
            module, part = hit
            if module not in cache:
                cache.clear()  # one module's deltas at a time
                cache[module] = plan.delta(module)
            dw, db = cache[module]
            delta = dw if part == "weight" else db
            if delta is not None:
                if tuple(delta.shape) != tuple(t.shape):
                    raise ValueError(f"{key}: engram shape {tuple(delta.shape)} ≠ tensor "
                                     f"{tuple(t.shape)}; is this the run's model?")
                t = (t.float() - delta.float()).to(t.dtype)
        yield key, t


def write_edited_checkpoint(src_dir: str, out_dir: str, plan: EditPlan,
                            aliases: Mapping[str, str] | None = None) -> list[str]:
    """Copy the HF directory ``src_dir`` to ``out_dir`` with the plan's edits; returns files."""
    files = sorted(f for f in os.listdir(src_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {src_dir}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty")
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name in os.listdir(src_dir):
            src = os.path.join(src_dir, name)
            if os.path.isfile(src) and not name.endswith((".safetensors", ".bin", ".pt")):
                shutil.copy2(src, os.path.join(tmp, name))
        all_keys = {}
        for fname in files:
            with safe_open(os.path.join(src_dir, fname), framework="pt") as f:
                all_keys[fname] = list(f.keys())
        edited_anywhere = EditPlanFilter(plan, {k for ks in all_keys.values() for k in ks}, aliases)
        for fname in files:
            path = os.path.join(src_dir, fname)
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                layout = {}
                for k in all_keys[fname]:
                    sl = f.get_slice(k)
                    layout[k] = (_torch_dtype(sl.get_dtype()), tuple(sl.get_shape()))
                sub = edited_anywhere.for_keys(all_keys[fname])
                stream = edit_tensor_stream(sub, all_keys[fname], f.get_tensor, aliases)
                write_safetensors_stream(os.path.join(tmp, fname), layout, stream, meta)
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


class EditPlanFilter:
    """Restricts a plan to the modules whose tensors live in one shard (for sharded models)."""

    def __init__(self, plan: EditPlan, keys: set[str], aliases) -> None:
        self.plan, self.aliases = plan, dict(aliases or {})
        missing = [m for m in plan.scales
                   if self.aliases.get(f"{m}.weight", f"{m}.weight") not in keys]
        if missing:
            raise ValueError(f"the checkpoint has no tensor for module(s) {missing[:5]}")

    def for_keys(self, keys: Iterable[str]) -> EditPlan:
        keys = set(keys)
        # A module's weight and bias may sit in different shards: keep it if either is here.
        scales = {m: s for m, s in self.plan.scales.items()
                  if any(self.aliases.get(f"{m}.{p}", f"{m}.{p}") in keys
                         for p in ("weight", "bias"))}
        return EditPlan(source=self.plan.source, forget=self.plan.forget, alpha=self.plan.alpha,
                        scales=scales, notes=self.plan.notes)


def _torch_dtype(name: str) -> torch.dtype:
    for dt, n in _DTYPE_NAMES.items():
        if n == name:
            return dt
    raise ValueError(f"unsupported safetensors dtype {name}")
