"""The single-process executor: the whole method in one process, and the oracle the Ray
executor is tested against (both run :mod:`engram_ray.extraction`; only where Σ lives differs).

    run = extract(model, batches, uri="runs/r1")      # Σ for every concept in one pass
    plan = plan_edit(run, ["c1", "c2"], alpha=1.0)    # engrams add: any subset from one run
    apply_edit(model, plan)
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TextIO

from torch import nn

from engram_ray.config import (
    ExtractConfig,
    SelectConfig,
    SolverConfig,
    StoreConfig,
    absolute_uri,
)
from engram_ray.core.batch import Batch
from engram_ray.core.capture import Capture
from engram_ray.core.layers import weight_matrix
from engram_ray.core.moments import Statistics
from engram_ray.core.select import select_modules
from engram_ray.devices import batch_to, module_device, resolve_device
from engram_ray.extraction import (
    GroupCheckpoint,
    GroupSolve,
    Layout,
    Plan,
    plan_for,
    prepare,
    run_extraction,
)
from engram_ray.io.store import Run, RunWriter
from engram_ray.progress import Progress
from engram_ray.runinfo import model_fingerprint
from engram_ray.runs import open_run

__all__ = ["LocalExecutor", "extract", "extract_from_config", "solve_statistics"]


class LocalExecutor:
    """Σ in this process: one :class:`Capture` on the whole model, fed ``batches_for(files)``."""

    def __init__(self, model: nn.Module, batches_for: Callable[[list[str]], Iterable[Batch]],
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.model, self.batches_for, self.progress = model, batches_for, progress
        self.capture: Capture | None = None
        self.rows = 0

    def start(self, plan: Plan) -> None:
        self.model.eval()
        modules = select_modules(self.model, plan.select.target_modules,
                                 plan.select.layers_to_transform)
        self.capture = Capture(modules, plan.select)

    def accumulate(self, plan: Plan, files: list[str]) -> None:
        device = module_device(self.model)  # batches follow the model (CPU or a GPU)
        for batch in self.batches_for(files):
            self.capture.accumulate(self.model, batch_to(batch, device))
            self.rows += batch.batch_size
            if self.progress is not None:
                mask = batch.token_mask()
                self.progress(self.rows, int(mask.sum()) if mask is not None else batch.batch_size)

    def layout(self) -> Layout | None:
        if self.rows == 0:
            return None
        stats = self.capture.statistics()
        return Layout(modules=stats.modules, dims={g: m.dim for g, m in stats.groups.items()},
                      summaries={g: m.summary() for g, m in stats.groups.items()},
                      fingerprint=model_fingerprint(self.model.state_dict().items()))

    def snapshot(self, step: GroupCheckpoint, layout: Layout) -> None:
        for group in layout.solve_order():
            step(group, self.capture.groups[group].clone())

    def solve(self, step: GroupSolve, layout: Layout) -> list[dict]:
        rows: list[dict] = []
        self.solve_times = []
        for group in layout.solve_order():
            t0 = time.perf_counter()
            members = layout.members(group)
            weights = {i.name: weight_matrix(self.model.get_submodule(i.name), i.bias)
                       for i in members}
            rows += step(self.capture.groups[group], members, weights)
            self.solve_times.append({"group": group, "dim": layout.dims[group],
                                     "modules": len(members),
                                     "seconds": round(time.perf_counter() - t0, 4)})
        return rows

    def metadata(self) -> dict:
        """run.json's executor part; ``solve_groups``: each input group's solve (and write)
        seconds with its width D, the cost that grows as D³ (eigh) and D²·concepts."""
        return {"mode": "single-process", "model": {"class": type(self.model).__name__},
                "device": str(module_device(self.model)),
                "solve_groups": list(getattr(self, "solve_times", []))}

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()


def extract(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    uri: str,
    select: SelectConfig | None = None,
    solver: SolverConfig | None = None,
    storage_options: Mapping | None = None,
    overwrite: bool = False,
    keep_statistics: bool = False,
    sources: Sequence[str] = (),
    extension=None,
    config: Mapping | None = None,
    progress=None,
    **select_fields,
) -> Run:
    """Accumulate Σ over ``batches``, solve every engram, commit a run at ``uri``, open it.

    Σ is accumulated and solved on ``model``'s device (a model on CUDA: batches are moved
    there, Σ stays there, float64, until the solve); only the engrams come back to the host.

    ``select`` picks the modules (``select_fields`` are a shorthand for SelectConfig's own,
    e.g. ``target_modules=["q_proj"]``, ``low_rank=False``). ``keep_statistics`` also stores
    Σ in the run (:meth:`Run.statistics`), tagged with ``sources`` (e.g. the shard paths
    read), so a later run can merge new shards and re-solve; ``extension``
    (:class:`~engram_ray.incremental.Extension`) merges ``batches``' Σ into a base run's.
    On any error nothing committed stays behind at ``uri``.
    """
    select = select or SelectConfig()
    if select_fields:
        select = dataclasses.replace(select, **select_fields)
    uri = absolute_uri(uri, "uri")  # the run's one name, whatever the working directory
    parent, _, run_id = uri.rstrip("/").rpartition("/")
    store = StoreConfig(uri=parent or ".", storage_options=storage_options, overwrite=overwrite,
                        keep_statistics=keep_statistics)
    if extension is not None:
        sources = extension.new_files  # what the new Σ counted, on top of the base's
    plan = plan_for(uri, store, run_id, select=select, solver=solver or SolverConfig(),
                    sources=list(sources), config=dict(config or {}), extension=extension)
    once = iter([batches])
    executor = LocalExecutor(model, lambda files: next(once), progress)
    run_extraction(plan, executor, log=io.StringIO())  # the Python API reports by returning
    return open_run(plan.run_storage(), model=model)  # bound to the module given


def extract_from_config(cfg: ExtractConfig, *, progress=None, log: TextIO | None = None) -> Run:
    """The single-process path for an :class:`~engram_ray.config.ExtractConfig` (no Ray).

    Same plan, readers, tokenization, selection and solver as the Ray executor: this is the
    oracle its tests compare against, and the fallback for one-machine jobs. The model goes
    to ``parallel.device`` (``auto``: a GPU when ``parallel.num_gpus > 0`` and one is visible).
    """
    from engram_ray.io.data import iter_batches
    from engram_ray.models.loading import load_model, load_tokenizer

    if cfg.store.checkpoint_shards is not None:
        raise ValueError("store.checkpoint_shards checkpoints the Ray pipeline; the single-process "
                         "engine (--local) does not checkpoint: unset it or drop --local")
    plan = prepare(cfg, log)
    storage = cfg.model_storage_options
    device = resolve_device(cfg.parallel.device, cfg.parallel.num_gpus)
    at = plan.model  # the model folder prepare checked, with the options loading uses
    model = load_model(cfg.model, storage, dtype=cfg.parallel.dtype, location=at).to(device)
    tokenizer = None if cfg.data.features_column else load_tokenizer(cfg.model, storage,
                                                                      location=at)
    if progress is None:  # the CLI's progress lines (rows, rates, ETA), as the Ray path prints
        progress = _progress_lines(plan, cfg.parallel.progress_interval_s, log)
    executor = LocalExecutor(
        model, lambda files: iter_batches(plan.restrict(files), tokenizer, plan.inputs_of(files)),
        progress)
    run_extraction(plan, executor, log)
    return open_run(plan.run_storage())


def _progress_lines(plan: Plan, interval_s: float | None, log: TextIO | None):
    """A ``progress(rows, tokens)`` callback printing :class:`Progress` lines over the rows of
    every file the plan reads (counted up front from the files' metadata, as the Ray path
    does; None when lines are off)."""
    if interval_s is None:
        return None
    from engram_ray.io.data import count_rows

    line = Progress(count_rows(plan.restrict(plan.sources), files=plan.inputs_of(plan.sources))
                    if plan.sources else None, interval_s, log)
    tokens = [0]

    def progress(rows: int, batch_tokens: int) -> None:
        tokens[0] += batch_tokens
        line.update(rows, tokens[0])

    return progress


def solve_statistics(stats: Statistics, weights: Mapping, writer: RunWriter,
                     solver: SolverConfig | None = None) -> list[dict]:
    """Solve in-memory ``stats`` (e.g. two runs' Σ merged by hand) into ``writer``, every
    input group largest D first; returns the manifest rows for ``writer.commit``."""
    rows: list[dict] = []
    for group in sorted(stats.groups, key=lambda g: (-stats.groups[g].dim, g)):
        moments, members = stats.groups[group], stats.members(group)
        step = GroupSolve(writer.storage, writer.storage_options, solver or SolverConfig(),
                          keep_statistics=False, base=None, sources=tuple(moments.sources))
        rows += step(moments, members, {i.name: weights[i.name] for i in members})
    return rows
