"""The distributed extraction: shards → stage actors → tree-reduced Σ → solver tasks → commit.

::

    Ray Data (read + tokenize) ─ streaming_split(R) ─▶ feeder r ─▶ stage 0 ─▶ … ─▶ stage S−1
                                                         (R × S StageActors, Σ inside each)
    per (stage, input group): tree_reduce over the R replicas (⌈log₂R⌉ rounds)
    per input group, largest D first: solve_and_write task → payload/<module>.parquet
    driver: check every row was counted once → manifest.parquet, run.json, _COMMITTED

With ``store.checkpoint_shards`` the shards go through in slices, and after each slice the Σ so
far is reduced and checkpointed (``resume.py``): a killed run resumes where it stopped.

Everything that can be checked before work starts is (config, model path, every shard's schema,
an existing run); everything after fails closed: no commit marker unless all tasks succeeded.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import ray

from engram_ray.config import ExtractConfig
from engram_ray.core.moments import ModuleInfo, check_counts, merge_summaries
from engram_ray.distributed.feed import ProgressTracker, feed_replica
from engram_ray.distributed.ingest import count_rows, encoded_dataset, validate_files
from engram_ray.distributed.reduce import tree_depth, tree_reduce
from engram_ray.distributed.solver import solve_and_write, solve_order, write_checkpoint
from engram_ray.distributed.stage_actor import StageActor
from engram_ray.engine import combine_fingerprints, new_run_id, run_metadata
from engram_ray.incremental import prepare_extension
from engram_ray.io.sigma_checkpoint import Checkpoint, config_digest, restrict, slices
from engram_ray.io.store import RunWriter, run_exists

__all__ = ["ensure_ray", "run_extract"]


def ensure_ray(address: str | None = None, min_cpus: float = 0.0) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a local Ray; no-op when connected.

    A local Ray advertises at least ``min_cpus`` logical CPUs: on a small machine (2 cores)
    the stage actors' reservations would otherwise leave Ray Data's read tasks no CPU to be
    scheduled on, and the stream would wait forever.
    """
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def cpus_needed(cfg: ExtractConfig) -> float:
    """Logical CPUs the pipeline reserves at once: actors, feeders, one encode and one read task."""
    p = cfg.parallel
    return p.stages * p.replicas * p.num_cpus + p.replicas * 0.25 + 2 * p.encode_num_cpus + 1


def _tokenizer_info(cfg: ExtractConfig) -> tuple[str | None, int]:
    if cfg.data.features_column is not None:
        return None, 0
    from engram_ray.models.loading import load_tokenizer, model_dir

    storage = cfg.data.storage_options or cfg.store.storage_options
    if cfg.model.path is None:
        raise ValueError("text data needs an HF model directory with a tokenizer (model.path)")
    local = model_dir(cfg.model.path, storage, weights=False)  # config + tokenizer files only
    tok = load_tokenizer(cfg.model, storage)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return local, int(pad)


def _check_model(cfg: ExtractConfig) -> None:
    from engram_ray.io import storage as fsx

    for uri in (cfg.model.path, cfg.model.weights):
        if uri is not None and not fsx.filesystem(uri, cfg.store.storage_options).exists(
            fsx.strip_protocol(uri) if fsx.is_remote(uri) else uri
        ):
            raise FileNotFoundError(f"model path {uri!r} does not exist")


class _Progress:
    def __init__(self, tracker, expected: int, out: TextIO, every: float = 2.0) -> None:
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
        _say(self.out, f"rows {s['rows']:,}/{self.expected:,} "
                       f"({s['rows'] / el:,.1f} rows/s, {s['tokens'] / el:,.0f} tok/s) {stages}")


def _start_actors(cfg: ExtractConfig, tracker) -> list[list]:
    p = cfg.parallel
    opts = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus}
    if p.placement == "spread":
        opts["scheduling_strategy"] = "SPREAD"
    select = {k: getattr(cfg.select, k) for k in
              ("target_modules", "layers_to_transform", "absorb_bias", "share_inputs", "gram_dtype",
               "low_rank")}
    storage = cfg.data.storage_options or cfg.store.storage_options
    return [
        [StageActor.options(**opts).remote(cfg.model.to_dict(), s, p.stages, r, select,
                                           dtype=p.dtype, storage_options=storage,
                                           tracker=tracker)
         for s in range(p.stages)]
        for r in range(p.replicas)
    ]


def _collect_layout(actors) -> tuple[dict[str, ModuleInfo], dict, dict, dict[int, list[str]]]:
    """Module infos, group dims, summed counts, and which groups each stage holds.

    ``actors`` are the chains that saw rows (a replica whose split was empty knows no groups).
    """
    infos: dict[str, ModuleInfo] = {}
    dims: dict[str, int] = {}
    groups_of_stage: dict[int, list[str]] = {}
    for s, actor in enumerate(actors[0]):
        infos.update(ray.get(actor.module_infos.remote()))
        d = ray.get(actor.group_dims.remote())
        dims.update(d)
        groups_of_stage[s] = sorted(d)
    summaries = merge_summaries(*ray.get([a.summaries.remote() for chain in actors for a in chain]))
    return infos, dims, summaries, groups_of_stage


