"""Edited checkpoints written tensor by tensor: never the whole model in memory.

For an HF checkpoint, each source safetensors file is rewritten to the output directory in the
same layout (same shard names and index), streaming: the header is computed from the source's
metadata (names, dtypes, shapes — no tensor is read for it), then tensors are read, edited if
they are a planned module's weight or bias, cast back to their stored dtype and appended one at
a time. Peak memory is one tensor plus its engrams. Config, tokenizer and other small files are
copied as they are. A tied output layer (GPT-2's ``lm_head`` stored as ``transformer.wte``) is
edited through the key the checkpoint stores it under, once.

Outputs are published whole or not at all. A local output is written into
``<out>.partial-<nonce>`` and renamed into place at the end (:func:`staged_local`); an ``s3://``
output is written to a local temporary directory and uploaded file by file with the completion
marker (``edit.json``) last, and a failed upload removes what it had uploaded (best effort:
the store may be what failed) (:func:`upload_dir`). An output that is an existing file, or a
non-empty directory or prefix, is refused before anything is written (:func:`check_output`),
locally and on S3 alike: an edit never merges with stale files. Every edited tensor is checked
to be finite before it is written (an α too large for the checkpoint's dtype is refused).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from safetensors import safe_open

from engram_ray.core.edit import EditPlan, check_finite
from engram_ray.io.outputs import IN_PROGRESS
from engram_ray.io.storage import Storage

__all__ = [
    "MARKER",
    "SafetensorsWriter",
    "check_output",
    "edit_tensor_stream",
    "new_stage",
    "publish_stage",
    "staged_local",
    "upload_dir",
    "write_edited_checkpoint",
    "write_edited_files",
    "write_edited_files_many",
    "write_safetensors_stream",
]

MARKER = "edit.json"  # written last: an output holding it is complete (and says what it is)

_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class SafetensorsWriter:
    """A safetensors file written one tensor at a time: ``layout`` (name → dtype, shape), in
    file order, fixes the header up front; each tensor must then arrive in that order with
    that dtype and shape."""

    def __init__(self, path: str, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
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
        self.layout, self._names = layout, iter(layout)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, t: torch.Tensor) -> None:
        expect = next(self._names)
        dtype, shape = self.layout[expect]
        if name != expect or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} does not match the planned layout entry {expect!r}")
        self._f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self._f.close()


def write_safetensors_stream(
    path: str,
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file from ``(name, tensor)`` pairs arriving one at a time
    (:class:`SafetensorsWriter`)."""
    w = SafetensorsWriter(path, layout, metadata)
    try:
        for name, t in tensors:
            w.write(name, t)
    finally:
        w.close()


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
                # the delta may have been formed on a GPU: it comes to the host to be written
                edited = (t.float() - delta.to(t.device, torch.float32)).to(t.dtype)
                check_finite(key, t, edited, plan.alpha)
                t = edited
        yield key, t


def write_edited_checkpoint(src_dir: str, out_dir: str, plan: EditPlan,
                            aliases: Mapping[str, str] | None = None) -> list[str]:
    """Copy the HF directory ``src_dir`` to the local ``out_dir`` with the plan's edits,
    published whole (:func:`staged_local`); returns the safetensors files written."""
    check_output(Storage(out_dir))
    with staged_local(out_dir) as stage:
        return write_edited_files(src_dir, stage, plan, aliases)


def write_edited_files(src_dir: str, dest_dir: str, plan: EditPlan,
                       aliases: Mapping[str, str] | None = None) -> list[str]:
    """Write ``src_dir``'s HF checkpoint, edited, into the existing directory ``dest_dir``
    (small files copied, safetensors streamed tensor by tensor); returns the safetensors files."""
    errors = write_edited_files_many(src_dir, [dest_dir], [plan], aliases)
    if errors[0] is not None:
        raise errors[0]
    return _safetensors_files(src_dir)


def write_edited_files_many(src_dir: str, dest_dirs: Sequence[str], plans: Sequence[EditPlan],
                            aliases: Mapping[str, str] | None = None
                            ) -> list[BaseException | None]:
    """Write ``src_dir``'s checkpoint once per (``dest_dirs[i]``, ``plans[i]``), in lockstep:
    each base tensor is read once and each output gets its own edit of it, so a batch of edits
    of one model reads the checkpoint once, and (when the plans share a caching engram source,
    ``core.edit.SharedEngrams``) each module's engrams once. An output whose edit fails (a
    non-finite weight, a shape mismatch) is dropped with its error; the others go on. Returns
    the error of each output (None: written)."""
    files = _safetensors_files(src_dir)
    errors: list[BaseException | None] = [None] * len(plans)
    for name in os.listdir(src_dir):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and not name.endswith((".safetensors", ".bin", ".pt")):
            for d in dest_dirs:
                shutil.copy2(src, os.path.join(d, name))
    all_keys = {}
    for fname in files:
        with safe_open(os.path.join(src_dir, fname), framework="pt") as f:
            all_keys[fname] = list(f.keys())
    every = {k for ks in all_keys.values() for k in ks}
    filters = [EditPlanFilter(plan, every, aliases) for plan in plans]
    for fname in files:
        with safe_open(os.path.join(src_dir, fname), framework="pt") as f:
            _lockstep(f, all_keys[fname], fname, dest_dirs, filters, aliases, errors)
    return errors


