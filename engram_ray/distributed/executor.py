"""The Ray executor: Σ accumulated in stage actors, reduced by a tree, solved in tasks.

::

    Ray Data (read + tokenize) ─ streaming_split(R) ─▶ feeder r ─▶ stage 0 ─▶ … ─▶ stage S−1
                                                         (R × S StageActors, Σ inside each)
    per (stage, input group): tree_reduce over the R replicas (⌈log₂R⌉ rounds)
    per input group, largest D first: solve_task → payload/<module>.parquet

:mod:`engram_ray.extraction` drives it exactly as it drives the single-process executor; this
module only decides where Σ lives and how it moves. Every fed row is checked to have been read
once and seen once by every stage, or the run fails before anything is committed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TextIO

import ray

from engram_ray.config import ExtractConfig
from engram_ray.core.moments import merge_summaries
from engram_ray.distributed.cluster import cpus_needed, ensure_ray
from engram_ray.distributed.feed import ProgressTracker, feed_replica
from engram_ray.distributed.ingest import count_rows, encoded_dataset, validate_files
from engram_ray.distributed.reduce import tree_depth, tree_reduce
from engram_ray.distributed.solver import checkpoint_task, solve_task
from engram_ray.distributed.stage_actor import StageActor
from engram_ray.extraction import GroupCheckpoint, GroupSolve, Layout, Plan, say
from engram_ray.runinfo import combine_fingerprints

__all__ = ["RayExecutor", "feed_slice"]


class RayExecutor:
    """R replicas × S stage actors for ``cfg.parallel``; Σ stays in the actors until solved."""

    def __init__(self, cfg: ExtractConfig, log: TextIO | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.actors: list[list] = []
        self.tracker = None
        self.fed = [{"rows": 0, "tokens": 0} for _ in range(cfg.parallel.replicas)]
        self.nodes: list[str] = []
        self.rounds = 0

    def start(self, plan: Plan) -> None:
        t0 = time.time()
        validate_files(plan.data)
        ensure_ray(self.cfg.parallel.address, cpus_needed(self.cfg.parallel))
        self.tok_dir, self.pad_id = _tokenizer_info(self.cfg)
        self.tracker = ProgressTracker.remote()
        self.actors = _start_actors(self.cfg, self.tracker)
        self.nodes = ray.get([a.node_id.remote() for chain in self.actors for a in chain])
        p = self.cfg.parallel
        say(self.log, f"{len(self.nodes)} stage actors ready on {len(set(self.nodes))} node(s) "
                      f"({p.replicas} replica(s) × {p.stages} stage(s)) after "
                      f"{time.time() - t0:.1f}s")

    def accumulate(self, plan: Plan, files: list[str]) -> None:
        feed_slice(self, plan.restrict(files))

    def active(self) -> list[list]:
        """The replica chains that saw rows (a replica whose split was empty knows no groups)."""
        return [chain for chain, f in zip(self.actors, self.fed) if f["rows"] > 0]

    def layout(self) -> Layout | None:
        active = self.active()
        if not active:
            return None
        modules, dims = {}, {}
        for actor in active[0]:
            modules.update(ray.get(actor.module_infos.remote()))
            dims.update(ray.get(actor.group_dims.remote()))
        summaries = merge_summaries(*ray.get([a.summaries.remote() for c in active for a in c]))
        parts: dict[str, str] = {}
        for part in ray.get([actor.fingerprint.remote() for actor in active[0]]):
            parts.update(part)
        return Layout(modules=modules, dims=dims, summaries=summaries,
                      fingerprint=combine_fingerprints(parts))

    def _reduced(self, layout: Layout) -> dict[str, tuple[object, object]]:
        """Per group, in solve order: (the tree-reduced Σ ref, the stage actor holding it)."""
        active = self.active()
        owner = {}
        for s, actor in enumerate(active[0]):
            for g in ray.get(actor.group_dims.remote()):
                owner[g] = s
        out = {}
        for g in layout.solve_order():
            s = owner[g]
            out[g], self.rounds = tree_reduce([chain[s].partial.remote(g) for chain in active])
            out[g] = (out[g], active[0][s])
        return out

    def snapshot(self, step: GroupCheckpoint, layout: Layout) -> None:
        opts = {"num_cpus": self.cfg.parallel.solver_num_cpus}
        ray.get([checkpoint_task.options(**opts).remote(step, g, ref)
                 for g, (ref, _) in self._reduced(layout).items()])

    def solve(self, step: GroupSolve, layout: Layout) -> list[dict]:
        p = self.cfg.parallel
        opts = {"num_cpus": p.solver_num_cpus, "num_gpus": p.solver_num_gpus}
        tasks = [solve_task.options(**opts).remote(step, ref, layout.members(g),
                                                   actor.group_weights.remote(g))
                 for g, (ref, actor) in self._reduced(layout).items()]
        say(self.log, f"Σ from {sum(f['tokens'] for f in self.fed):,} tokens; solving "
                      f"{len(tasks)} input group(s), reduce depth {self.rounds}")
        return [row for part in ray.get(tasks) for row in part]

    def metadata(self) -> dict:
        p = self.cfg.parallel
        return {
            "mode": "distributed",
            "model": {"spec": self.cfg.model.to_dict()},
            "parallel": {"stages": p.stages, "replicas": p.replicas,
                         "replicas_with_rows": len(self.active()), "reduce_rounds": self.rounds,
                         "nodes": sorted(set(self.nodes)),
                         "tree_depth": tree_depth(len(self.active()))},
            "data": {"rows": sum(f["rows"] for f in self.fed),
                     "tokens": sum(f["tokens"] for f in self.fed)},
        }

    def close(self) -> None:
        for chain in self.actors:
            for actor in chain:
                ray.kill(actor)
        if self.tracker is not None:
            ray.kill(self.tracker)


def _tokenizer_info(cfg: ExtractConfig) -> tuple[str | None, int]:
    """The model's local directory (config + tokenizer files only) and its pad token id."""
    if cfg.data.features_column is not None:
        return None, 0
    from engram_ray.models.loading import load_tokenizer, model_dir

    storage = cfg.data.storage_options or cfg.store.storage_options
    if cfg.model.path is None:
        raise ValueError("text data needs an HF model directory with a tokenizer (model.path)")
    local = model_dir(cfg.model.path, storage, weights=False)
    tok = load_tokenizer(cfg.model, storage)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return local, int(pad)