def run_extract(cfg: ExtractConfig, *, log: TextIO | None = None) -> str:
    """Run the whole distributed extraction for ``cfg``; returns the committed run's URI.

    Progress goes to ``log`` (default: the current ``sys.stderr``, looked up at call time).
    With ``store.checkpoint_shards`` the shards are fed in slices and the Σ so far is
    checkpointed after each (``resume.py``); a rerun with the same ``run_id`` resumes.
    """
    t0 = time.time()
    log = log or sys.stderr
    extension = prepare_extension(cfg)
    if extension is not None:
        cfg = extension.config  # the shards the base run has not counted
        _say(log, f"extending {extension.base.uri} with {len(extension.new_files)} new shard(s)")
    _check_model(cfg)
    files, _ = validate_files(cfg.data)
    run_id = cfg.store.run_id or new_run_id()
    run_uri = cfg.store.run_uri(run_id)
    if run_exists(run_uri, cfg.store.storage_options) and not cfg.store.overwrite:
        raise FileExistsError(f"a committed run already exists at {run_uri}")
    checkpoint = resumed = None
    if cfg.store.checkpoint_shards:
        checkpoint = Checkpoint(cfg.store.uri, run_id, cfg.store.storage_options)
        checkpoint.check(config_digest(cfg))
        resumed = checkpoint.generation  # merged into every group at solve time
        if resumed is not None:
            files = [f for f in files if f not in checkpoint.sources]
            _say(log, f"resuming from checkpoint {checkpoint.uri}: {len(checkpoint.sources)} "
                      f"shard(s) counted, {len(files)} to go")
    ensure_ray(cfg.parallel.address, cpus_needed(cfg))
    tok_dir, pad_id = _tokenizer_info(cfg)
    tracker = ProgressTracker.remote()
    actors = _start_actors(cfg, tracker)
    writer = None
    try:
        nodes = ray.get([a.node_id.remote() for chain in actors for a in chain])
        _say(log, f"{len(nodes)} stage actors ready on {len(set(nodes))} node(s) "
                  f"({cfg.parallel.replicas} replica(s) × {cfg.parallel.stages} stage(s)) "
                  f"after {time.time() - t0:.1f}s")
        fed = [{"rows": 0, "tokens": 0} for _ in actors]
        parts = slices(files, cfg.store.checkpoint_shards)
        done: list[str] = []
        for i, part in enumerate(parts):
            _feed(restrict(cfg, part), actors, tracker, tok_dir, pad_id, fed, log)
            done += part
            if checkpoint is not None and i < len(parts) - 1:
                _checkpoint(checkpoint, resumed, actors, fed, done, cfg, log)
        t_stats = time.time()
        active = [chain for chain, f in zip(actors, fed) if f["rows"] > 0]
        if not active:
            raise ValueError(f"the data {cfg.data.paths} holds no rows")
        infos, dims, summaries, groups_of_stage = _collect_layout(active)
        if not infos:
            raise ValueError(f"select={cfg.select} matched no supported module in any stage")
        fingerprint = _fingerprint(active)
        if extension is not None:
            extension.check_modules(infos)
            extension.check_model(fingerprint)
            summaries = extension.merge_summaries(summaries)
        if resumed is not None:
            checkpoint.check_model(fingerprint)
            summaries = merge_summaries(checkpoint.summaries(), summaries)
        check_counts(summaries)
        writer = RunWriter(run_uri, cfg.store.storage_options, overwrite=cfg.store.overwrite)
        stage_of = {g: s for s, gs in groups_of_stage.items() for g in gs}
        base = extension.base if extension is not None else resumed
        rounds = 0
        tasks = []
        for g in solve_order(dims):
            s = stage_of[g]
            partials = [chain[s].partial.remote(g) for chain in active]
            reduced, rounds = tree_reduce(partials)
            weights = active[0][s].group_weights.remote(g)
            members = [i for i in infos.values() if i.group == g]
            tasks.append(solve_and_write.options(
                num_cpus=cfg.parallel.solver_num_cpus, num_gpus=cfg.parallel.solver_num_gpus,
            ).remote(reduced, members, weights, cfg.solver.to_dict(), run_uri,
                     cfg.store.storage_options, cfg.store.keep_statistics, base, files))
        _say(log, f"Σ from {sum(f['tokens'] for f in fed):,} tokens; solving {len(tasks)} input "
                  f"group(s), reduce depth {rounds}")
        rows = [row for part in ray.get(tasks) for row in part]
        extra = {"extends": extension.base.uri} if extension is not None else {}
        if resumed is not None:
            extra["resumed"] = {"checkpoint": checkpoint.uri,
                                "shards": len(checkpoint.sources)}
        info = run_metadata(
            infos, summaries, dims, cfg.solver,
            config=cfg.to_dict(),
            run_id=run_id,
            model={"fingerprint": fingerprint, "spec": cfg.model.to_dict()},
            parallel={"stages": cfg.parallel.stages, "replicas": cfg.parallel.replicas,
                      "replicas_with_rows": len(active), "reduce_rounds": rounds,
                      "nodes": sorted(set(nodes)),
                      "tree_depth": tree_depth(len(active))},
            data={"rows": sum(f["rows"] for f in fed), "tokens": sum(f["tokens"] for f in fed)},
            timings={"statistics_s": t_stats - t0, "solve_s": time.time() - t_stats,
                     "total_s": time.time() - t0},
            mode="distributed",
            **extra,
        )
        writer.commit(rows, info)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        for chain in actors:
            for actor in chain:
                ray.kill(actor)
        ray.kill(tracker)
    if checkpoint is not None:
        checkpoint.remove()  # the committed run holds everything it had
    _say(log, f"committed {len(rows)} engrams ({len(info['concepts'])} concepts × "
              f"{len(infos)} modules) to {run_uri} in {time.time() - t0:.1f}s")
    return run_uri


