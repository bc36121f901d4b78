"""Bytes the Ray pipeline moves, measured in the object stores of 1, 2 and 4 simulated nodes.

    .venv/bin/python benchmarks/scaling_bytes.py [--dim 512] [--batch 512] [--batches 8]

``docs/scaling.md`` models the pipeline's traffic from the code's own accounting: a hidden
state hop moves ``B·T·H·4`` bytes (float32 numpy) from stage s to stage s+1, and reducing one
input group over R replicas moves each non-root partial once (``(R−1)·S`` bytes in all,
``⌈log₂R⌉·S`` on the longest path; S = ``(1 + dense concepts)·D²·8 + rows·D·4``). This script
checks those counts against what the object stores actually create, on a
``ray.cluster_utils.Cluster`` of N nodes on this machine (each node its own raylet and object
store; a copy pulled from another node is created again in the puller's store):

- **hop**: stage 0 and stage 1 of an MLP (real :class:`StageActor` s, pinned to the first and
  the last node) fed ``--batches`` micro-batches; measured = bytes created in stage 1's store;
- **reduce**: R = max(2, N) replicas of the MLP, one per node, each fed rows of the same 4
  concepts (dense Gram blocks: more than D/2 tokens each), then the executor's own tree
  reduction (``RayExecutor._reduced``, the code the pipeline runs) of every input group;
  measured = bytes created in all stores, split into the partials' own copies (one per
  export, in the exporting actor's store) and the copies pulled across nodes.

Objects under 100 KiB never reach a store (Ray inlines them), so the sizes are chosen above it.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONCEPTS = ["c0", "c1", "c2", "c3"]


def created() -> dict[str, int]:
    """Bytes created so far in each alive node's object store (primaries and pulled copies)."""
    import ray
    from ray._private.internal_api import node_stats

    return {n["NodeID"]: node_stats(n["NodeManagerAddress"], n["NodeManagerPort"],
                                    include_memory_info=False).store_stats.cumulative_created_bytes
            for n in ray.nodes() if n["Alive"]}


def delta(before: dict, after: dict) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def actor(spec, index: int, n_stages: int, replica: int, node: int):
    """A real stage actor pinned to ``node`` (its custom resource)."""
    from engram_ray.config import SelectConfig
    from engram_ray.distributed.stage_actor import StageActor

    return StageActor.options(num_cpus=0.25, resources={f"node{node}": 0.01}).remote(
        spec, index, n_stages, replica, SelectConfig(), threads=1)


def hop(spec, n_nodes: int, dim: int, batch: int, batches: int) -> dict:
    """Stage 0 → stage 1 on the first and last node: predicted vs measured bytes."""
    import ray

    from engram_ray.distributed.wire import to_wire

    a, b = actor(spec, 0, 2, 0, 0), actor(spec, 1, 2, 0, n_nodes - 1)
    nodes = ray.get([a.node_info.remote(), b.node_info.remote()])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((batch, dim), dtype=np.float32) for _ in range(batches)]
    concepts = [CONCEPTS[i % 4] for i in range(batch)]
    ray.get(a.selected.remote())
    before = created()
    outs = [a.forward.remote(to_wire({"x": x}), concepts, None) for x in xs]
    ray.get([b.forward.remote(o, concepts, None) for o in outs])
    got = delta(before, created())
    hidden = batches * batch * dim * 4  # stage 0's output: (B, H) float32, H = dim here
    remote = nodes[0]["node"] != nodes[1]["node"]
    wire = ray.get(b.counters.remote())["wire_bytes"]
    for x in (a, b):
        ray.kill(x)
    return {"predicted": hidden if remote else 0, "counted_by_stage": wire,
            "measured": got[nodes[1]["node"]] if remote else 0, "remote": remote}


