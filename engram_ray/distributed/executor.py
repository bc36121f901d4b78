"""The Ray executor: Σ accumulated in stage actors, reduced between them, solved in tasks.

::

    Ray Data (read + tokenize) ─ streaming_split(R) ─▶ stage 0 ─▶ … ─▶ stage S−1   (replica r)
                                                     (R × S StageActors, Σ inside each)
    per (stage, input group): tree reduction between the R actors (⌈log₂R⌉ rounds, in place)
    per input group, largest D first: solve_task → payload/<module>.parquet, each group's
    solve starting as soon as that group is reduced (a window of solver slots in flight)

:mod:`engram_ray.extraction` drives it exactly as it drives the single-process executor; this
module only decides where Σ lives and how it moves. Every fed row is checked to have been read
once and seen once by every stage, or the run fails before anything is committed.

Start-up runs side by side: the stage actors load their slices while the driver builds the
dataset, a worker loads the tokenizer (the pad id, and the first encode worker) and solver
workers start. ``run.json`` records what each phase cost (:meth:`RayExecutor.metadata`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import TextIO

import ray

from engram_ray.config import ExtractConfig
from engram_ray.core.moments import merge_summaries
from engram_ray.distributed.cluster import (
    actor_threads,
    cluster_cores,
    cpus_needed,
    ensure_ray,
    ingest_concurrency,
    solver_slots,
)
from engram_ray.distributed.feed import DEFAULT_BATCH_TOKENS
from engram_ray.distributed.ingest import (
    count_rows,
    encoded_dataset,
    tokenizer_pad_id,
    validate_files,
)
from engram_ray.distributed.placement import (
    Placement,
    autoscaler_view,
    reserve,
    solver_bundles,
)
from engram_ray.distributed.reduce import tree_depth, tree_plan
from engram_ray.distributed.resources import check_schedulable, reserved
from engram_ray.distributed.solver import checkpoint_task, solve_task, task_threads, warm_solver
from engram_ray.distributed.stage_actor import StageActor
from engram_ray.distributed.store_location import check_store_location
from engram_ray.distributed.watchdog import Watchdog, pending_work
from engram_ray.extraction import GroupCheckpoint, GroupSolve, Layout, Plan, say
from engram_ray.io.data import check_concepts
from engram_ray.io.sigma_checkpoint import slices
from engram_ray.progress import Progress
from engram_ray.runinfo import combine_fingerprints

__all__ = ["RayExecutor", "feed_slice"]


class RayExecutor:
    """R replicas × S stage actors for ``cfg.parallel``; Σ stays in the actors until solved."""

    def __init__(self, cfg: ExtractConfig, log: TextIO | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.actors: list[list] = []
        self.fed = [{"rows": 0, "tokens": 0} for _ in range(cfg.parallel.replicas)]
        self.nodes: list[str] = []
        self.threads: list[int] = []
        self.nice: list[int] = []
        self.warm: list = []  # solver warm-up tasks, started once rows flow
        self.rounds = 0
        self.startup: dict[str, float] = {}
        self.reduce: dict[str, float] = {}
        self.plan: Plan | None = None
        self.launched: tuple | None = None  # (paths, consume refs) of a slice already started
        self.groups: dict[str, int] = {}  # input group → the stage that owns it
        self.placement = Placement(None, 0)  # the stage actors' placement group
        self.feed: list[dict] = []  # per replica: what its stage 0 measured while feeding

    def start(self, plan: Plan) -> None:
        self.t0 = t0 = time.time()
        self.plan = plan  # its inputs: each file's Storage, as prepare resolved it
        files = plan.inputs_of(list(plan.inputs)) or None  # every file of the run
        paths, _ = validate_files(plan.data, files)
        check_concepts(plan.data, files or paths)
        p = self.cfg.parallel
        ensure_ray(p.address, cpus_needed(p), connect_timeout_s=p.connect_timeout_s)
        self.startup["ray_init_s"] = time.time() - t0
        self.placement = _reserve_actors(self.cfg, plan, self.log)
        self.startup["placed_s"] = time.time() - t0
        self.cores = cluster_cores()
        self.actors = _start_actors(self.cfg, task_threads(p.num_cpus), self.placement)
        self.pad_id, self.tok_dir = _pad_id(self.cfg)
        first = slices(plan.sources, plan.store.checkpoint_shards)
        if first:
            data = plan.restrict(first[0])
            self.launched = (tuple(data.paths), _launch(self, data))
        infos = ray.get([a.node_info.remote() for chain in self.actors for a in chain])
        self.nodes = [i["node"] for i in infos]
        self.threads = actor_threads(p.num_cpus, self.nodes, {i["node"]: i["cores"]
                                                               for i in infos})
        flat = [a for chain in self.actors for a in chain]
        ray.get([a.configure.remote(t) for a, t in zip(flat, self.threads)])
        self.startup["actors_ready_s"] = max(i["ready_at"] for i in infos) - t0
        self.startup["stage_load_s"] = max(i["load_s"] for i in infos)
        self.nice = sorted({i["nice"] for i in infos})
        say(self.log, f"{len(self.nodes)} stage actors ready on {len(set(self.nodes))} node(s) "
                      f"({p.replicas} replica(s) × {p.stages} stage(s), torch threads "
                      f"{sorted(set(self.threads))}) after {time.time() - t0:.1f}s")

    def warm_solvers(self) -> None:
        """Start the solver worker processes (imports, threads) once rows flow: off the path
        to the first row, which the actors, the tokenizer and Ray Data share the cores for."""
        if not self.warm:
            p = self.cfg.parallel
            self.warm = [warm_solver.options(num_cpus=p.solver_num_cpus).remote(
                task_threads(p.solver_num_cpus)) for _ in range(self._slots())]

    def _slots(self) -> int:
        p = self.cfg.parallel
        return solver_slots(p, self.cores, ray.cluster_resources().get("GPU", 0.0))

    def accumulate(self, plan: Plan, files: list[str]) -> None:
        feed_slice(self, plan.restrict(files))

    def active(self) -> list[list]:
        """The replica chains that saw rows (a replica whose split was empty knows no groups)."""
        return [chain for chain, f in zip(self.actors, self.fed) if f["rows"] > 0]

    def layout(self) -> Layout | None:
        active = self.active()
        if not active:
            return None
        first = active[0]
        infos, dims, prints = (ray.get([getattr(a, m).remote() for a in first])
                               for m in ("module_infos", "group_dims", "fingerprint"))
        summaries = merge_summaries(*ray.get([a.summaries.remote() for c in active for a in c]))
        modules, parts = {}, {}
        for s, (i, d, f) in enumerate(zip(infos, dims, prints)):
            modules.update(i)
            parts.update(f)
            self.groups.update({g: s for g in d})
        return Layout(modules=modules, dims={g: d for dd in dims for g, d in dd.items()},
                      summaries=summaries, fingerprint=combine_fingerprints(parts))

    def _reduced(self, index: int, group: str, final: bool) -> tuple[object, object]:
        """Submit the tree reduction of ``group`` between the replicas' actors of its stage;
        returns (the reduced partial's ref, the actor holding it). The root rotates with
        ``index`` so every replica's actor takes a share of the reductions."""
        active = self.active()
        stage = self.groups[group]
        root = index % len(active)
        for rnd in tree_plan(len(active), root):
            for recv, send in rnd:
                part = active[send][stage].export.remote(group, final)
                active[recv][stage].absorb.remote(group, part, final)
        self.rounds = tree_depth(len(active))
        actor = active[root][stage]
        return actor.export.remote(group, final), actor

    def _solver_placement(self) -> Placement:
        """The solver slots' placement group: as many bundles as the cores allow and are free
        now (the stream's tasks are done), at least one (``placement.py``)."""
        p = self.cfg.parallel
        bundle = reserved(p).solver_bundle()
        n = solver_bundles(self._slots(), bundle) if bundle else 0
        return reserve([bundle] * n, "SPREAD", f"{n} solver slot(s)", p.schedule_timeout_s,
                       self.log)

    def snapshot(self, step: GroupCheckpoint, layout: Layout) -> None:
        opts = {"num_cpus": self.cfg.parallel.solver_num_cpus}
        slots = self._solver_placement()
        try:
            ray.get([checkpoint_task.options(**opts, **slots.strategy(i)).remote(
                step, g, self._reduced(i, g, False)[0])
                for i, g in enumerate(layout.solve_order())])
        finally:
            slots.release()

    def solve(self, step: GroupSolve, layout: Layout) -> list[dict]:
        p, t0 = self.cfg.parallel, time.time()
        self.warm_solvers()  # a stream too short for the progress loop to have started them
        opts = {"num_cpus": p.solver_num_cpus, "num_gpus": p.solver_num_gpus}
        threads, placed = task_threads(p.solver_num_cpus), self._solver_placement()
        slots = placed.bundles or self._slots()
        say(self.log, f"Σ from {sum(f['tokens'] for f in self.fed):,} tokens; solving "
                      f"{len(layout.dims)} input group(s), {slots} at a time, reduce depth "
                      f"{tree_depth(len(self.active()))}")
        window: deque = deque()
        done: dict[int, list[dict]] = {}
        try:
            for i, g in enumerate(layout.solve_order()):
                sigma, actor = self._reduced(i, g, True)
                window.append((i, solve_task.options(**opts, **placed.strategy(i)).remote(
                    step, sigma, layout.members(g), actor.group_weights.remote(g), threads)))
                if len(window) > slots:  # one group reduced ahead of the solvers, no more
                    j, ref = window.popleft()
                    done[j] = ray.get(ref)
            for j, ref in window:
                done[j] = ray.get(ref)
        finally:
            placed.release()
        self._account_reduce(time.time() - t0)
        return [row for j in sorted(done) for row in done[j]]

    def _account_reduce(self, solve_s: float) -> None:
        """What the reduction cost, from the actors' own counters (``run.json`` ``reduce``)."""
        counters = ray.get([a.counters.remote() for c in self.active() for a in c])
        actor_s = [c["reduce_s"] for c in counters]
        self.reduce = {"solve_phase_s": solve_s, "actor_s": sum(actor_s),
                       "bytes_moved": sum(c["reduce_bytes"] for c in counters),
                       "share_of_solve": max(actor_s, default=0.0) / max(solve_s, 1e-9)}

    def metadata(self) -> dict:
        p = self.cfg.parallel
        return {
            "mode": "distributed",
            "model": {"spec": self.cfg.model.to_dict()},
            "parallel": {"stages": p.stages, "replicas": p.replicas,
                         "replicas_with_rows": len(self.active()), "reduce_rounds": self.rounds,
                         "nodes": sorted(set(self.nodes)),
                         "tree_depth": tree_depth(len(self.active())),
                         "torch_threads": {"stage_actors": self.threads,
                                           "solver_tasks": task_threads(p.solver_num_cpus)},
                         "stage_actor_niceness": self.nice,
                         "batch_tokens": _batch_tokens(self.cfg)},
            "data": {"rows": sum(f["rows"] for f in self.fed),
                     "tokens": sum(f["tokens"] for f in self.fed)},
            "startup": dict(self.startup),
            "feed": _feed_summary(self.feed, self.t0) if self.feed else {},
            "reduce": dict(self.reduce),
        }

    def close(self) -> None:
        for chain in self.actors:
            for actor in chain:
                ray.kill(actor)
        self.placement.release()


def _feed_summary(feed: list[dict], t0: float) -> dict:
    """The last slice's stream as stage 0 saw it: micro-batches, seconds from the first row
    computed to the last, seconds the stage waited for rows after the first block arrived, and
    when (from the executor's start) pulling started and the first block arrived."""
    got = [f for f in feed if f["first_row_at"] is not None]
    if not got:
        return {"batches": 0}
    return {"batches": sum(f["batches"] for f in feed),
            "stream_s": max(f["done_at"] for f in got) - min(f["first_row_at"] for f in got),
            "wait_after_first_row_s": sum(f["wait_s"] - (f["first_block_at"] - f["started_at"])
                                          for f in got),
            "started_s": min(f["started_at"] for f in got) - t0,
            "first_block_s": min(f["first_block_at"] for f in got) - t0}


def _batch_tokens(cfg: ExtractConfig) -> int:
    """Padded tokens per micro-batch: ``data.batch_tokens`` when the config has that key."""
    return getattr(cfg.data, "batch_tokens", None) or DEFAULT_BATCH_TOKENS


def _pad_id(cfg: ExtractConfig):
    """(the pad id or its ref, the model's local directory with its tokenizer files): the
    tokenizer is loaded in an encode worker, never in the driver or a stage actor."""
    if cfg.data.features_column is not None:
        return 0, None
    from engram_ray.models.loading import model_dir

    if cfg.model.path is None:
        raise ValueError("text data needs an HF model directory with a tokenizer (model.path)")
    storage = cfg.model_storage_options
    local = model_dir(cfg.model.path, storage, weights=False)
    return tokenizer_pad_id.options(num_cpus=cfg.parallel.encode_num_cpus).remote(local), local


def _reserve_actors(cfg: ExtractConfig, plan: Plan, log: TextIO | None) -> Placement:
    """Check that the stage actors, the stream and a solver can ever be scheduled on the
    cluster's nodes and the node types its autoscaler may add (``resources.py``), then reserve
    the actors as one placement group, waiting for the autoscaler (``placement.py``)."""
    p = cfg.parallel
    alive = [n for n in ray.nodes() if n.get("Alive")]
    types, grows = autoscaler_view(p)
    r = check_schedulable(p, [n["Resources"] for n in alive], max_extra_cpus=p.autoscale_max_cpus,
                          node_types=types, may_grow=grows)
    if grows:
        say(log, "an autoscaler runs but its node types are unknown (Ray does not publish "
                 "them): name them in parallel.autoscale_node_types to refuse a request no node "
                 "could hold at once instead of after parallel.schedule_timeout_s")
    check_store_location(plan.store, len({n.get("NodeManagerAddress") for n in alive}),
                         may_grow=p.autoscale_max_cpus > 0 or bool(types) or grows)
    strategy = "SPREAD" if p.placement == "spread" else "PACK"
    return reserve([r.actor_bundle()] * r.actors, strategy, f"{r.actors} stage actor(s)",
                   p.schedule_timeout_s, log)


def _start_actors(cfg: ExtractConfig, threads: int, placed: Placement) -> list[list]:
    """The stage actors, by replica then stage, each in its bundle of ``placed`` (or, with
    nothing to reserve, spread by Ray's own ``SPREAD`` as ``parallel.placement`` says)."""
    p = cfg.parallel
    opts = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus}
    if p.placement == "spread":
        opts["scheduling_strategy"] = "SPREAD"
    storage = cfg.model_storage_options
    return [[StageActor.options(**{**opts, **placed.strategy(r * p.stages + s)}).remote(
                cfg.model, s, p.stages, r, cfg.select, dtype=p.dtype, storage_options=storage,
                threads=threads, device=p.device)
             for s in range(p.stages)]
            for r in range(p.replicas)]