def _feed(cfg: ExtractConfig, actors, tracker, tok_dir, pad_id, fed: list[dict], log) -> None:
    """Stream ``cfg``'s shards through the replicas; ``fed[r]`` accumulates what replica r got.
    Checks every row was read once and seen once by every stage."""
    expected = count_rows(cfg.data)
    # drop_empty=False: rows without a counted token still flow (adding nothing to Σ), so the
    # fed row count can be checked against the files' row count exactly.
    ds = encoded_dataset(cfg.data, tok_dir, drop_empty=False,
                         num_cpus=cfg.parallel.encode_num_cpus,
                         concurrency=cfg.parallel.encode_concurrency,
                         read_num_cpus=cfg.parallel.encode_num_cpus)
    replicas = len(actors)
    splits = ds.streaming_split(replicas, equal=False)
    feeders = [feed_replica.remote(splits[r], actors[r], cfg.data.batch_size, pad_id,
                                   cfg.parallel.max_in_flight, tracker)
               for r in range(replicas)]
    progress = _Progress(tracker, expected + sum(f["rows"] for f in fed), log)
    while ray.wait(feeders, num_returns=len(feeders), timeout=1.0)[1]:
        progress.maybe_print()
    now = ray.get(feeders)
    progress.maybe_print(force=True)
    got = sum(f["rows"] for f in now)
    if got != expected:
        raise RuntimeError(f"fed {got} rows but the data has {expected}: rows were lost or "
                           "counted twice; nothing was committed")
    for total, f in zip(fed, now):
        total["rows"] += f["rows"]
        total["tokens"] += f["tokens"]
    _check_rows(fed, actors)


def _fingerprint(chains) -> str:
    parts: dict[str, str] = {}
    for actor in chains[0]:
        parts.update(ray.get(actor.fingerprint.remote()))
    return combine_fingerprints(parts)


def _checkpoint(checkpoint: Checkpoint, resumed, actors, fed, done, cfg, log) -> None:
    """Write the Σ counted so far (the generation resumed from + every replica's) as a new
    generation, then make it the one in force."""
    t = time.time()
    active = [chain for chain, f in zip(actors, fed) if f["rows"] > 0]
    if not active:
        return
    infos, dims, summaries, groups_of_stage = _collect_layout(active)
    fingerprint = _fingerprint(active)
    if resumed is not None:
        checkpoint.check_model(fingerprint)
    gen = checkpoint.new_generation()
    sources = sorted(set(done) | (checkpoint.sources if resumed is not None else set()))
    tasks = []
    for s, groups in groups_of_stage.items():
        for g in groups:
            reduced, _ = tree_reduce([chain[s].partial.remote(g) for chain in active])
            tasks.append(write_checkpoint.options(num_cpus=cfg.parallel.solver_num_cpus).remote(
                reduced, g, gen, resumed, list(done)))
    ray.get(tasks)
    base_summaries = checkpoint.summaries() if resumed is not None else {}
    checkpoint.commit(gen, sources=sources, summaries=merge_summaries(base_summaries, summaries),
                      fingerprint=fingerprint, digest=config_digest(cfg), keep=resumed)
    _say(log, f"checkpoint: {len(sources)} shard(s) counted, written in {time.time() - t:.1f}s")


def _say(log: TextIO, msg: str) -> None:
    print(f"[engram-ray] {msg}", file=log, flush=True)


def _check_rows(fed: list[Mapping], actors) -> None:
    """Every fed row seen by every stage of its replica, exactly once."""
    for r, chain in enumerate(actors):
        for s, actor in enumerate(chain):
            seen = ray.get(actor.counters.remote())["rows"]
            if seen != fed[r]["rows"]:
                raise RuntimeError(f"stage {s} of replica {r} saw {seen} rows, fed "
                                   f"{fed[r]['rows']}; nothing was committed")
