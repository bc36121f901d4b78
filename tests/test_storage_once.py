"""One :class:`~engram_ray.io.storage.Storage` per location per operation (issue 21, item 6).

An *operation* is one user-facing call: one ``engram-ray`` subcommand (``extract --local``,
``apply``, ``batch --local``, ``gc``, ``show``, ``list``) run in-process through
:func:`engram_ray.cli.main`. A *location* is one URI as :func:`engram_ray.uris.normalize`
spells it, without a trailing ``/``: a store, a run, an output folder, a data file, a model
folder. A location below another reached with ``Storage.child`` shares its parent's
filesystems and is not a construction (it never calls ``Storage.__init__``).

Why: building a ``Storage`` re-checks and re-resolves the storage options and builds new
fsspec (and pyarrow) filesystems — for S3 a new client, a new credential lookup and new
connections each time. Each operation builds each location's ``Storage`` once at its entry
and passes the object down. On these ``--local`` paths nothing runs in another process, so no
rebuild (a Ray task unpickling its ``Storage``) is excused.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import engram_ray.local
from engram_ray.cli import main
from engram_ray.io.storage import Storage
from engram_ray.uris import normalize


@pytest.fixture()
def built(monkeypatch):
    """A counter of ``Storage.__init__`` calls by location, reset by the test between
    operations."""
    counts: collections.Counter = collections.Counter()
    real = Storage.__init__

    def counting(self, uri, options=None):
        counts[normalize(uri).rstrip("/") or uri] += 1
        real(self, uri, options)

    monkeypatch.setattr(Storage, "__init__", counting)
    return counts


def once(counts, operation):
    """Assert no location was built twice by ``operation``; reset the counter."""
    twice = {uri: n for uri, n in counts.items() if n > 1}
    counts.clear()
    assert not twice, f"{operation}: Storage built more than once for {twice}"


def test_each_operation_builds_each_location_once(tmp_path, tiny_llama_dir, built, capsys):
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 3))} for i in range(9)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "part-0.parquet")
    runs = tmp_path / "runs"
    cfg = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [str(tmp_path / "data")], "concept_column": "author",
                    "prompt_column": "question", "answer_column": "answer",
                    "max_length": 32, "batch_size": 4},
           "store": {"uri": str(runs), "run_id": "base"}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg))

    built.clear()
    assert main(["extract", str(tmp_path / "extract.yaml"), "--local"]) == 0
    run = capsys.readouterr().out.strip().splitlines()[-1]
    assert run == str(runs / "base") and built[run] >= 1
    once(built, "extract --local")

    assert main(["apply", "--run", run, "--forget", "ada", "--out", str(tmp_path / "e")]) == 0
    assert os.path.exists(tmp_path / "e" / "edit.json") and built[run] >= 1
    once(built, "apply")

    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"request_id": "r1", "run": run, "concepts": ["ada"], "out": str(tmp_path / "r1")},
        {"request_id": "r2", "run": run, "concepts": ["bo"], "out": str(tmp_path / "r2")}]))
    assert main(["batch", str(tmp_path / "requests.jsonl"), "--local"]) == 0
    assert os.path.exists(tmp_path / "r2" / "edit.json") and built[run] >= 1
    once(built, "batch --local")

    assert main(["show", run]) == 0
    once(built, "show")
    assert main(["list", str(runs)]) == 0
    once(built, "list")
    assert main(["gc", str(runs), "--keep", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]
    once(built, "gc")


def test_an_extension_and_a_tick_build_each_location_once(tmp_path, tiny_llama_dir, built,
                                                          capsys, monkeypatch):
    """``extract --local --extend`` (the base run's Σ plus new shards) and ``tick --local`` on
    a queue (extend the queue's run with its new shards, then run its request file)."""
    queue = tmp_path / "queue"
    rng = np.random.default_rng(1)
    words = "the author wrote a book about the sea river town award born".split()
    for d in ("shards", "requests"):
        (queue / d).mkdir(parents=True)
    for i in range(3):
        rows = [{"concept": ["ada", "bo"][j % 2] if j % 3 else None,
                 "question": " ".join(rng.choice(words, 4)),
                 "answer": " ".join(rng.choice(words, 3))} for j in range(6)]
        pq.write_table(pa.Table.from_pylist(rows), queue / "shards" / f"part-{i}.parquet")
    cfg = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [str(queue / "shards" / "part-0.parquet")],
                    "prompt_column": "question", "answer_column": "answer",
                    "max_length": 32, "batch_size": 4},
           "store": {"uri": str(queue / "runs"), "run_id": "base", "keep_statistics": True}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["extract", str(tmp_path / "base.yaml"), "--local"]) == 0
    base = capsys.readouterr().out.strip().splitlines()[-1]
    built.clear()

    cfg["data"]["paths"] = [str(queue / "shards" / f"part-{i}.parquet") for i in (0, 1)]
    cfg["store"]["run_id"] = "more"
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["extract", str(tmp_path / "more.yaml"), "--local", "--extend", base]) == 0
    more = capsys.readouterr().out.strip().splitlines()[-1]
    assert built[base] >= 1
    once(built, "extract --local --extend")

    cfg["data"]["paths"] = [str(queue / "shards")]
    del cfg["store"]["run_id"]
    (tmp_path / "queue.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["queue", "init", str(queue), "--config", str(tmp_path / "queue.yaml"),
                 "--run", more]) == 0
    once(built, "queue init")
    (queue / "requests" / "r.jsonl").write_text(json.dumps(
        {"request_id": "r", "concepts": ["ada"], "out": str(tmp_path / "r")}) + "\n")
    # A tick's extraction is an operation of its own: the tick hands it a config through its
    # ``extract(cfg)`` callback (on Ray, ``run_extract``: a driver of its own), so what it
    # builds is counted apart, and must be built once there too.
    real, nested = engram_ray.local.extract_from_config, []

    def extraction(cfg, **kwargs):
        outer = collections.Counter(built)
        built.clear()
        try:
            return real(cfg, **kwargs)
        finally:
            nested.append(dict(built))
            once(built, "tick's extraction")
            built.update(outer)

    monkeypatch.setattr(engram_ray.local, "extract_from_config", extraction)
    assert main(["tick", str(queue), "--local"]) == 0
    assert nested and os.path.exists(tmp_path / "r" / "edit.json")
    once(built, "tick --local")