def _launch(ex: RayExecutor, data) -> list:
    """Start streaming ``data`` into the replicas: each stage 0 pulls its split. Returns the
    ``consume`` refs (each: what its replica was fed)."""
    p = ex.cfg.parallel
    # drop_empty=False: rows without a counted token still flow (adding nothing to Σ), so the
    # fed row count can be checked against the files' row count exactly.
    ds = encoded_dataset(data, ex.tok_dir, drop_empty=False, num_cpus=p.encode_num_cpus,
                         concurrency=ingest_concurrency(p, ex.cores, len(data.paths)),
                         read_num_cpus=p.encode_num_cpus, files=_files(ex, data))
    splits = ds.streaming_split(len(ex.actors), equal=False)
    prefetch = max(2, p.max_in_flight)
    # The pad id's ref goes inside a list: a bare ref argument would hold the call until the
    # tokenizer task ends (seconds of transformers imports), and with it the executor's start.
    pad = ex.pad_id if isinstance(ex.pad_id, int) else [ex.pad_id]
    return [chain[0].consume.remote(splits[r], chain[1:], pad, _batch_tokens(ex.cfg),
                                    p.max_in_flight, prefetch)
            for r, chain in enumerate(ex.actors)]


def _files(ex: RayExecutor, data) -> list | None:
    """``data``'s files (a slice of the plan's) as the plan's Storages (None: none known)."""
    return ex.plan.inputs_of(data.paths) if ex.plan is not None and ex.plan.inputs else None


