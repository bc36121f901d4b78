"""The single-process engine: one pass of statistics → solve per input group → committed run.

This is the whole method in one process, and the oracle the distributed path is tested
against: the Ray pipeline runs the same ``Capture``, ``Moments.merge``, ``solve_group`` and
``RunWriter`` code, only spread over actors and tasks.

    run = extract(model, batches, uri="runs/r1")      # Σ for every concept in one pass
    plan = plan_edit(run, ["c1", "c2"], alpha=1.0)    # engrams add: any subset from one run
    apply_edit(model, plan)
"""

from __future__ import annotations

import hashlib
import platform
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from engram_ray.config import SolverConfig
from engram_ray.core.batch import Batch
from engram_ray.core.capture import collect_statistics, weight_matrix
from engram_ray.core.moments import ModuleInfo, Statistics
from engram_ray.core.solve import solve_group
from engram_ray.io.store import Run, RunWriter, open_run

__all__ = [
    "combine_fingerprints",
    "extract",
    "extract_from_config",
    "fingerprint_parts",
    "model_fingerprint",
    "module_weights",
    "new_run_id",
    "run_metadata",
    "solve_statistics",
]


def new_run_id() -> str:
    """``run-YYYYmmdd-HHMMSS-xxxxxx``: sortable by time, unique across concurrent jobs."""
    return time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def module_weights(model: nn.Module, stats: Statistics) -> dict[str, torch.Tensor]:
    """Each captured module as its (out, D) float64 matrix, bias column as captured."""
    return {
        n: weight_matrix(model.get_submodule(n), absorb_bias=info.bias)
        for n, info in stats.modules.items()
    }


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


def solve_statistics(
    stats: Statistics,
    weights: Mapping[str, torch.Tensor],
    writer: RunWriter,
    solver: SolverConfig = SolverConfig(),
    concepts: Sequence[str] | None = None,
    keep_statistics: bool = False,
) -> list[dict]:
    """Solve every input group (largest D first) and stream its engrams into ``writer``."""
    stats.check_concepts(concepts or ())
    rows: list[dict] = []
    for group in sorted(stats.groups, key=lambda g: -stats.groups[g].dim):
        members = stats.members(group)
        records = solve_group(stats.groups[group], members, weights, solver, concepts)
        rows += writer.write_records(stats.modules, records)
        if keep_statistics:
            writer.write_statistics(group, stats.groups[group])
    return rows


def run_metadata(
    modules: Mapping[str, ModuleInfo],
    summaries: Mapping[str, tuple[int, Mapping[str, int]]],
    dims: Mapping[str, int],
    solver: SolverConfig,
    **extra,
) -> dict:
    """run.json content: what was computed, how, and with which software."""
    import transformers

    from engram_ray import __version__

    concepts = sorted({c for _, counts in summaries.values() for c in counts})
    return {
        "engram_ray_version": __version__,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "solver": solver.to_dict(),
        "concepts": concepts,
        "modules": {n: i.to_dict() for n, i in sorted(modules.items())},
        "groups": {g: {"dim": dims[g], "tokens": summaries[g][0],
                       "concept_tokens": dict(summaries[g][1])} for g in sorted(summaries)},
        **extra,
    }


def extract(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    uri: str,
    target_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    solver: SolverConfig = SolverConfig(),
    absorb_bias: bool = True,
    share_inputs: bool = True,
    gram_dtype: str = "float64",
    low_rank: bool = True,
    storage_options=None,
    overwrite: bool = False,
    config: Mapping | None = None,
    keep_statistics: bool = False,
    sources: Sequence[str] = (),
    extension=None,
    progress=None,
) -> Run:
    """Accumulate Σ over ``batches``, solve every engram, commit a run at ``uri``, open it.

    ``keep_statistics`` also stores Σ in the run (:meth:`Run.statistics`), tagged with
    ``sources`` (e.g. the shard paths read), so a later run can merge new shards and re-solve;
    merging statistics that share a source is refused. ``extension``
    (:class:`~engram_ray.incremental.Extension`) merges ``batches``' Σ into a base run's first.
    On any error nothing committed stays behind at ``uri``.
    """
    t0 = time.time()
    model.eval()
    stats = collect_statistics(
        model,
        batches,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        absorb_bias=absorb_bias,
        share_inputs=share_inputs,
        gram_dtype=gram_dtype,
        low_rank=low_rank,
        progress=progress,
    )
    t1 = time.time()
    fingerprint = model_fingerprint(model.state_dict().items())
    extra = {}
    if extension is not None:
        extension.check_model(fingerprint)
        stats = extension.merge(stats)
        keep_statistics = True
        extra["extends"] = extension.base.uri
    else:
        for m in stats.groups.values():
            m.sources = frozenset(sources)
    writer = RunWriter(uri, storage_options, overwrite=overwrite)
    try:
        rows = solve_statistics(stats, module_weights(model, stats), writer, solver,
                                keep_statistics=keep_statistics)
        info = run_metadata(
            stats.modules,
            {g: m.summary() for g, m in stats.groups.items()},
            {g: m.dim for g, m in stats.groups.items()},
            solver,
            config=dict(config or {}),
            model={"fingerprint": fingerprint, "class": type(model).__name__},
            timings={"statistics_s": t1 - t0, "solve_s": time.time() - t1},
            mode="single-process",
            **extra,
        )
        writer.commit(rows, info)
    except BaseException:
        writer.abort()
        raise
    return open_run(uri, storage_options)


def extract_from_config(cfg, *, progress=None) -> Run:
    """The single-process path for an :class:`~engram_ray.config.ExtractConfig` (no Ray).

    Same readers, tokenization, selection and solver as the distributed runner: this is the
    oracle its tests compare against, and the fallback for one-machine jobs.
    """
    from engram_ray.incremental import prepare_extension
    from engram_ray.io.data import iter_batches, resolve_paths
    from engram_ray.models.loading import load_model, load_tokenizer

    if cfg.store.checkpoint_shards is not None:
        raise ValueError("store.checkpoint_shards checkpoints the Ray pipeline; the single-process "
                         "engine (--local) does not checkpoint: unset it or drop --local")
    extension = prepare_extension(cfg)
    if extension is not None:
        cfg = extension.config  # the shards the base run has not counted
    storage = cfg.data.storage_options or cfg.store.storage_options
    model = load_model(cfg.model, storage, dtype=cfg.parallel.dtype)
    tokenizer = None if cfg.data.features_column else load_tokenizer(cfg.model, storage)
    run_id = cfg.store.run_id or new_run_id()
    return extract(
        model,
        iter_batches(cfg.data, tokenizer),
        uri=cfg.store.run_uri(run_id),
        target_modules=cfg.select.target_modules,
        layers_to_transform=cfg.select.layers_to_transform,
        absorb_bias=cfg.select.absorb_bias,
        share_inputs=cfg.select.share_inputs,
        gram_dtype=cfg.select.gram_dtype,
        low_rank=cfg.select.low_rank,
        solver=cfg.solver,
        storage_options=cfg.store.storage_options,
        overwrite=cfg.store.overwrite,
        config=cfg.to_dict(),
        keep_statistics=cfg.store.keep_statistics,
        sources=resolve_paths(cfg.data),
        extension=extension,
        progress=progress,
    )