def _lockstep(f, keys: list[str], fname: str, dest_dirs: Sequence[str], filters, aliases,
              errors: list) -> None:
    """One safetensors file: every key read once, edited and written into each live output."""
    layout = {}
    for k in keys:
        sl = f.get_slice(k)
        layout[k] = (_torch_dtype(sl.get_dtype()), tuple(sl.get_shape()))
    current: dict[str, torch.Tensor] = {}
    live: dict[int, tuple] = {}
    for i, d in enumerate(dest_dirs):
        if errors[i] is None:
            stream = edit_tensor_stream(filters[i].for_keys(keys), keys, current.__getitem__,
                                        aliases)
            live[i] = (SafetensorsWriter(os.path.join(d, fname), layout, f.metadata() or {}),
                       iter(stream))
    try:
        for k in keys:
            current.clear()
            current[k] = f.get_tensor(k)  # the one read of this tensor, shared by every output
            for i, (writer, stream) in list(live.items()):
                try:
                    writer.write(*next(stream))
                except Exception as e:  # noqa: BLE001 - this output fails, the others go on
                    errors[i] = e
                    writer.close()
                    del live[i]
    finally:
        for writer, _ in live.values():
            writer.close()


def _safetensors_files(src_dir: str) -> list[str]:
    files = sorted(f for f in os.listdir(src_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {src_dir}")
    return files


def check_output(dest: Storage) -> None:
    """Refuse an output that is an existing file, or a non-empty directory (local) or prefix
    (``s3://``): an edited model never merges with what was there. Checked before any work,
    so the refusal is one line and costs nothing."""
    if not dest.remote:
        if os.path.exists(dest.root) and not os.path.isdir(dest.root):
            raise FileExistsError(f"output {dest.uri} is an existing file, not a directory")
        if os.path.isdir(dest.root) and os.listdir(dest.root):
            raise FileExistsError(f"output directory {dest.uri} exists and is not empty")
        return
    try:
        with dest.errors("checking the output"):
            info = dest.fs.info(dest.root)
    except FileNotFoundError:
        return
    if info.get("type") != "directory":
        raise FileExistsError(f"output {dest.uri} is an existing object, not a prefix")
    with dest.errors("listing the output"):
        entries = dest.fs.ls(dest.root, detail=False)
    if entries:
        raise FileExistsError(f"output prefix {dest.uri} exists and is not empty; an edit is "
                              "never merged with other objects: choose an empty prefix")


@contextmanager
def staged_local(out: str) -> Iterator[str]:
    """A fresh ``<out>.partial-<nonce>`` directory to write into, renamed to ``out`` when the
    block ends without error (atomic: ``out`` is absent or complete) and removed either way."""
    stage = new_stage(out)
    try:
        yield stage
        publish_stage(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def new_stage(out: str) -> str:
    """A fresh, empty ``<out>.partial-<nonce>`` directory beside the local output ``out``."""
    out = os.path.abspath(os.path.expanduser(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    stage = f"{out}.partial-{uuid.uuid4().hex[:12]}"
    os.mkdir(stage)
    return stage


def publish_stage(stage: str, out: str) -> None:
    """Rename the finished ``stage`` to ``out`` (atomic; never over a non-empty directory)."""
    out = os.path.abspath(os.path.expanduser(out))
    try:
        os.replace(stage, out)  # replaces an empty directory, never a non-empty one
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(f"output {out} was created by someone else while this "
                                  "edit was written; nothing was published") from None
        raise


def upload_dir(local: str, dest: Storage, marker: str = MARKER) -> list[str]:
    """Upload every file under ``local`` to ``dest``, ``marker`` last; returns the relative
    names. If any upload fails, what was uploaded is removed (best effort, one bulk delete:
    the store may be the thing that failed) and the error is raised: no prefix is left that
    holds the marker without the whole model."""
    names = sorted(os.path.relpath(os.path.join(d, f), local).replace(os.sep, "/")
                   for d, _, fs in os.walk(local) for f in fs)
    first = [IN_PROGRESS] if IN_PROGRESS in names else []  # an attempt names itself first
    names = first + [n for n in names if n not in (marker, IN_PROGRESS)] + \
        ([marker] if marker in names else [])
    started: list[str] = []
    try:
        for name in names:
            started.append(name)
            with dest.errors("uploading", name):
                dest.fs.put_file(os.path.join(local, *name.split("/")), dest.path(name))
    except BaseException:
        _remove_quietly(dest, started)
        raise
    if first:  # complete now: the marker is out; the attempt's note goes (best effort)
        _remove_quietly(dest, first)
    return [n for n in names if n not in first]


def _remove_quietly(dest: Storage, names: list[str]) -> None:
    """Delete ``names`` below ``dest`` in one request, ignoring every error (a dead endpoint,
    botocore's own exceptions): cleanup must not hide the failure that caused it."""
    if not names:
        return
    try:
        dest.fs.rm([dest.path(n) for n in names])
    except Exception:  # noqa: BLE001, S110 - best effort; the original error is re-raised
        pass


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
