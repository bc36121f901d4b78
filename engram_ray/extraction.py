"""Extraction, written once for both drivers: prepare → accumulate → merge → solve → commit.

::

    plan = prepare(cfg)                  # validate; run id; what an extension or resume adds
    run_extraction(plan, executor)       # executor: LocalExecutor (one process) | RayExecutor
      ├ executor.accumulate(shards)      # Σ over the shards, a checkpoint slice at a time
      ├ layout = executor.layout()       # modules, Σ sizes, token counts, model fingerprint
      ├ checks: extension/resume model + modules, every concept has tokens everywhere
      ├ RunWriter(run)                   # first: the run's lease (one writer per run) and a
      │                                  # staging area; a second writer fails here, at once
      ├ executor.solve(GroupSolve, …)    # per input group, largest D first: merge the base Σ,
      │                                  # eigh once, every engram's norm → staged statistics
      ├ solution_warnings                # directions kept per group, engram norms → run.json
      └ RunWriter.commit(manifest, run.json): publish, marker last; a failure anywhere aborts
                                         # (staging removed, lease released): nothing committed

An executor only moves Σ around (in one process, or across actors, a tree reduction and solver
tasks); what is merged, solved, checked and committed is decided here, so every feature built
on extraction (extensions, resume, checks, metadata) exists once. :class:`GroupSolve` and
:class:`GroupCheckpoint` are the per-group steps both executors run (the Ray one inside tasks);
solver tasks write into the writer's staging area (``GroupSolve.uri``), never into the run's
own prefix, so a run becomes visible only through the commit (``io/store.py``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import torch

from engram_ray.config import (
    DataConfig,
    ExtractConfig,
    ModelSpec,
    SelectConfig,
    SolverConfig,
    StoreConfig,
)
from engram_ray.core.moments import ModuleInfo, Moments, check_counts, merge_summaries
from engram_ray.core.solve import solution_warnings, solve_group
from engram_ray.incremental import Extension, prepare_extension
from engram_ray.io.sigma_checkpoint import Generation, SigmaCheckpoint, config_digest, slices
from engram_ray.io.storage import Location, Storage, as_storage
from engram_ray.io.store import RunWriter, run_exists, split_run_uri, weight_digest
from engram_ray.runinfo import new_run_id, run_metadata

__all__ = [
    "Executor",
    "GroupCheckpoint",
    "GroupSolve",
    "Layout",
    "Plan",
    "merge_base",
    "plan_for",
    "prepare",
    "run_extraction",
    "say",
]


def say(log: TextIO | None, msg: str) -> None:
    """One progress line on ``log`` (default: the current stderr, looked up at call time)."""
    print(f"[engram-ray] {msg}", file=log or sys.stderr, flush=True)


@dataclass
class Plan:
    """One extraction pass: where it commits, what it reads, and what its Σ merges into."""

    run_id: str
    uri: str
    select: SelectConfig
    solver: SolverConfig
    store: StoreConfig
    sources: list[str]  # the shards this pass reads (after extension and resume)
    config: dict = field(default_factory=dict)  # the config as given, for run.json
    data: DataConfig | None = None  # None: batches come from the caller (Python API)
    extension: Extension | None = None
    checkpoint: SigmaCheckpoint | None = None
    digest: str | None = None  # config_digest: what a checkpoint was written for
    location: Storage | None = field(default=None, repr=False)  # the run's, see run_storage
    model: Location | None = field(default=None, repr=False)  # model.path (or weights), checked
    inputs: dict[str, Storage] = field(default_factory=dict, repr=False)  # source → Storage

    def run_storage(self) -> Storage:
        """The run's :class:`Storage`, built once per pass (``plan_for`` builds it) and used by
        the existence check, the writer and the reader of the committed run alike."""
        if self.location is None:
            self.location = as_storage(self.uri, self.store.storage_options)
        return self.location

    @property
    def base(self):
        """What this pass's Σ is added to at solve time: the run being extended, or the
        checkpoint generation being resumed (``None`` for a fresh pass)."""
        if self.extension is not None:
            return self.extension.base
        return self.checkpoint.generation if self.checkpoint is not None else None

    def restrict(self, files: Sequence[str]) -> DataConfig:
        """The data config reading only ``files``."""
        return dataclasses.replace(self.data, paths=list(files))

    def inputs_of(self, files: Sequence[str]) -> list[Location]:
        """``files`` sorted, each as the ``Storage`` :func:`prepare` resolved it to (its URI
        when it has none): the readers open each file through that one ``Storage``."""
        return [self.inputs.get(f, f) for f in sorted(set(files))]

    def group_solve(self, staging_uri: Location) -> GroupSolve:
        """The per-group solve step, writing payloads into the writer's staging area (its
        Storage, or URI)."""
        keep = self.store.keep_statistics or self.extension is not None
        return GroupSolve(staging_uri, self.store.storage_options, self.solver, keep, self.base,
                          tuple(self.sources))

    def writer(self) -> RunWriter:
        """The run's writer: takes the run's lease and a staging area (``io/store.py``)."""
        return RunWriter(self.run_storage(), overwrite=self.store.overwrite,
                         lease_timeout_s=self.store.lease_timeout_s,
                         break_lease=self.store.break_lease)


@dataclass
class Layout:
    """What the accumulated Σ covers: reported by an executor once the stream has ended."""

    modules: dict[str, ModuleInfo]
    dims: dict[str, int]  # input group → D
    summaries: dict[str, tuple[int, dict[str, int]]]  # group → (tokens, tokens per concept)
    fingerprint: str

    def members(self, group: str) -> list[ModuleInfo]:
        return [i for i in self.modules.values() if i.group == group]

    def solve_order(self) -> list[str]:
        """Groups by decreasing D (eigh is O(D³): start the longest first), ties by name."""
        return sorted(self.dims, key=lambda g: (-self.dims[g], g))


class Executor(Protocol):
    """Where Σ is accumulated and solved; :func:`run_extraction` drives it."""

    def start(self, plan: Plan) -> None: ...
    def accumulate(self, plan: Plan, files: list[str]) -> None: ...
    def layout(self) -> Layout | None: ...  # None: no row reached the model yet
    def snapshot(self, step: GroupCheckpoint, layout: Layout) -> None: ...
    def solve(self, step: GroupSolve, layout: Layout) -> list[dict]: ...
    def metadata(self) -> dict: ...  # the executor's own run.json entries
    def close(self) -> None: ...


def merge_base(base, group: str, moments: Moments, sources: Sequence[str]) -> Moments:
    """``moments`` (which counted ``sources``) plus ``base``'s Σ of ``group`` when there is a
    base (a run that kept its Σ, or a checkpoint generation). The sources tag makes
    ``Moments.merge`` refuse a shard counted twice, so every row counts exactly once."""
    moments.sources = frozenset(sources)
    return moments if base is None else base.group_statistics(group).merge(moments)


@dataclass(frozen=True)
class GroupSolve:
    """Solve one input group and write its statistics into the staging area at ``uri`` (the
    driver's :class:`RunWriter` made it): merge the base Σ, one eigh, every engram's norm; the
    spectrum, the concepts' rows or blocks (and Σ_total if kept) are what the run stores."""

    uri: Location  # the writer's staging area (its Storage: a solver task rebuilds it once)
    storage_options: Mapping | None = field(repr=False)
    solver: SolverConfig
    keep_statistics: bool
    base: object | None
    sources: tuple[str, ...]

    def __call__(self, moments: Moments, members: Sequence[ModuleInfo],
                 weights: Mapping[str, torch.Tensor], device: str | None = None) -> list[dict]:
        writer = RunWriter(self.uri, self.storage_options, attach=True)
        group = members[0].group
        moments = merge_base(self.base, group, moments, self.sources)
        if device is not None:
            moments = moments.to(device)  # eigh and matmuls where the task runs, still float64
        solution = solve_group(moments, list(members), weights, self.solver)
        digests = {m.name: weight_digest(weights[m.name]) for m in members}
        return writer.write_group(list(members), moments, solution, digests,
                                  keep_total=self.keep_statistics)


@dataclass(frozen=True)
class GroupCheckpoint:
    """Write one group's Σ so far (the generation resumed from, plus ``moments`` over
    ``sources``) into checkpoint generation ``gen``."""

    gen: Generation
    resumed: Generation | None
    sources: tuple[str, ...]

    def __call__(self, group: str, moments: Moments) -> None:
        self.gen.write_group(group, merge_base(self.resumed, group, moments, self.sources))


def prepare(cfg: ExtractConfig, log: TextIO | None = None) -> Plan:
    """Everything checked before work starts: model path, data files, an existing run, what an
    extension adds, what a checkpoint already counted (a rerun resumes from it)."""
    from engram_ray.io.data import resolve_files

    extension = prepare_extension(cfg)
    if extension is not None:
        cfg = extension.config  # the shards the base run has not counted
        say(log, f"extending {extension.base.uri} with {len(extension.new_files)} new shard(s)")
    model = _check_model_paths(cfg)
    # An extension resolved its new shards already: the same Storages, not built again.
    found = ([extension.inputs[f] for f in extension.new_files] if extension is not None
             else resolve_files(cfg.data))
    files = [f.uri for f in found]
    run_id = cfg.store.run_id or new_run_id()
    plan = plan_for(cfg.store.run_uri(run_id), cfg.store, run_id, select=cfg.select,
                    solver=cfg.solver, sources=files, config=cfg.to_dict(), data=cfg.data,
                    extension=extension, inputs={f.uri: f for f in found})
    plan.model = model
    if cfg.store.checkpoint_shards:
        plan.digest = config_digest(cfg)
        ck = plan.checkpoint = SigmaCheckpoint(plan.run_storage().parent(), run_id)
        ck.check(plan.digest)
        if ck.generation is not None:
            plan.sources = [f for f in files if f not in ck.sources]
            say(log, f"resuming from checkpoint {ck.uri}: {len(ck.sources)} shard(s) counted, "
                     f"{len(plan.sources)} to go")
    return plan


def plan_for(uri: str, store: StoreConfig, run_id: str, **fields) -> Plan:
    """A plan committing at ``uri``; a committed run there is refused up front unless
    ``store.overwrite``, and so is a run id that is not one safe path component."""
    uri = uri.rstrip("/")
    split_run_uri(uri)
    location = as_storage(uri, store.storage_options)
    if run_exists(location) and not store.overwrite:
        raise FileExistsError(f"a committed run already exists at {uri}; choose another "
                              "run_id or pass overwrite")
    fields.setdefault("select", SelectConfig())
    fields.setdefault("solver", SolverConfig())
    return Plan(run_id=run_id, uri=uri, store=store, location=location, **fields)


def _check_model_paths(cfg: ExtractConfig) -> Location | None:
    """Fail in one line before any work when the model is not there (a folder, a URI, or a
    Hub id in the cache: ``models.loading.check_model_path`` names what it tried); returns
    ``model.path`` as checked (a remote folder's Storage: the loaders reuse it), or a
    factory's ``model.weights`` Storage."""
    from engram_ray.models.loading import check_model_path, model_location

    options = cfg.model_storage_options
    model = model_location(cfg.model.path, options)
    if model is not None:
        check_model_path(model, options)
    if cfg.model.weights is not None:
        weights = as_storage(cfg.model.weights, options)
        if not weights.exists():
            raise FileNotFoundError(f"model weights {cfg.model.weights!r} do not exist")
        return model if cfg.model.path is not None else weights
    return model


def run_extraction(plan: Plan, executor: Executor, log: TextIO | None = None) -> str:
    """Accumulate, check, solve and commit ``plan`` with ``executor``; returns the run's URI.
    The run's lease is taken first; on any error nothing is committed (the writer aborts: its
    staging area removed, the lease released) and the executor is closed either way."""
    t0 = time.time()
    writer = plan.writer()
    try:
        try:
            executor.start(plan)
            _accumulate(plan, executor, log)
            t_stats = time.time()
            layout = _checked_layout(plan, executor.layout())
            rows = executor.solve(plan.group_solve(writer.storage), layout)
            kept, warnings = _warnings(rows, layout, log)
            timings = {"statistics_s": t_stats - t0, "solve_s": time.time() - t_stats,
                       "total_s": time.time() - t0}
            meta = _metadata(plan, layout, executor.metadata(), timings)
            writer.commit(rows, {**meta, "warnings": warnings,
                                 "groups": _with_kept(meta["groups"], kept)})
        finally:
            executor.close()
    except BaseException:
        writer.abort()
        raise
    if plan.checkpoint is not None:
        plan.checkpoint.remove()  # the committed run holds everything it had
    say(log, f"committed {len(rows)} engrams ({len(layout.modules)} modules) to {plan.uri} "
             f"in {time.time() - t0:.1f}s")
    return plan.uri


def _warnings(rows: Sequence[dict], layout: Layout, log: TextIO | None):
    """Directions kept per group, and the solver's warnings (each also said on ``log``)."""
    kept: dict[str, int | None] = {}
    for r in rows:
        kept.setdefault(r["group"], r.get("kept"))
    found = solution_warnings({g: (k, layout.dims[g]) for g, k in kept.items()},
                              ((r["group"], r["module"], r["concept"], r["rel_norm"])
                               for r in rows))
    for w in found:
        say(log, f"warning: {w['message']}")
    return kept, found


def _with_kept(groups: Mapping[str, dict], kept: Mapping[str, int | None]) -> dict:
    return {g: {**v, "kept": kept.get(g)} for g, v in groups.items()}


def _accumulate(plan: Plan, executor: Executor, log: TextIO | None) -> None:
    """Feed the shards, a slice at a time with checkpoints (``store.checkpoint_shards``)."""
    parts = slices(plan.sources, plan.store.checkpoint_shards)
    done: list[str] = []
    for i, part in enumerate(parts):
        executor.accumulate(plan, part)
        done += part
        if plan.checkpoint is not None and i < len(parts) - 1:
            _checkpoint(plan, executor, done, log)


def _checkpoint(plan: Plan, executor: Executor, done: list[str], log: TextIO | None) -> None:
    """Write the Σ counted so far (the generation resumed from + this process's) as a new
    generation, then make it the one in force."""
    t = time.time()
    layout = executor.layout()
    if layout is None:
        return
    ck = plan.checkpoint
    resumed = ck.generation
    if resumed is not None:
        ck.check_model(layout.fingerprint)
    gen = ck.new_generation()
    executor.snapshot(GroupCheckpoint(gen, resumed, tuple(done)), layout)
    ck.commit(gen, sources=sorted(set(done) | ck.sources),
              summaries=merge_summaries(ck.summaries(), layout.summaries),
              fingerprint=layout.fingerprint, digest=plan.digest, keep=resumed)
    say(log, f"checkpoint: {len(set(done) | ck.sources)} shard(s) counted, written in "
             f"{time.time() - t:.1f}s")


def _checked_layout(plan: Plan, layout: Layout | None) -> Layout:
    """The layout with the base's token counts added, after every consistency check."""
    if layout is None:
        paths = plan.data.paths if plan.data is not None else "given"
        raise ValueError(f"the data {paths} holds no rows")
    if not layout.modules:
        raise ValueError(f"select={plan.select} matched no supported module in any stage")
    summaries = layout.summaries
    if plan.extension is not None:
        plan.extension.check_modules(layout.modules)
        plan.extension.check_model(layout.fingerprint)
        summaries = plan.extension.merge_summaries(summaries)
    if plan.checkpoint is not None and plan.checkpoint.generation is not None:
        plan.checkpoint.check_model(layout.fingerprint)
        summaries = merge_summaries(plan.checkpoint.summaries(), summaries)
    check_counts(summaries)
    return dataclasses.replace(layout, summaries=summaries)


def _metadata(plan: Plan, layout: Layout, extra: dict, timings: dict) -> dict:
    extra = dict(extra)
    extra["model"] = {"fingerprint": layout.fingerprint, **extra.get("model", {})}
    if plan.extension is not None:
        extra["extends"] = plan.extension.base.uri
    ck = plan.checkpoint
    if ck is not None and ck.generation is not None:
        extra["resumed"] = {"checkpoint": ck.uri, "shards": len(ck.sources)}
    recorded = _checkpoint_layout(plan, layout)
    if recorded is not None:
        extra["checkpoint"] = recorded
    return run_metadata(layout.modules, layout.summaries, layout.dims, plan.solver,
                        config=plan.config, run_id=plan.run_id, timings=timings, **extra)


def _checkpoint_layout(plan: Plan, layout: Layout) -> dict | None:
    """For a checkpoint model: each module tensor's dtype as the extraction held it and the
    tied aliases (``models.outline.checkpoint_layout``), so that an edit binds the run to its
    checkpoint without building the model. None for a factory or an in-memory model."""
    from engram_ray.models.outline import checkpoint_layout

    config = plan.config or {}
    model = config.get("model") or {}
    if not model.get("path"):
        return None
    dtype = (config.get("parallel") or {}).get("dtype")
    options = (plan.data.storage_options if plan.data is not None else None) \
        or plan.store.storage_options  # ExtractConfig.model_storage_options
    return checkpoint_layout(ModelSpec.from_dict(model),
                             {n: m.bias for n, m in layout.modules.items()}, options, dtype,
                             location=plan.model)