def _start_actors(cfg: ExtractConfig, tracker) -> list[list]:
    p = cfg.parallel
    opts = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus}
    if p.placement == "spread":
        opts["scheduling_strategy"] = "SPREAD"
    storage = cfg.data.storage_options or cfg.store.storage_options
    return [[StageActor.options(**opts).remote(cfg.model, s, p.stages, r, cfg.select,
                                               dtype=p.dtype, storage_options=storage,
                                               tracker=tracker)
             for s in range(p.stages)]
            for r in range(p.replicas)]


def feed_slice(ex: RayExecutor, data) -> None:
    """Stream ``data``'s shards through the replicas, adding what each got to ``ex.fed``.
    Checks every row was read once and seen once by every stage."""
    expected = count_rows(data)
    p = ex.cfg.parallel
    # drop_empty=False: rows without a counted token still flow (adding nothing to Σ), so the
    # fed row count can be checked against the files' row count exactly.
    ds = encoded_dataset(data, ex.tok_dir, drop_empty=False, num_cpus=p.encode_num_cpus,
                         concurrency=p.encode_concurrency, read_num_cpus=p.encode_num_cpus)
    splits = ds.streaming_split(len(ex.actors), equal=False)
    feeders = [feed_replica.remote(splits[r], chain, data.batch_size, ex.pad_id,
                                   p.max_in_flight, ex.tracker)
               for r, chain in enumerate(ex.actors)]
    progress = _Progress(ex.tracker, expected + sum(f["rows"] for f in ex.fed), ex.log)
    while ray.wait(feeders, num_returns=len(feeders), timeout=1.0)[1]:
        progress.maybe_print()
    now = ray.get(feeders)
    progress.maybe_print(force=True)
    got = sum(f["rows"] for f in now)
    if got != expected:
        raise RuntimeError(f"fed {got} rows but the data has {expected}: rows were lost or "
                           "counted twice; nothing was committed")
    for total, f in zip(ex.fed, now):
        total["rows"] += f["rows"]
        total["tokens"] += f["tokens"]
    _check_rows(ex.fed, ex.actors)


def _check_rows(fed: list[Mapping], actors) -> None:
    """Every fed row seen by every stage of its replica, exactly once."""
    for r, chain in enumerate(actors):
        for s, actor in enumerate(chain):
            seen = ray.get(actor.counters.remote())["rows"]
            if seen != fed[r]["rows"]:
                raise RuntimeError(f"stage {s} of replica {r} saw {seen} rows, fed "
                                   f"{fed[r]['rows']}; nothing was committed")


class _Progress:
    """Rows/s and tokens/s, stage by stage, every ``every`` seconds on ``out``."""

    def __init__(self, tracker, expected: int, out: TextIO | None, every: float = 2.0) -> None:
        self.tracker, self.expected, self.out, self.every = tracker, expected, out, every
        self.last = 0.0

    def maybe_print(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        s = ray.get(self.tracker.snapshot.remote())
        el = max(s["elapsed"], 1e-9)
        stages = " | ".join(
            f"stage {i}: {v[1] / max(v[2], 1e-9):,.0f} tok/s busy" for i, v in s["stages"].items()
        )
        say(self.out, f"rows {s['rows']:,}/{self.expected:,} "
                      f"({s['rows'] / el:,.1f} rows/s, {s['tokens'] / el:,.0f} tok/s) {stages}")
