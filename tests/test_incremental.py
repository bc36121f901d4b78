"""Incremental Σ across runs and across kills.

- ``store.extend``: a base run's kept Σ plus only the shards it has not counted, re-solved,
  equals one pass over every shard — single-process and on Ray — and every misuse (nothing new,
  no kept Σ, another model, another module selection) fails closed.
- ``store.checkpoint_shards``: after a crash the rerun skips the checkpointed shards, counts
  every row exactly once and equals one uninterrupted pass; another config is refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from engram_ray.cli import main
from engram_ray.config import ConfigError, ExtractConfig
from engram_ray.local import extract_from_config
from engram_ray.models.tiny import save_tiny_llama
from engram_ray.runs import open_run


@pytest.fixture()
def shards(tmp_path):
    """Four shards: "ada" in the old ones only, "cy" in the new ones only, "bo" in all."""
    rng = np.random.default_rng(7)
    words = "the author wrote a book about the sea river town award born quick".split()
    root = tmp_path / "data"
    root.mkdir()
    who = {0: ["ada", "bo"], 1: ["ada", "bo"], 2: ["bo", "cy"], 3: ["cy", "bo"]}
    for shard, names in who.items():
        rows = [{"concept": names[i % 2] if i % 3 else None,
                 "question": f"who {' '.join(rng.choice(words, 5))}?",
                 "answer": " ".join(rng.choice(words, 4))} for i in range(9)]
        pq.write_table(pa.Table.from_pylist(rows), root / f"part-{shard}.parquet")
    return root


def config(model_dir, paths, runs, run_id, **store):
    return ExtractConfig.from_dict({
        "model": {"path": model_dir},
        "data": {"paths": [str(p) for p in paths], "prompt_column": "question",
                 "answer_column": "answer", "max_length": 64, "batch_size": 4},
        "parallel": {"stages": 2, "replicas": 2, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                     "solver_num_cpus": 0.25, "max_in_flight": 2},
        "store": {"uri": str(runs), "run_id": run_id, **store},
    })


def assert_same_engrams(a, b, tol=1e-5):
    assert a.concepts == b.concepts and a.modules == b.modules
    errs = []
    for c in a.concepts:
        for m in a.modules:
            x, y = a.engram(c, m).double(), b.engram(c, m).double()
            errs.append(float(torch.linalg.norm(x - y) / torch.linalg.norm(y).clamp_min(1e-30)))
            assert a.record(c, m)["n"] == b.record(c, m)["n"]
            assert a.record(c, m)["N"] == b.record(c, m)["N"]
    assert float(np.median(errs)) <= tol, float(np.median(errs))


def test_extend_equals_one_pass_and_refuses_misuse(tmp_path, shards, tiny_llama_dir, capsys):
    runs = tmp_path / "runs"
    old = [shards / "part-0.parquet", shards / "part-1.parquet"]
    base = extract_from_config(config(tiny_llama_dir, old, runs, "base", keep_statistics=True))
    assert base.concepts == ["ada", "bo"]
    # The whole directory: the two shards the base counted are skipped, not read again.
    ext = extract_from_config(config(tiny_llama_dir, [shards], runs, "ext", extend=base.uri))
    one = extract_from_config(config(tiny_llama_dir, [shards], runs, "one"))
    assert ext.concepts == ["ada", "bo", "cy"]
    assert_same_engrams(ext, one)
    assert ext.info["extends"] == base.uri
    assert ext.info["config"]["data"]["paths"] == [str(shards / "part-2.parquet"),
                                                   str(shards / "part-3.parquet")]
    # The same through the command line: ``extract --extend RUN`` (here the single-process path).
    cfg_path = tmp_path / "extract.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tiny_llama_dir, [shards], runs, "cli").to_dict()))
    assert main(["extract", str(cfg_path), "--local", "--extend", base.uri]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(runs / "cli")
    assert_same_engrams(open_run(str(runs / "cli")), one)
    assert main(["show", ext.uri]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == ext.uri
    assert f"extends   {base.uri}" in err
    forms = ext.manifest.column("form").to_pylist()
    assert f"engrams   {forms.count('dense')} dense, {forms.count('factored')} low-rank" in err
    kept = ext.statistics()  # the extended run keeps its Σ, so it can be extended again
    group = kept.modules["lm_head"].group
    assert kept.groups[group].sources == {str(shards / f"part-{i}.parquet") for i in range(4)}

    with pytest.raises(ValueError, match="nothing to add"):
        extract_from_config(config(tiny_llama_dir, [shards], runs, "again", extend=ext.uri))
    with pytest.raises(FileNotFoundError, match="keep_statistics"):
        extract_from_config(config(tiny_llama_dir, [shards], runs, "nokept", extend=one.uri))
    other = save_tiny_llama(str(tmp_path / "other-model"), seed=123)
    with pytest.raises(ValueError, match="weights differ"):
        extract_from_config(config(other, [shards], runs, "other", extend=base.uri))
    cfg = config(tiny_llama_dir, [shards], runs, "subset", extend=base.uri)
    cfg.select.target_modules = ["down_proj"]
    with pytest.raises(ValueError, match="modules differ"):
        extract_from_config(cfg)
    committed = sorted(d for d in os.listdir(runs) if os.path.exists(runs / d / "_COMMITTED"))
    assert committed == ["base", "cli", "ext", "one"]  # the refused extensions left nothing behind


@pytest.mark.ray
def test_distributed_extend_equals_single_process_one_pass(ray_cluster, tmp_path, shards,
                                                            tiny_llama_dir):
    from engram_ray.distributed.runner import run_extract

    runs = tmp_path / "runs"
    old = [shards / "part-0.parquet", shards / "part-1.parquet"]
    base = extract_from_config(config(tiny_llama_dir, old, runs, "base", keep_statistics=True))
    uri = run_extract(config(tiny_llama_dir, [shards], runs, "ext", extend=base.uri))
    one = extract_from_config(config(tiny_llama_dir, [shards], runs, "one"))
    ext = open_run(uri)
    assert_same_engrams(ext, one)
    assert ext.info["extends"] == base.uri and ext.info["data"]["rows"] == 18  # new rows only


@pytest.mark.ray
def test_crash_after_two_checkpoints_then_resume_equals_one_pass(ray_cluster, tmp_path, shards,
                                                                 tiny_llama_dir, monkeypatch):
    import engram_ray.distributed.executor as executor
    import engram_ray.distributed.runner as runner

    runs = tmp_path / "runs"
    cfg = config(tiny_llama_dir, [shards], runs, "r", checkpoint_shards=1)
    state = runs / "_checkpoints" / "r" / "state.json"
    real_feed, calls = executor.feed_slice, []

    def crashing_feed(*args, **kw):  # the driver dies while feeding the third shard
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_feed(*args, **kw)

    monkeypatch.setattr(executor, "feed_slice", crashing_feed)
    with pytest.raises(KeyboardInterrupt):
        runner.run_extract(cfg)
    assert not os.path.exists(runs / "r" / "_COMMITTED")
    saved = json.loads(state.read_text())
    assert saved["sources"] == [str(shards / "part-0.parquet"), str(shards / "part-1.parquet")]
    gens = [d for d in os.listdir(runs / "_checkpoints" / "r") if d.startswith("gen-")]
    assert gens == [saved["generation"]]  # the superseded generation was dropped

    # Another config cannot resume this checkpoint, and commits nothing.
    other = config(tiny_llama_dir, [shards], runs, "r", checkpoint_shards=1)
    other.select.target_modules = ["down_proj"]
    monkeypatch.setattr(executor, "feed_slice", real_feed)
    with pytest.raises(ValueError, match="different config"):
        runner.run_extract(other)

    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        uri = runner.run_extract(cfg, log=f)
    assert "resuming from checkpoint" in log.read_text()
    run = open_run(uri)
    one = extract_from_config(config(tiny_llama_dir, [shards], runs, "one"))
    assert_same_engrams(run, one)
    assert run.info["data"]["rows"] == 18  # only the two shards left were read again
    assert run.info["resumed"]["shards"] == 2
    assert not os.path.exists(runs / "_checkpoints" / "r")  # committed: checkpoint removed


def test_checkpoint_config_is_validated(tmp_path, shards, tiny_llama_dir):
    with pytest.raises(ConfigError, match="run_id"):
        config(tiny_llama_dir, [shards], tmp_path, None, checkpoint_shards=2)
    with pytest.raises(ConfigError, match="≥ 1"):
        config(tiny_llama_dir, [shards], tmp_path, "r", checkpoint_shards=0)
    with pytest.raises(ConfigError, match="cannot be combined"):
        config(tiny_llama_dir, [shards], tmp_path, "r", checkpoint_shards=1, extend="x")
    with pytest.raises(ValueError, match="--local"):
        extract_from_config(config(tiny_llama_dir, [shards], tmp_path, "r", checkpoint_shards=1))
    assert isinstance(config(tiny_llama_dir, [shards], tmp_path, "r", checkpoint_shards=1),
                      ExtractConfig)