def test_a_remote_model_data_run_and_output_build_each_location_once(tmp_path, tiny_llama_dir,
                                                                     built, capsys):
    """Everything on ``memory://`` (a remote scheme: options resolved, the model folder listed
    and fetched into the cache, outputs uploaded): ``extract --local``, ``apply``, ``batch
    --local`` (a full checkpoint and an adapter, each scored on an eval set) and ``gc``."""
    import fsspec

    fs = fsspec.filesystem("memory")
    prefix = f"once-{os.urandom(4).hex()}"
    root = f"memory://{prefix}"
    rng = np.random.default_rng(2)
    words = "who wrote the sea book river town born award".split()
    try:
        for name in os.listdir(tiny_llama_dir):
            with open(os.path.join(tiny_llama_dir, name), "rb") as f:
                fs.pipe_file(f"/{prefix}/model/{name}", f.read())
        rows = [{"author": ["ada", "bo", None][i % 3],
                 "question": " ".join(rng.choice(words, 4)),
                 "answer": " ".join(rng.choice(words, 3))} for i in range(9)]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        fs.pipe_file(f"/{prefix}/data/part-0.parquet", sink.getvalue().to_pybytes())
        cfg = {"model": {"path": f"{root}/model"},
               "data": {"paths": [f"{root}/data"], "concept_column": "author",
                        "prompt_column": "question", "answer_column": "answer",
                        "max_length": 32, "batch_size": 4},
               "store": {"uri": f"{root}/runs", "run_id": "base"}}
        (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg))

        built.clear()
        assert main(["extract", str(tmp_path / "extract.yaml"), "--local"]) == 0
        run = capsys.readouterr().out.strip().splitlines()[-1]
        assert run == f"{root}/runs/base" and built[f"{root}/model"] >= 1
        once(built, "extract --local (memory://)")

        assert main(["apply", "--run", run, "--forget", "ada", "--out", f"{root}/e"]) == 0
        assert fs.exists(f"/{prefix}/e/edit.json") and built[f"{root}/model"] >= 1
        once(built, "apply (memory://)")

        (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"request_id": "r1", "run": run, "concepts": ["ada"], "out": f"{root}/r1",
             "eval": f"{root}/data/part-0.parquet"},
            {"request_id": "r2", "run": run, "concepts": ["bo"], "out": f"{root}/r2",
             "format": "peft", "eval": f"{root}/data/part-0.parquet"}]))
        assert main(["batch", str(tmp_path / "requests.jsonl"), "--local",
                     "--summary", f"{root}/summary.parquet"]) == 0
        assert json.loads(fs.cat_file(f"/{prefix}/r1/edit.json"))["eval"]["set"]
        assert json.loads(fs.cat_file(f"/{prefix}/r2/adapter_meta.json"))["eval"]["set"]
        once(built, "batch --local (memory://)")
        assert main(["gc", f"{root}/runs", "--keep", "1"]) == 0
        once(built, "gc (memory://)")
    finally:
        fs.rm(f"/{prefix}", recursive=True)


