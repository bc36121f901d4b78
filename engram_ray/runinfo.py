"""Run identity, written once for both drivers: run ids, model fingerprints, ``run.json``.

A run must say which weights it describes (engrams of two models cannot be mixed, extended or
resumed into one another), so a fingerprint is a sha256 over every tensor's name, shape, dtype
and bytes. Pipeline stages fingerprint their own slices; :func:`combine_fingerprints` folds the
per-tensor digests in name order, so the result does not depend on how the model was split.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import secrets
import time
from collections.abc import Iterable, Mapping

import torch

from engram_ray import __version__
from engram_ray.config import SolverConfig
from engram_ray.core.moments import ModuleInfo

__all__ = [
    "VERSION",
    "combine_fingerprints",
    "fingerprint_parts",
    "model_fingerprint",
    "new_run_id",
    "run_metadata",
]

VERSION = __version__  # the package's, as run metadata records it


def new_run_id() -> str:
    """``run-YYYYmmdd-HHMMSS-xxxxxx``: sortable by time, unique across concurrent jobs."""
    return time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def fingerprint_parts(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """sha256 of each tensor's name, shape, dtype and bytes."""
    parts = {}
    for name, t in named_tensors:
        h = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        parts[name] = h.hexdigest()
    return parts


def combine_fingerprints(parts: Mapping[str, str]) -> str:
    """One digest over sorted per-tensor digests: independent of how the model was split."""
    top = hashlib.sha256()
    for name in sorted(parts):
        top.update(f"{name}:{parts[name]}\n".encode())
    return top.hexdigest()


def model_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Which weights a run belongs to (stages fingerprint their slices; the union agrees)."""
    return combine_fingerprints(fingerprint_parts(named_tensors))


def run_metadata(
    modules: Mapping[str, ModuleInfo],
    summaries: Mapping[str, tuple[int, Mapping[str, int]]],
    dims: Mapping[str, int],
    solver: SolverConfig,
    **extra,
) -> dict:
    """run.json content: what was computed, how, and with which software."""
    concepts = sorted({c for _, counts in summaries.values() for c in counts})
    return {
        "engram_ray_version": VERSION,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _installed("transformers"),
        },
        "solver": solver.to_dict(),
        "concepts": concepts,
        "modules": {n: i.to_dict() for n, i in sorted(modules.items())},
        "groups": {g: {"dim": dims[g], "tokens": summaries[g][0],
                       "concept_tokens": dict(summaries[g][1])} for g in sorted(summaries)},
        **extra,
    }


def _installed(package: str) -> str | None:
    """``package``'s installed version from its metadata, without importing it (importing
    transformers costs the driver ~2 s that a run of a factory model never needs)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