def reduce(spec, n_nodes: int, dim: int, batch: int, batches: int) -> dict:
    """R = max(2, N) replicas, one per node (or all on the one node), tree-reduced."""
    import ray

    from engram_ray.distributed.executor import RayExecutor
    from engram_ray.distributed.reduce import tree_plan
    from engram_ray.distributed.wire import to_wire

    r = max(2, n_nodes)
    actors = [actor(spec, 0, 1, i, i % n_nodes) for i in range(r)]
    nodes = [i["node"] for i in ray.get([x.node_info.remote() for x in actors])]
    rng = np.random.default_rng(1)
    concepts = [CONCEPTS[i % 4] for i in range(batch)]
    ray.get([x.forward.remote(to_wire({"x": rng.standard_normal((batch, dim), np.float32)}),
                              concepts, None) for x in actors for _ in range(batches)])
    dims = ray.get(actors[0].group_dims.remote())
    ex = RayExecutor.__new__(RayExecutor)  # the executor's reduction, without a whole run
    ex.actors, ex.fed, ex.groups = [[x] for x in actors], [{"rows": 1}] * r, {g: 0 for g in dims}
    before = created()
    roots = [ex._reduced(i, g, True)[0] for i, g in enumerate(sorted(dims))]
    ray.wait(roots, num_returns=len(roots), fetch_local=False)
    got = sum(delta(before, created()).values())
    sizes = {g: (1 + len(CONCEPTS)) * d * d * 8 for g, d in dims.items()}
    cross = {g: sum(nodes[a] != nodes[b] for a, b in (p for rnd in tree_plan(r, i % r)
                                                        for p in rnd))
             for i, g in enumerate(sorted(dims))}
    for x in actors:
        ray.kill(x)
    return {"replicas": r, "sigma_bytes": sum(sizes.values()),
            "predicted_copies": r * sum(sizes.values()),
            "predicted_pulled": sum(cross[g] * sizes[g] for g in dims),
            "measured": got, "path": sum(sizes.values()) * (r - 1).bit_length()}


def run(n_nodes: int, args) -> dict:
    """One cluster of ``n_nodes`` nodes: the hop and the reduction."""
    import ray
    from ray.cluster_utils import Cluster

    from engram_ray.config import ModelSpec

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node0": 1}, "object_store_memory": 400 << 20})
    for i in range(1, n_nodes):
        cluster.add_node(num_cpus=2, resources={f"node{i}": 1}, object_store_memory=400 << 20)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        spec = ModelSpec(factory="engram_ray.models.sequential:mlp",
                         kwargs={"sizes": [args.dim] * 4 + [8], "seed": 0})
        return {"hop": hop(spec, n_nodes, args.dim, args.batch, args.batches),
                "reduce": reduce(spec, n_nodes, args.dim, args.batch, args.batches)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(results: dict, args) -> str:
    lines = [f"Stage hop: {args.batches} micro-batches of {args.batch} rows × H = {args.dim} "
             "(float32), stage 1 on another node than stage 0 when N ≥ 2.", "",
             "| nodes | hop predicted MiB | hop measured MiB (stage 1's store) | "
             "replicas | Σ per replica MiB | reduce predicted MiB (copies + pulled) | "
             "reduce measured MiB | measured / predicted | longest path MiB (⌈log₂R⌉·S) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        h, d = r["hop"], r["reduce"]
        pred = d["predicted_copies"] + d["predicted_pulled"]
        lines.append(f"| {n} | {mib(h['predicted'])} | {mib(h['measured'])} | {d['replicas']} | "
                     f"{mib(d['sigma_bytes'])} | {mib(pred)} ({mib(d['predicted_copies'])} + "
                     f"{mib(d['predicted_pulled'])}) | {mib(d['measured'])} | "
                     f"{d['measured'] / pred:.4f} | {mib(d['path'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--nodes", default="1,2,4")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    results = {int(n): run(int(n), args) for n in args.nodes.split(",")}
    print(table(results, args))


if __name__ == "__main__":
    main()