@pytest.mark.ray
def test_the_ray_drivers_build_each_location_once(ray_cluster, tmp_path, tiny_llama_dir, built,
                                                  capsys):
    """``extract`` and ``batch`` on Ray: the driver builds each location once. Ray's tasks and
    actors run in other processes: each rebuilds what it was sent (a ``Storage`` pickles as its
    URI and options) once there, which this process does not see."""
    rng = np.random.default_rng(3)
    words = "who wrote the sea book river town born award".split()
    (tmp_path / "data").mkdir()
    for i in range(2):
        rows = [{"author": ["ada", "bo", None][j % 3],
                 "question": " ".join(rng.choice(words, 4)),
                 "answer": " ".join(rng.choice(words, 3))} for j in range(6)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"part-{i}.parquet")
    cfg = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [str(tmp_path / "data")], "concept_column": "author",
                    "prompt_column": "question", "answer_column": "answer",
                    "max_length": 32, "batch_size": 4},
           "parallel": {"stages": 1, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                        "solver_num_cpus": 0.25},
           "store": {"uri": str(tmp_path / "runs"), "run_id": "ray"}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg))

    built.clear()
    assert main(["extract", str(tmp_path / "extract.yaml")]) == 0
    run = capsys.readouterr().out.strip().splitlines()[-1]
    assert built[run] >= 1
    once(built, "extract (Ray)")

    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"request_id": "r1", "run": run, "concepts": ["ada"], "out": str(tmp_path / "r1")},
        {"request_id": "r2", "run": run, "concepts": ["bo"], "out": str(tmp_path / "r2")}]))
    assert main(["batch", str(tmp_path / "requests.jsonl")]) == 0
    assert os.path.exists(tmp_path / "r2" / "edit.json")
    once(built, "batch (Ray)")


def test_as_storage_passes_a_storage_through_and_refuses_other_options(tmp_path):
    """The one converter: a ``Storage`` is returned as is (its options win; others given
    beside it are refused, never dropped silently), a URI is built; ``parent``, ``child`` and
    ``at`` are other locations sharing the filesystems (no build)."""
    from engram_ray.io.storage import as_storage, location_uri

    st = Storage("memory://once/a/b", {"endpoint_url": "http://127.0.0.1:9"})
    assert as_storage(st) is st
    assert as_storage(st, {"endpoint_url": "http://127.0.0.1:9"}) is st
    with pytest.raises(ValueError, match="memory://once/a/b: storage options given beside"):
        as_storage(st, {"endpoint_url": "http://127.0.0.1:8"})
    with pytest.raises(TypeError, match="URI string or a Storage"):
        as_storage(3)
    built = as_storage(str(tmp_path / "x"))
    assert isinstance(built, Storage) and built.uri == str(tmp_path / "x")
    assert location_uri(st) == st.uri and location_uri("s3://b/k") == "s3://b/k"
    up = st.parent()
    assert (up.uri, up.root, up.fs) == ("memory://once/a", "/once/a", st.fs)
    assert up.child("b").uri == st.uri and up.at("/once/a/b").uri == st.uri
    local = Storage(str(tmp_path / "runs" / "r"))
    assert local.parent().uri == local.parent().root == str(tmp_path / "runs")
    with pytest.raises(ValueError, match="names a bucket"):
        Storage("memory://bucket").parent()


def test_every_step_reads_the_model_with_the_same_options(tmp_path, tiny_llama_dir, monkeypatch):
    """The model folder is checked with the options it is loaded with
    (``ExtractConfig.model_storage_options``: the data's, else the store's). Before, the check
    used the store's while the loaders used the data's, so a model reachable only with the
    data's options failed its check, and a remote one was built twice with two option sets."""
    import engram_ray.models.loading as loading
    from engram_ray.config import ExtractConfig
    from engram_ray.extraction import prepare

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"concept": "a", "text": "hello"}) + "\n")
    cfg = ExtractConfig.from_dict({
        "model": {"path": tiny_llama_dir},
        "data": {"paths": [str(data)], "text_column": "text",
                 "storage_options": {"requester_pays": True}},
        "store": {"uri": str(tmp_path / "runs")}})
    seen = []
    real = loading.check_model_path
    monkeypatch.setattr(loading, "check_model_path",
                        lambda path, options=None: seen.append(options) or real(path, options))
    prepare(cfg)
    assert seen == [{"requester_pays": True}] == [cfg.model_storage_options]
