"""Scheduled ticks, on local disk and on the loopback S3 server: new shards extend the kept Σ
(equal to one pass over every shard), pending requests run once with their outcome recorded,
two concurrent ticks never both work, and a crashed tick's lease expires."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_incremental import assert_same_engrams

from engram_ray.config import ExtractConfig
from engram_ray.io.lease import Lease
from engram_ray.io.storage import Storage
from engram_ray.io.store import open_run
from engram_ray.local import extract_from_config
from engram_ray.schedule import tick


def shard(i: int) -> bytes:
    rng = np.random.default_rng(i)
    words = "the author wrote a book about the sea river town award born".split()
    names = [["ada", "bo"], ["bo", "cy"]][i % 2]
    rows = [{"concept": names[j % 2] if j % 3 else None,
             "question": " ".join(rng.choice(words, 5)),
             "answer": " ".join(rng.choice(words, 4))} for j in range(9)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture(params=["local", "s3"])
def queue(request, tmp_path, tiny_llama_dir):
    """A queue with two shards counted by its first run, a config, and queue.yaml."""
    if request.param == "local":
        root, opts = str(tmp_path / "queue"), None
    else:
        bucket = request.getfixturevalue("s3_bucket")
        root, opts = f"{bucket.uri}/queue", bucket.storage_options
    q = Storage(root, opts)
    for d in ("shards", "requests"):
        q.makedirs(d)
    for i in (0, 1):
        q.write_bytes(f"shards/part-{i}.parquet", shard(i))
    raw = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [q.uri_of("shards")], "prompt_column": "question",
                    "answer_column": "answer", "max_length": 64, "batch_size": 4,
                    "storage_options": opts},
           "store": {"uri": q.uri_of("runs"), "keep_statistics": True, "storage_options": opts}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(raw))
    first = extract_from_config(ExtractConfig.from_dict(raw), log=io.StringIO()).uri
    q.write_bytes("queue.yaml", yaml.safe_dump({"config": str(tmp_path / "extract.yaml"),
                                                "run": first}).encode())
    return q, raw, first


def local_extract(cfg) -> str:
    return extract_from_config(cfg, log=io.StringIO()).uri


def test_tick_extends_runs_requests_once_and_is_idempotent(queue, tmp_path):
    q, raw, first = queue
    for i in (2, 3):
        q.write_bytes(f"shards/part-{i}.parquet", shard(i))
    out = q.uri_of("edited", "r1")
    q.write_bytes("requests/monday.jsonl", (json.dumps(
        {"request_id": "r1", "concepts": ["cy"], "out": out}) + "\n").encode())
    done = tick(q.uri, extract=local_extract, storage_options=q.options)
    assert done.worked and done.extended and done.run != first
    assert done.request_files == ["monday.jsonl"]
    # The extended run equals one pass over all four shards.
    one = ExtractConfig.from_dict({**raw, "store": {**raw["store"], "run_id": "one-pass"}})
    assert_same_engrams(open_run(done.run, q.options), extract_from_config(one, log=io.StringIO()))
    [row] = pq.read_table(io.BytesIO(q.read_bytes("results/monday.parquet"))).to_pylist()
    assert row["status"] == "done" and row["run"] == done.run
    assert Storage(out, q.options).exists("edit.json")
    state = json.loads(q.read_bytes("state.json"))
    assert state["run"] == done.run and state["ticks"] == 1
    again = tick(q.uri, extract=local_extract, storage_options=q.options)
    assert again.worked and not again.extended and again.request_files == []
    assert again.run == done.run


def test_two_concurrent_ticks_exactly_one_works(queue):
    q, _, _ = queue
    q.write_bytes("shards/part-2.parquet", shard(2))
    inside, release = threading.Event(), threading.Event()

    def slow_extract(cfg):
        inside.set()
        release.wait(60)
        return local_extract(cfg)

    results = []
    first = threading.Thread(target=lambda: results.append(
        tick(q.uri, extract=slow_extract, storage_options=q.options)))
    first.start()
    assert inside.wait(60)
    second = tick(q.uri, extract=local_extract, storage_options=q.options)
    release.set()
    first.join()
    assert not second.worked and "another tick is working" in second.message
    assert "locked by" in second.message
    assert results[0].worked and results[0].extended


def test_a_crashed_ticks_lease_expires(queue):
    q, _, first = queue
    Lease(q.child("_lease"), timeout_s=3600).acquire()  # a live holder: refused
    assert not tick(q.uri, extract=local_extract, storage_options=q.options).worked
    Lease(q.child("_lease")).break_()
    Lease(q.child("_lease"), timeout_s=0).acquire()  # crashed, and its lease has expired
    done = tick(q.uri, extract=local_extract, storage_options=q.options)
    assert done.worked and done.run == first and not q.exists("_lease")