def feed_slice(ex: RayExecutor, data) -> None:
    """Stream ``data``'s shards through the replicas, adding what each got to ``ex.fed``.
    Checks every row was read once and seen once by every stage."""
    expected = count_rows(data, files=_files(ex, data))
    if ex.launched is not None and ex.launched[0] == tuple(data.paths):
        refs, ex.launched = ex.launched[1], None
    else:
        refs = _launch(ex, data)
    progress = _Progress(ex, expected + sum(f["rows"] for f in ex.fed))
    dog = Watchdog(ex.cfg.parallel.stall_timeout_s, f"feeding {len(data.paths)} shard(s) "
                   f"({sum(f['rows'] for f in ex.fed):,} rows counted before them)")
    while ray.wait(refs, num_returns=len(refs), timeout=1.0)[1]:
        progress.maybe_print()
        if progress.rows:
            ex.warm_solvers()
        dog.observe(progress.rows)
        dog.check(pending_work)
    now = ray.get(refs)
    progress.maybe_print(force=True)
    first = [f["first_row_at"] for f in now if f["first_row_at"] is not None]
    if first and "first_row_s" not in ex.startup:
        ex.startup["first_row_s"] = min(first) - ex.t0
    ex.feed = [{k: f[k] for k in ("batches", "wait_s", "first_block_at", "first_row_at",
                                  "started_at", "done_at")} for f in now]
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
    seen = _counters(actors)
    for r, chain in enumerate(seen):
        for s, c in enumerate(chain):
            if c["rows"] != fed[r]["rows"]:
                raise RuntimeError(f"stage {s} of replica {r} saw {c['rows']} rows, fed "
                                   f"{fed[r]['rows']}; nothing was committed")


