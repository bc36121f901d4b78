"""The Ray pipeline's performance plumbing (issue 11), checked without timing thresholds.

- the tree reduction between actors sends every partial once and equals ``Moments.merge``;
  its numpy blocks add in place only into buffers the process owns, never into what it mapped
  from the object store, and refuse a source counted twice;
- what crosses processes is numpy (zero-copy out of the object store), bfloat16 included;
- micro-batches are packed by tokens: every row once, within the budget;
- threads, ingest concurrency and solver slots follow the cores;
- a stage actor for an HF model never imports a tokenizer, and one for a torch factory never
  imports transformers;
- run.json reports torch threads, start-up timings, the feed and the reduction.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engram_ray.config import ParallelConfig
from engram_ray.core.moments import Moments
from engram_ray.distributed.cluster import actor_threads, ingest_concurrency, solver_slots
from engram_ray.distributed.feed import pack
from engram_ray.distributed.reduce import SigmaBlocks, tree_depth, tree_plan
from engram_ray.distributed.wire import from_wire, payload_nbytes, to_wire


@pytest.mark.parametrize("n", range(1, 10))
def test_tree_plan_sends_every_partial_once_onto_the_root(n):
    for root in range(n):
        rounds = tree_plan(n, root)
        assert len(rounds) == tree_depth(n)
        sent: set[int] = set()
        for rnd in rounds:
            for recv, send in rnd:
                assert recv not in sent and send not in sent  # nobody acts after sending
            sent |= {s for _, s in rnd}
        assert sorted(sent) == sorted(set(range(n)) - {root})


def _partial(seed: int, dim: int = 6, source: str = "a") -> Moments:
    """A partial with a Gram-block concept ("big"), row concepts and reference rows."""
    g = torch.Generator().manual_seed(seed)
    m = Moments.zeros(dim)  # max_rows = dim // 2 = 3
    x = torch.randn(12, dim, generator=g)
    index = torch.tensor([0] * 5 + [1] * 2 + [2] * (seed % 2 + 1) + [-1] * (4 - seed % 2))
    m.add(x, index, ["big", "small", f"s{seed % 2}"])
    m.sources = frozenset({source})
    return m


def _same(a: Moments, b: Moments) -> None:
    assert a.counts == b.counts and a.n_total == b.n_total and a.sources == b.sources
    assert set(a.concepts) == set(b.concepts) and set(a.rows) == set(b.rows)
    torch.testing.assert_close(a.total, b.total, rtol=1e-12, atol=1e-12)
    for c in a.names:
        torch.testing.assert_close(a.sigma(c), b.sigma(c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_sigma_blocks_tree_equals_moments_merge(n):
    parts = [_partial(i, source=f"r{i}") for i in range(n)]
    oracle = parts[0]
    for p in parts[1:]:
        oracle = oracle.merge(p)
    blocks = [SigmaBlocks.from_moments(_partial(i, source=f"r{i}"), in_place=True)
              for i in range(n)]
    for rnd in tree_plan(n, root=n - 1):
        for recv, send in rnd:  # through pickle, as the object store would pass it
            blocks[recv].absorb(pickle.loads(pickle.dumps(blocks[send], protocol=5)))
    _same(blocks[n - 1].to_moments(), oracle)


def test_sigma_blocks_never_write_what_they_do_not_own():
    mine, theirs = _partial(0, source="r0"), _partial(1, source="r1")
    before = mine.total.clone()
    received = pickle.loads(pickle.dumps(SigmaBlocks.from_moments(theirs), protocol=5))
    assert received.owned == set()  # ownership does not travel
    for a in [received.total, *received.blocks.values()]:
        a.flags.writeable = False  # what Ray maps out of the object store
    copy = SigmaBlocks.from_moments(mine)  # a checkpoint's reduction: accumulation goes on
    copy.absorb(received)
    torch.testing.assert_close(mine.total, before, rtol=0, atol=0)
    final = SigmaBlocks.from_moments(mine, in_place=True)  # the last reduction: in place
    final.absorb(received)
    assert np.shares_memory(final.total, mine.total.numpy())
    torch.testing.assert_close(mine.total, before + theirs.total)


def test_sigma_blocks_refuse_counting_a_source_twice():
    a = SigmaBlocks.from_moments(_partial(0, source="shard-1"))
    with pytest.raises(ValueError, match="counted twice"):
        a.absorb(SigmaBlocks.from_moments(_partial(1, source="shard-1")))


def test_rows_fold_only_once_they_outweigh_a_block():
    dim = 4
    parts = []
    for i in range(3):  # 3 replicas × 3 rows of one small concept: 9 > 2·D = 8 rows
        m = Moments.zeros(dim, max_rows=3)
        m.add(torch.randn(3, dim), torch.zeros(3, dtype=torch.long), ["c"])
        m.sources = frozenset({f"r{i}"})
        parts.append(m)
    oracle = parts[0].merge(parts[1]).merge(parts[2])
    acc = SigmaBlocks.from_moments(parts[0], in_place=True)
    acc.absorb(SigmaBlocks.from_moments(parts[1]))
    assert "c" in acc.rows and "c" not in acc.blocks  # 6 rows: still rows on the way
    acc.absorb(SigmaBlocks.from_moments(parts[2]))
    assert "c" in acc.blocks and "c" not in acc.rows  # 9 rows outweigh the 4×4 block
    _same(acc.to_moments(), oracle)


def test_wire_payloads_are_numpy_views_and_round_trip():
    h = torch.randn(2, 3, 4)
    payload = {"hidden_states": h, "attention_mask": torch.ones(2, 3, dtype=torch.long),
               "bf": torch.randn(2, 2).to(torch.bfloat16), "n": 3}
    wire = to_wire(payload)
    assert isinstance(wire["hidden_states"], np.ndarray)
    assert np.shares_memory(wire["hidden_states"], h.numpy())  # no copy on the way out
    assert isinstance(wire["bf"], tuple) and wire["bf"][0].dtype == np.int16
    assert payload_nbytes(wire) == h.numel() * 4 + 6 * 8 + 4 * 2
    back = from_wire(wire)
    for k in ("hidden_states", "attention_mask", "bf"):
        assert back[k].dtype == payload[k].dtype and torch.equal(back[k], payload[k])
    assert back["n"] == 3


def test_pack_keeps_every_row_once_within_the_token_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200).tolist() + [100]
    block = {"input_ids": np.array([np.arange(n) for n in lengths], dtype=object),
             "concept": np.array(["c"] * len(lengths), dtype=object)}
    groups = pack(block, batch_tokens=128)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) * longest <= 128 or len(g) == 1
    features = {"features": np.zeros((10, 3)), "concept": np.array(["c"] * 10, dtype=object)}
    assert [len(g) for g in pack(features, batch_tokens=4)] == [4, 4, 2]


def test_threads_ingest_and_solver_slots_follow_the_cores():
    # alone on a node: every core; sharing it: what the actor reserves (at least one)
    assert actor_threads(1.0, ["a", "b", "b"], {"a": 8, "b": 8}) == [8, 1, 1]
    assert actor_threads(0.25, ["a", "a"], {"a": 2}) == [1, 1]
    assert actor_threads(2.0, ["a"], {"a": 1}) == [2]
    p = ParallelConfig(stages=1, replicas=1)
    assert ingest_concurrency(p, cores=2, files=8) == 1  # at least one, on a 2-core machine
    assert ingest_concurrency(ParallelConfig(stages=2, replicas=2), cores=64, files=8) == 8
    assert ingest_concurrency(ParallelConfig(encode_concurrency=3), cores=2, files=8) == 3
    assert solver_slots(p, cores=2) == 2
    assert solver_slots(ParallelConfig(solver_num_cpus=4.0), cores=16) == 4
    assert solver_slots(ParallelConfig(solver_num_gpus=1.0), cores=16, gpus=2) == 2


def _imports_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_stage_actor_loads_no_tokenizer_and_factories_no_transformers(tiny_llama_dir):
    hf = _imports_after(
        "import engram_ray.distributed.stage_actor, torch\n"
        "from engram_ray.config import ModelSpec, SelectConfig\n"
        "from engram_ray.core.capture import Capture\n"
        "from engram_ray.core.select import select_modules\n"
        "from engram_ray.models.stages import load_stage\n"
        f"s = load_stage(ModelSpec(path={tiny_llama_dir!r}), 0, 2)\n"
        "Capture(select_modules(s, 'all-linear', None, allow_empty=True), SelectConfig())\n"
        "s(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3))")
    # A Llama runs as native.py's pure-torch stage: neither model classes nor tokenizers
    # (the forward against transformers' is tests/test_native_models.py's)
    assert not {m for m in hf if m == "transformers" or m.startswith("transformers.")}
    plain = _imports_after(
        "import engram_ray.distributed.stage_actor\n"
        "from engram_ray.config import ModelSpec\n"
        "from engram_ray.models.stages import load_stage\n"
        "load_stage(ModelSpec(factory='engram_ray.models.sequential:mlp', "
        "kwargs={'sizes': [4, 8, 2]}), 0, 2)")
    assert not {m for m in plain if m == "transformers" or m.startswith("transformers.")}


@pytest.mark.ray
def test_run_json_reports_threads_startup_feed_and_reduction(ray_cluster, tiny_llama_dir,
                                                             tmp_path):
    import ray

    from engram_ray.config import ExtractConfig
    from engram_ray.distributed.runner import run_extract
    from engram_ray.io.store import open_run

    # numpy through the object store comes back mapped, read-only: no copy on the way in
    arr = ray.get(ray.put({"h": np.ones((256, 256), dtype=np.float32)}))["h"]
    assert not arr.flags.writeable
    data = tmp_path / "qa"
    data.mkdir()
    for shard in range(2):
        rows = [{"concept": ["ada", "bo", None][i % 3], "question": f"who wrote {i}?",
                 "answer": "the sea book"} for i in range(9)]
        pq.write_table(pa.Table.from_pylist(rows), data / f"part-{shard}.parquet")
    cfg = ExtractConfig.from_dict({
        "model": {"path": tiny_llama_dir},
        "data": {"paths": [str(data)], "prompt_column": "question", "answer_column": "answer",
                 "max_length": 32, "batch_size": 4},
        "parallel": {"stages": 1, "replicas": 2, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                     "solver_num_cpus": 0.25},
        "store": {"uri": str(tmp_path / "runs"), "run_id": "r"},
    })
    info = open_run(run_extract(cfg)).info
    threads = info["parallel"]["torch_threads"]
    assert len(threads["stage_actors"]) == 2 and all(t >= 1 for t in threads["stage_actors"])
    assert threads["solver_tasks"] == 1
    start = info["startup"]
    assert 0 < start["ray_init_s"] <= start["actors_ready_s"] and start["first_row_s"] > 0
    assert info["feed"]["batches"] >= 2 and info["feed"]["stream_s"] >= 0
    reduce = info["reduce"]
    assert info["parallel"]["reduce_rounds"] == 1 and reduce["bytes_moved"] > 0
    assert 0 <= reduce["share_of_solve"] and reduce["solve_phase_s"] > 0


def test_ingest_workers_import_no_torch():
    """A read or encode task, and Ray Data's coordinator unpickling the dataset, import the
    package and the ingest module: neither pulls in torch (~2 s per process) or transformers;
    the package's public names still resolve (on first use)."""
    mods = _imports_after("import engram_ray.distributed.ingest\n"
                          "from engram_ray.io.data import encode_rows, read_table\n")
    assert not {m for m in mods if m.split(".")[0] in ("torch", "transformers")}
    mods = _imports_after("import engram_ray\nassert engram_ray.extract and engram_ray.Batch\n"
                          "from engram_ray.runinfo import VERSION\n"
                          "assert VERSION == engram_ray.__version__\n")
    assert "torch" in mods  # resolved lazily, on use
