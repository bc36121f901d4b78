"""Key-selective reads of safetensors checkpoints, and materializing modules built without weights.

A pipeline stage owns a slice of a model, so it must read only that slice's tensors: a 70B
checkpoint is far larger than one stage's memory. :class:`WeightFiles` maps tensor names to the
files that hold them (one ``model.safetensors``, a sharded HF checkpoint described by
``model.safetensors.index.json``, or a bare ``.safetensors`` state dict), opens only the files a
request touches (downloading remote ones into a local cache on first use) and reads tensors one
by one with ``safetensors.safe_open``. :func:`empty_parameters` builds a module whose parameters
live on the meta device (no memory, no init cost) while buffers are computed for real (e.g.
RoPE's ``inv_freq``, which no checkpoint stores); :func:`materialize` then fills in exactly the
parameters a module still holds from a :class:`WeightFiles`.

``WeightFiles`` is named for what it reads (the model's weight files, key by key), to keep it
apart from the run's resume checkpoints (:mod:`engram_ray.io.sigma_checkpoint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from torch import nn

from engram_ray.io.storage import (
    Location,
    Storage,
    StorageOptions,
    as_storage,
    is_remote,
    join,
    location_uri,
)

__all__ = [
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "WeightFiles",
    "cache_dir_for",
    "cache_root",
    "download",
    "empty_parameters",
    "materialize",
]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_PATCH_LOCK = threading.Lock()


def cache_root() -> str:
    """Where remote checkpoints are cached: ``$ENGRAM_RAY_CACHE`` or ``~/.cache/engram_ray``."""
    root = os.environ.get("ENGRAM_RAY_CACHE") or os.path.join("~", ".cache", "engram_ray")
    return os.path.abspath(os.path.expanduser(root))


def cache_dir_for(uri: str) -> str:
    """The local cache folder for the remote location ``uri``."""
    # One folder per remote location; the hash keeps different buckets/prefixes apart.
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "root"
    return os.path.join(cache_root(), "models", f"{name}-{digest}")


def download(uri: Location, local_dir: str, storage_options: StorageOptions | None = None) -> str:
    """Copy the remote file ``uri`` (or its Storage) into ``local_dir`` (atomically; skipped
    when already there).

    Several stage processes on one node may fetch the same shard at once: each writes a private
    temporary file and renames it into place, so a reader never sees a partial file.
    """
    storage = as_storage(uri, storage_options)
    fs, uri = storage.fs, storage.root
    target = os.path.join(local_dir, location_uri(storage).rstrip("/").rsplit("/", 1)[-1])
    size = fs.size(uri)
    if os.path.exists(target) and os.path.getsize(target) == size:
        return target
    os.makedirs(local_dir, exist_ok=True)
    tmp = f"{target}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        fs.get(uri, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


class WeightFiles:
    """Tensor-by-tensor access to a safetensors checkpoint, local or ``s3://``.

    ``location`` is either a directory (HF layout: ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``) or one ``.safetensors`` file. Only the files that hold
    requested keys are opened (and, for remote checkpoints, downloaded). ``keys_read`` records
    every tensor name read so far, so callers and tests can verify what a stage touched.
    """

    def __init__(self, location: Location, storage_options: StorageOptions | None = None
                 ) -> None:
        storage = as_storage(location, storage_options)  # a Storage given is used as is
        self.location = location = location_uri(location)
        self.storage_options = storage.options
        self.remote = is_remote(location)
        self._storage = storage  # every file of the checkpoint is reached through it
        self._fs = storage.fs
        self._local_dir = cache_dir_for(location) if self.remote else None
        self.keys_read: set[str] = set()
        self._weight_map = self._build_weight_map()

    # --- layout --------------------------------------------------------------------------------
    def _build_weight_map(self) -> dict[str, str]:
        """tensor name → file location (a path or URI)."""
        loc = self.location
        if loc.endswith(".safetensors"):
            if not self._fs.exists(loc):
                raise FileNotFoundError(f"weights file not found: {loc}")
            return dict.fromkeys(self._file_keys(loc), loc)
        index, single = join(loc, INDEX_FILE), join(loc, WEIGHTS_FILE)
        if self._fs.exists(index):
            with open(self._local(index)) as f:
                weight_map = json.load(f)["weight_map"]
            return {k: join(loc, v) for k, v in weight_map.items()}
        if self._fs.exists(single):
            return dict.fromkeys(self._file_keys(single), single)
        raise FileNotFoundError(
            f"no safetensors weights under {loc}: expected {WEIGHTS_FILE} or {INDEX_FILE}"
        )

    def _file_keys(self, file: str) -> list[str]:
        with safe_open(self._local(file), framework="pt") as f:
            return list(f.keys())

    def _local(self, file: str) -> str:
        """A local path for ``file`` (downloaded into the cache first if remote)."""
        if not self.remote:
            return file
        return download(self.location_of(file), self._local_dir)

    def location_of(self, file: str) -> Storage:
        """The Storage of one of :meth:`files_for`'s files: the checkpoint's own (``file`` is
        the location itself, or ``join(location, name)``), not a new build."""
        if file == self.location:
            return self._storage
        return self._storage.child(file[len(self.location):].lstrip("/"))

    # --- reading -------------------------------------------------------------------------------
    def keys(self) -> set[str]:
        """Every tensor name the checkpoint holds."""
        return set(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self._weight_map

    def files_for(self, keys: Iterable[str]) -> set[str]:
        """The files (paths or URIs) that hold ``keys``."""
        return {self._weight_map[k] for k in keys}

    def read(
        self, keys: Iterable[str], device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read ``keys`` onto ``device``, opening each holding file once; unknown keys raise."""
        keys = list(dict.fromkeys(keys))
        missing = [k for k in keys if k not in self._weight_map]
        if missing:
            raise KeyError(f"{self.location} has no tensor(s) {missing[:5]}")
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        dev = str(torch.device(device))
        for file, names in by_file.items():
            with safe_open(self._local(file), framework="pt", device=dev) as f:
                for k in names:
                    out[k] = f.get_tensor(k)
            self.keys_read.update(names)
        return out


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules with every parameter on the meta device; buffers stay real.

    Parameters are what checkpoints store and what costs memory, so they are left empty for
    :func:`materialize`. Buffers are usually cheap and derived (RoPE frequencies), and often
    non-persistent (absent from checkpoints), so they are computed normally. This patches
    ``nn.Module.register_parameter`` for the duration of the block (process-wide, under a lock).
    """
    with _PATCH_LOCK:
        original = nn.Module.register_parameter

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            if param is not None and param.device.type != "meta":
                param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            original(module, name, param)

        nn.Module.register_parameter = register  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def _resolve_key(
    names: list[str], checkpoint: WeightFiles, aliases: Mapping[str, str], prefixes: Iterable[str]
) -> str | None:
    """The checkpoint key holding the tensor known in the module under any of ``names``."""
    candidates = list(names) + [aliases[n] for n in names if n in aliases]
    for name in candidates:
        if name in checkpoint:
            return name
    # Legacy checkpoints may lack the base-model prefix (``h.0.attn…`` for ``transformer.h.0…``).
    for name in candidates:
        for prefix in prefixes:
            if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in checkpoint:
                return name[len(prefix) + 1 :]
    return None


def materialize(
    module: nn.Module,
    checkpoint: WeightFiles,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    aliases: Mapping[str, str] | None = None,
    prefixes: Iterable[str] = (),
) -> set[str]:
    """Load every meta parameter of ``module`` from ``checkpoint``; move everything to ``device``.

    Names are ``module``'s own dotted names, which must be the checkpoint's names (a stage keeps
    the full model's names for exactly this). A parameter shared under several names (tied
    embeddings) is read once and stays shared. ``aliases`` maps a module name to the checkpoint
    key that stores it when absent under its own name (``lm_head.weight`` →
    ``model.embed_tokens.weight``). Floating tensors are cast to ``dtype``, or else to the dtype
    the module was built with. Persistent buffers are loaded when the checkpoint has them.
    Returns the set of checkpoint keys read.
    """
    aliases = dict(aliases or {})
    prefixes = tuple(prefixes)
    # Group the names under which each parameter object is reachable (ties share an object).
    groups: dict[int, tuple[nn.Parameter, list[tuple[str, nn.Module, str]]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, param in mod._parameters.items():
            if param is None or param.device.type != "meta":
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            groups.setdefault(id(param), (param, []))[1].append((full, mod, attr))
    wanted: dict[int, str] = {}
    for pid, (_, places) in groups.items():
        names = [p[0] for p in places]
        key = _resolve_key(names, checkpoint, aliases, prefixes)
        if key is None:
            raise KeyError(f"checkpoint {checkpoint.location} has no tensor for {names}")
        wanted[pid] = key
    tensors = checkpoint.read(sorted(set(wanted.values())), device=device)
    for pid, (param, places) in groups.items():
        t = tensors[wanted[pid]]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(
                f"{places[0][0]}: checkpoint tensor {wanted[pid]} has shape {tuple(t.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        if t.is_floating_point():
            t = t.to(dtype or param.dtype)
        new = nn.Parameter(t, requires_grad=param.requires_grad)
        for _, mod, attr in places:
            mod._parameters[attr] = new
    read = set(wanted.values())
    # Buffers: load persistent ones the checkpoint stores, move the rest (computed at build).
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, buf in list(mod._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            persistent = attr not in mod._non_persistent_buffers_set
            if persistent and (full in checkpoint or buf.device.type == "meta"):
                t = checkpoint.read([full], device=device)[full]
                read.add(full)
                mod._buffers[attr] = t.to(buf.dtype) if t.is_floating_point() else t
            else:
                mod._buffers[attr] = buf.to(device)
    return read
