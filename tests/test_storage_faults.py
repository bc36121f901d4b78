"""Storage faults (issue 13): transient S3 errors are retried; what still fails is one clear
error with nothing committed, and cleanup never crashes or masks it.

- a fault-injecting proxy (``faulty_proxy.py``) in front of the moto server answers 503 to a
  fraction of requests and drops others: an extraction still commits a correct run;
- every request failing: one one-line error, no ``_COMMITTED``, no lease, no staging left;
- the S3 server killed during the solve: one one-line error naming the run, nothing committed
  once the server is back (the old abort caught only OSError and crashed on botocore's error).
"""

from __future__ import annotations

import time

import pytest
import torch
from faulty_proxy import FaultyProxy
from torch import nn

from engram_ray import Batch, extract, open_run
from engram_ray.io.storage import Storage, StorageError


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def batches():
    g = torch.Generator().manual_seed(0)
    return [Batch(torch.randn(60, 5, generator=g), ["a"] * 10 + ["b"] * 20 + [None] * 30)]


def engrams(run):
    return {(c, m): run.engram(c, m) for c in run.concepts for m in run.modules}


def leftovers(bucket, prefix="runs") -> list[str]:
    fs = Storage(bucket.uri, bucket.storage_options).fs
    return sorted(p.split("/", 1)[1] for p in fs.find(f"{bucket.name}/{prefix}"))


def test_transient_503s_and_dropped_connections_are_retried(s3_bucket, tmp_path):
    oracle = engrams(extract(mlp(), batches(), uri=str(tmp_path / "oracle")))
    with FaultyProxy(s3_bucket.server.endpoint_url, fail=0.25, drop=0.05, seed=1) as proxy:
        opts = {**s3_bucket.storage_options, "endpoint_url": proxy.endpoint_url}
        t0 = time.time()
        run = extract(mlp(), batches(), uri=f"{s3_bucket.uri}/runs/r", storage_options=opts)
        took = time.time() - t0
        got = engrams(run)
    counts = proxy.counts
    print(f"faulty proxy: {counts}, extraction took {took:.1f}s")
    assert counts["failed"] >= 5 and counts["dropped"] >= 1
    assert got.keys() == oracle.keys() and all(torch.equal(got[k], oracle[k]) for k in got)
    assert leftovers(s3_bucket) == ["runs/r/_COMMITTED", "runs/r/manifest.parquet",
                                    "runs/r/payload/0.parquet", "runs/r/payload/2.parquet",
                                    "runs/r/run.json", "runs/r/statistics/0.safetensors",
                                    "runs/r/statistics/2.safetensors"]


def test_every_request_failing_is_one_clear_error_and_commits_nothing(s3_bucket):
    with FaultyProxy(s3_bucket.server.endpoint_url, fail=1.0) as proxy:
        opts = {**s3_bucket.storage_options, "endpoint_url": proxy.endpoint_url,
                "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}}}
        with pytest.raises(StorageError) as e:
            extract(mlp(), batches(), uri=f"{s3_bucket.uri}/runs/r", storage_options=opts)
    msg = str(e.value)
    assert "\n" not in msg and f"{s3_bucket.uri}/runs" in msg, msg
    assert proxy.counts["failed"] >= 3 and proxy.counts["forwarded"] == 0
    assert leftovers(s3_bucket) == []


def test_faults_starting_mid_run_leave_nothing_committed(s3_bucket, monkeypatch):
    """The store fails for good after the payloads were staged: one error; once the store is
    back, no marker, no lease and no staged file is left (the abort cleaned up)."""
    import engram_ray.io.store as store

    with FaultyProxy(s3_bucket.server.endpoint_url) as proxy:
        opts = {**s3_bucket.storage_options, "endpoint_url": proxy.endpoint_url,
                "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
        real = store._manifest_bytes

        def outage_then_recovery(rows):
            proxy.fail = 1.0
            return real(rows)

        monkeypatch.setattr(store, "_manifest_bytes", outage_then_recovery)
        real_abort = store.RunWriter.abort

        def abort_after_recovery(self):
            proxy.fail = 0.0  # the store is back while the writer cleans up
            real_abort(self)

        monkeypatch.setattr(store.RunWriter, "abort", abort_after_recovery)
        with pytest.raises(StorageError, match="failed: ") as e:
            extract(mlp(), batches(), uri=f"{s3_bucket.uri}/runs/r", storage_options=opts)
    assert "\n" not in str(e.value)
    assert leftovers(s3_bucket) == []


def test_s3_server_killed_during_solve(s3_bucket, monkeypatch):
    from moto.server import ThreadedMotoServer

    import engram_ray.extraction as extraction

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {**s3_bucket.storage_options, "endpoint_url": f"http://{host}:{port}",
            "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                              "connect_timeout": 2}}
    real_solve = extraction.solve_group

    def killed(*args, **kwargs):
        server.stop()  # the store dies as the solve starts writing payloads
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(extraction, "solve_group", killed)
    t0 = time.time()
    with pytest.raises(StorageError) as e:
        extract(mlp(), batches(), uri=f"{s3_bucket.uri}/runs/r", storage_options=opts)
    took = time.time() - t0
    msg = str(e.value)
    print(f"killed server: failed in {took:.1f}s with: {msg}")
    assert "\n" not in msg and f"{s3_bucket.uri}/runs" in msg
    assert "connect" in msg.lower()
    # moto's state lives in this process: the session server shows what the dead one held.
    left = leftovers(s3_bucket)
    assert not any(p.endswith("_COMMITTED") for p in left) and not any(
        p.startswith("runs/r/") for p in left)
    with pytest.raises(FileNotFoundError, match="not a committed engram run"):
        open_run(f"{s3_bucket.uri}/runs/r", s3_bucket.storage_options)


def test_cli_reports_a_dead_store_in_one_line(s3_bucket, tiny_llama_dir, tmp_path, monkeypatch,
                                              capsys):
    """``engram-ray extract --local`` with the store dying at solve time: exit 1, one line on
    stderr naming the run, no traceback, nothing committed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from moto.server import ThreadedMotoServer

    import engram_ray.extraction as extraction
    from engram_ray.cli import main

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    rows = [{"author": ["ada", "bo", None][i % 3], "question": "who wrote the book",
             "answer": f"the sea {i}"} for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    opts = {**s3_bucket.storage_options, "endpoint_url": f"http://{host}:{port}",
            "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    cfg = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [str(tmp_path / "part-0.parquet")], "concept_column": "author",
                    "prompt_column": "question", "answer_column": "answer", "max_length": 32},
           "store": {"uri": f"{s3_bucket.uri}/runs", "run_id": "r", "storage_options": opts}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    real_solve = extraction.solve_group

    def killed(*args, **kwargs):
        server.stop()
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(extraction, "solve_group", killed)
    monkeypatch.delenv("ENGRAM_RAY_TRACEBACK", raising=False)
    assert main(["extract", str(tmp_path / "c.yaml"), "--local"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("engram-ray extract: error: StorageError: writing statistics of run "
                           f"{s3_bucket.uri}/runs/r"), err
    assert "Traceback" not in err
    assert not any(p.startswith("runs/r/") for p in leftovers(s3_bucket))
