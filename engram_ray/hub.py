"""Hugging Face Hub model ids as model paths: ``org/name`` or ``hf://org/name@revision``.

A neutral module (it imports nothing from engram_ray but :mod:`engram_ray.redaction`): the
config normalizes a bare id to ``hf://org/name``, the storage layer answers "does it exist"
from the cache when offline, and the model loaders resolve it to a local snapshot.

Resolution goes through ``huggingface_hub.snapshot_download``, i.e. the Hub's own cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; read when called,
so a job's environment decides), its token (``HF_TOKEN``, never written anywhere: messages go
through :func:`engram_ray.redaction.one_line`, which scrubs it) and its offline mode
(``HF_HUB_OFFLINE=1``: the cache only). Every node resolves the id itself, so a cluster needs
either network access to the Hub or the cache on a shared ``HF_HOME``. The revision is a
branch, tag or commit (``@main`` by default; a ``/`` in it written ``%2F``, as
``HfFileSystem`` does). Only safetensors weights are fetched (other formats are never read).

A bare ``org/name`` is a Hub id only when no such local directory exists, and it must look like
one (two names of letters, digits, ``.``, ``_``, ``-``): a local folder always wins.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

from engram_ray.redaction import one_line

__all__ = ["cache_dir", "cached_snapshot", "is_hub_path", "normalize_model_path", "parse",
           "snapshot"]

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID = re.compile(rf"{_NAME}/{_NAME}")
_REPO_TYPES = ("datasets/", "spaces/")
# Weight formats never fetched (only safetensors is read), and with weights=False the weights.
_OTHER_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx",
                  "*.py"]
_SAFETENSORS = ["*.safetensors"]


def parse(path: str) -> tuple[str, str | None] | None:
    """``(repo id, revision or None)`` of a Hub model path, else None."""
    if path.startswith("hf://"):
        rest = path[len("hf://"):].strip("/")
        if rest.startswith(_REPO_TYPES):
            return None
    elif "://" in path or os.path.exists(path.partition("@")[0]):
        return None
    else:
        rest = path
    repo, _, rev = rest.partition("@")
    return (repo, unquote(rev) or None) if _ID.fullmatch(repo) else None


def is_hub_path(path: str) -> bool:
    return parse(path) is not None


def normalize_model_path(path: str) -> str:
    """A bare Hub id as ``hf://org/name[@rev]``; any other path unchanged."""
    if "://" not in path and parse(path) is not None:
        return f"hf://{path}"
    return path


def cache_dir() -> str:
    """The Hub cache as huggingface_hub finds it, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(path: str, *, weights: bool = True, local_only: bool = False) -> str:
    """The local snapshot folder of the Hub model ``path`` (fetched into the cache when online
    and missing: the small files, plus the safetensors weights with ``weights``). A failure
    raises FileNotFoundError naming the path, the cache and the cause (credentials redacted)."""
    parsed = parse(path)
    if parsed is None:
        raise ValueError(f"{path!r} is not a Hugging Face Hub model id")
    repo, revision = parsed
    from huggingface_hub import snapshot_download

    ignore = _OTHER_WEIGHTS + ([] if weights else _SAFETENSORS)
    offline = local_only or _offline()
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                 local_files_only=offline, ignore_patterns=ignore)
    except Exception as e:  # not cached, no network, unknown repo, refused token
        where = "offline (HF_HUB_OFFLINE=1): not" if offline else "not found"
        raise FileNotFoundError(
            f"model path {path!r} is a Hugging Face Hub id ({repo}@{revision or 'main'}) "
            f"{where} in the Hub cache {cache_dir()}; fetch it there (huggingface-cli "
            f"download {repo}), set HF_HOME to a cache that holds it, or give a folder or a "
            f"URI ({one_line(e)})") from None


def cached_snapshot(path: str, *, weights: bool = False) -> str | None:
    """The snapshot folder when the cache already holds the Hub model ``path``, else None."""
    try:
        return snapshot(path, weights=weights, local_only=True)
    except (FileNotFoundError, ValueError):
        return None