def _counters(actors: list[list]) -> list[list[dict]]:
    """Every stage actor's counters, by replica then stage (one round trip)."""
    flat = ray.get([a.counters.remote() for chain in actors for a in chain])
    n = len(actors[0]) if actors else 0
    return [flat[r * n:(r + 1) * n] for r in range(len(actors))]


class _Progress:
    """The stream's progress line (:class:`engram_ray.progress.Progress`: rows, rates, ETA)
    with each stage's busy rate, every ``parallel.progress_interval_s``; it also keeps the
    last stages' row count, which the stall watchdog watches."""

    def __init__(self, ex: RayExecutor, expected: int) -> None:
        self.ex = ex
        self.line = Progress(expected, ex.cfg.parallel.progress_interval_s, ex.log)
        self.last_poll = 0.0
        self.rows = 0  # rows the last stages have seen

    def maybe_print(self, force: bool = False) -> None:
        # The counters are polled every 2 s at most (a round trip to every actor, answered by
        # its status thread), whatever the line interval: the watchdog needs fresh row counts
        # even when progress lines are rare or off.
        now = time.time()
        if not force and now - self.last_poll < 2.0:
            return
        self.last_poll = now
        chains = _counters(self.ex.actors)
        self.rows = sum(c[-1]["rows"] for c in chains)
        tokens = sum(c[-1]["tokens"] for c in chains)
        busy = [(sum(c[s]["tokens"] for c in chains), sum(c[s]["busy_s"] for c in chains))
                for s in range(len(chains[0]))]
        stages = " | ".join(f"stage {s}: {tok / max(sec, 1e-9):,.0f} tok/s busy"
                            for s, (tok, sec) in enumerate(busy))
        self.line.update(self.rows, tokens, stages, force=force)
