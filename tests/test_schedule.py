"""Scheduled ticks, on local disk and on the loopback S3 server: new shards extend the kept Σ
(equal to one pass over every shard), pending requests run once with their outcome recorded,
two concurrent ticks never both work, a live tick's lease is renewed and a dead one's broken,
a queue's config runs no code the queue does not trust, and bad queue input is one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_incremental import assert_same_engrams

from engram_ray.cli import main
from engram_ray.config import ExtractConfig
from engram_ray.io.lease import Lease
from engram_ray.io.storage import Storage
from engram_ray.local import extract_from_config
from engram_ray.runs import open_run
from engram_ray.schedule import init_queue, read_queue, tick


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
        return make_queue(tmp_path, tiny_llama_dir, str(tmp_path / "queue"), None)
    bucket = request.getfixturevalue("s3_bucket")
    return make_queue(tmp_path, tiny_llama_dir, f"{bucket.uri}/queue", bucket.storage_options)


@pytest.fixture()
def local_queue(tmp_path, tiny_llama_dir):
    return make_queue(tmp_path, tiny_llama_dir, str(tmp_path / "queue"), None)


def make_queue(tmp_path, tiny_llama_dir, root, opts):
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
    Lease(q.child("_lease"), timeout_s=3600).acquire()  # a holder known to be gone elsewhere
    done = tick(q.uri, extract=local_extract, storage_options=q.options, break_lease=True)
    assert done.worked and not q.exists("_lease")


# ------------------------------------------------------------------ issue 20: queues are data


def _factory_config(tmp_path, raw, factory, marker) -> str:
    """The queue's config with its model replaced by ``factory`` (``os:system`` touching
    ``marker`` if it is ever called)."""
    evil = {**raw, "model": {"factory": factory, "kwargs": {"command": f"touch {marker}"}}}
    path = tmp_path / f"factory-{factory.replace(':', '-')}.yaml"
    path.write_text(yaml.safe_dump(evil))
    return str(path)


def test_a_queue_config_factory_runs_only_when_the_queue_trusts_it(local_queue, tmp_path):
    """A queue.yaml naming a config with ``factory: os:system`` made every tick import and run
    it (``batch`` refused the same factory)."""
    q, raw, first = local_queue
    marker = tmp_path / "pwned"
    evil = _factory_config(tmp_path, raw, "os:system", marker)
    q.write_bytes("queue.yaml", yaml.safe_dump({"config": evil, "run": first}).encode())
    q.write_bytes("shards/part-2.parquet", shard(2))
    with pytest.raises(PermissionError, match="'os:system'") as err:
        tick(q.uri, extract=local_extract)
    assert "--trust-factory" in str(err.value) and not marker.exists()
    assert not q.exists("state.json") and not q.exists("_lease")
    # queue init refuses the factory unless trusted, and writes nothing then ...
    fresh = str(tmp_path / "q2")
    with pytest.raises(PermissionError, match="--trust-factory"):
        init_queue(fresh, evil, first)
    assert not os.path.exists(fresh)
    # ... and with --trust-factory records exactly that factory
    spec = init_queue(fresh, evil, first, trust_factory=True)
    assert spec.trust_factory == "os:system" == read_queue(fresh).trust_factory
    assert "trust_factory: os:system" in (tmp_path / "q2" / "queue.yaml").read_text()
    # A trusted queue whose config later names another factory is refused again.
    other = _factory_config(tmp_path, raw, "subprocess:getoutput", marker)
    (tmp_path / "q2" / "queue.yaml").write_text(
        (tmp_path / "q2" / "queue.yaml").read_text().replace(evil, other))
    (tmp_path / "q2" / "shards" / "part-2.parquet").write_bytes(shard(2))
    with pytest.raises(PermissionError, match="it trusts only 'os:system'"):
        tick(fresh, extract=local_extract)
    assert not marker.exists()


def test_queue_init_cli_and_factories_that_need_no_trust(local_queue, tmp_path, capsys):
    from engram_ray.apply import BUILTIN_FACTORIES
    from engram_ray.schedule import QueueSpec, _check_factory

    for factory in [None, *BUILTIN_FACTORIES]:
        _check_factory(factory, QueueSpec("c.yaml", "run"), "q")
    q, raw, first = local_queue
    cfg = str(tmp_path / "extract.yaml")
    fresh = str(tmp_path / "q4")
    assert main(["queue", "init", fresh, "--config", cfg, "--run", first]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == fresh
    assert read_queue(fresh).run == first and os.path.isdir(os.path.join(fresh, "requests"))
    assert main(["queue", "init", fresh, "--config", cfg, "--run", first]) == 2
    assert "already exists" in capsys.readouterr().err
    # A path model has nothing to trust: --trust-factory records nothing.
    assert main(["queue", "init", fresh, "--config", cfg, "--run", first, "--force",
                 "--trust-factory"]) == 0
    assert "nothing recorded" in capsys.readouterr().err
    assert read_queue(fresh).trust_factory is None
    assert "\ntrust_factory:" not in (tmp_path / "q4" / "queue.yaml").read_text()
    assert main(["queue", "init", str(tmp_path / "q5"), "--config", cfg,
                 "--run", str(tmp_path / "no-run")]) == 2
    assert str(tmp_path / "no-run") in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "q5" / "queue.yaml")


def test_tick_on_a_missing_queue_fails_naming_it_and_creates_nothing(tmp_path, capsys):
    missing = str(tmp_path / "no-such-queue")
    with pytest.raises(FileNotFoundError, match="no-such-queue"):
        tick(missing, extract=local_extract)
    assert main(["tick", missing, "--local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0] and "queue init" in err[0]
    assert not os.path.exists(missing)


@pytest.mark.parametrize("text, key", [
    ("config: [unclosed", "line 1"),
    ("- a\n- b\n", "mapping"),
    ("config: c.yaml\n", "'run'"),
    ("config: c.yaml\nrun: r\ntrsut_factory: os:system\n", "'trsut_factory'"),
    ("config: c.yaml\nrun: r\ntrust_factory: true\n", "'trust_factory'"),
    ("config: 3\nrun: r\n", "'config'"),
])
def test_a_malformed_queue_yaml_is_one_line_naming_file_and_key(tmp_path, capsys, text, key):
    root = tmp_path / "queue"
    root.mkdir()
    (root / "queue.yaml").write_text(text)
    assert main(["tick", str(root), "--local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(root / "queue.yaml") in err[0] and key in err[0], err
    assert sorted(os.listdir(root)) == ["queue.yaml"]


def test_a_malformed_request_file_is_recorded_and_the_others_run(local_queue):
    """One unreadable request file made every tick exit 2, so the valid files never ran."""
    q, _, first = local_queue
    good = {"request_id": "g", "concepts": ["ada"], "out": q.uri_of("edited", "g")}
    q.write_bytes("requests/a-broken.jsonl", b'{"request_id": "x", "concepts": [\n')
    q.write_bytes("requests/b-bad-row.jsonl", json.dumps({"request_id": "y"}).encode())
    q.write_bytes("requests/c-good.jsonl", json.dumps(good).encode())
    done = tick(q.uri, extract=local_extract)
    assert done.worked and done.request_files == ["c-good.jsonl"]
    assert done.failed_files == ["a-broken.jsonl", "b-bad-row.jsonl"]
    [row] = pq.read_table(io.BytesIO(q.read_bytes("results/c-good.parquet"))).to_pylist()
    assert row["status"] == "done", row["error"]
    for name, why in (("a-broken", "cannot be read"), ("b-bad-row", "'concepts'")):
        [row] = pq.read_table(io.BytesIO(q.read_bytes(f"results/{name}.parquet"))).to_pylist()
        assert row["status"] == "failed" and why in row["error"]
        assert f"requests/{name}.jsonl" in row["error"]
    again = tick(q.uri, extract=local_extract)  # recorded: not retried while unchanged
    assert again.request_files == [] and again.failed_files == []
    fixed = {**good, "request_id": "y", "out": q.uri_of("edited", "y")}
    q.write_bytes("requests/b-bad-row.jsonl", json.dumps(fixed).encode())
    third = tick(q.uri, extract=local_extract)  # fixed: run now
    assert third.request_files == ["b-bad-row.jsonl"] and third.failed_files == []
    [row] = pq.read_table(io.BytesIO(q.read_bytes("results/b-bad-row.parquet"))).to_pylist()
    assert row["status"] == "done" and row["request_id"] == "y"


# --------------------------------------------------------- issue 20: the tick lease is alive


def test_a_live_ticks_lease_is_renewed_past_its_timeout(queue):
    """The tick lease was never renewed: a second tick broke a live one once its timeout had
    passed, and both extended the run."""
    q, _, _ = queue
    q.write_bytes("shards/part-2.parquet", shard(2))
    inside, release, results = threading.Event(), threading.Event(), []

    def slow_extract(cfg):
        inside.set()
        release.wait(120)
        return local_extract(cfg)

    first = threading.Thread(target=lambda: results.append(
        tick(q.uri, extract=slow_extract, storage_options=q.options, lease_timeout_s=2.0)))
    first.start()
    try:
        assert inside.wait(120)
        taken = json.loads(q.read_bytes("_lease"))
        while time.time() < taken["expires"] + 1.0:  # the unrenewed lease would have expired
            time.sleep(0.2)
        second = tick(q.uri, extract=local_extract, storage_options=q.options,
                      lease_timeout_s=2.0)
        assert not second.worked and "another tick is working" in second.message
        now = json.loads(q.read_bytes("_lease"))
        assert now["token"] == taken["token"] and now["expires"] > taken["expires"]
    finally:
        release.set()
        first.join()
    assert results[0].worked and results[0].extended and not q.exists("_lease")


def test_a_killed_ticks_lease_is_broken_at_once_on_the_same_host(local_queue):
    """A killed tick left its lease for up to an hour. Its holder's PID is gone: the next tick
    on the host takes the queue over at once, whatever the timeout."""
    q, _, first = local_queue
    q.write_bytes("shards/part-2.parquet", shard(2))
    code = ("import time\nfrom engram_ray.schedule import tick\n"
            "def extract(cfg):\n    print('inside', flush=True)\n    time.sleep(600)\n"
            f"tick({q.uri!r}, extract=extract, lease_timeout_s=3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"inside"
        assert json.loads(q.read_bytes("_lease"))["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    done = tick(q.uri, extract=local_extract, lease_timeout_s=3600)
    assert done.worked and done.extended and done.run != first


class Killed(BaseException):
    """What a kill -9 does to the writer: it stops mid-write, no handler runs its course."""


def test_a_tick_killed_while_writing_a_result_redoes_that_file(local_queue, monkeypatch):
    """A result written in place and cut short by a kill was taken for done by every later
    tick (the request file never ran again); results and state.json are published whole."""
    import engram_ray.requests as requests_mod

    q, _, _ = local_queue
    out = q.uri_of("edited", "k")
    q.write_bytes("requests/k.jsonl", json.dumps(
        {"request_id": "k", "concepts": ["ada"], "out": out}).encode())
    real = requests_mod.write_summary

    def dies_half_way(rows, uri, requests, storage_options=None):
        Storage(uri, storage_options).write_bytes("", b"PAR1 half a table")
        raise Killed

    monkeypatch.setattr(requests_mod, "write_summary", dies_half_way)
    with pytest.raises(Killed):
        tick(q.uri, extract=local_extract)
    monkeypatch.setattr(requests_mod, "write_summary", real)
    assert not q.exists("results/k.parquet") and not q.exists("state.json")
    done = tick(q.uri, extract=local_extract)
    assert done.request_files == ["k.jsonl"]
    [row] = pq.read_table(io.BytesIO(q.read_bytes("results/k.parquet"))).to_pylist()
    assert row["status"] in ("done", "skipped") and row["request_id"] == "k"


def test_a_tick_killed_after_its_extension_committed_adopts_that_run(local_queue):
    """A tick killed between the extension's commit and state.json extended the same shards
    again on its rerun: a second run, the first orphaned. The extension's run id is a digest
    of the base run and the new shards, so the rerun finds and adopts it."""
    q, _, first = local_queue
    q.write_bytes("shards/part-2.parquet", shard(2))

    def extract_then_die(cfg):
        local_extract(cfg)
        raise Killed

    with pytest.raises(Killed):
        tick(q.uri, extract=extract_then_die)
    assert not q.exists("state.json")
    calls = []
    done = tick(q.uri, extract=lambda cfg: calls.append(cfg) or local_extract(cfg))
    assert done.worked and done.extended and calls == []
    assert sorted(r for r in q.ls("runs") if not r.startswith("_")) == sorted(
        [first.rsplit("/", 1)[-1], done.run.rsplit("/", 1)[-1]])
    assert json.loads(q.read_bytes("state.json"))["run"] == done.run


def test_an_unreadable_request_file_is_retried_once_fixed_even_after_a_kill(local_queue,
                                                                            monkeypatch):
    """The failure's record (the file's sha256) is saved before its result: a tick killed
    before its end must not leave a failed result that a fixed file never gets past."""
    import engram_ray.schedule as schedule

    q, _, _ = local_queue
    q.write_bytes("requests/r.jsonl", b"{not json\n")

    def killed(*args):
        raise Killed

    monkeypatch.setattr(schedule, "_save_state", killed)  # dies at the very end
    with pytest.raises(Killed):
        tick(q.uri, extract=local_extract)
    monkeypatch.undo()
    assert q.exists("results/r.parquet")
    q.write_bytes("requests/r.jsonl", json.dumps(
        {"request_id": "r", "concepts": ["ada"], "out": q.uri_of("edited", "r")}).encode())
    done = tick(q.uri, extract=local_extract)
    assert done.request_files == ["r.jsonl"] and done.failed_files == []


def test_queue_init_and_a_tick_on_s3(s3_bucket, tmp_path):
    """On an object store, queue init writes queue.yaml only (no folders to make), and a tick
    of the new queue finds nothing to do."""
    import torch
    from torch import nn

    from engram_ray import Batch, extract

    opts = s3_bucket.storage_options
    torch.manual_seed(0)
    run = extract(nn.Sequential(nn.Linear(4, 3)), [Batch(torch.randn(8, 4), ["a"] * 4 + [None] * 4)],
                  uri=f"{s3_bucket.uri}/runs/r1", storage_options=opts).uri
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"factory": "engram_ray.models.sequential:mlp"},
                                   "data": {"paths": ["s3://x/y"], "features_column": "x"}}))
    root = f"{s3_bucket.uri}/queues/q1"
    init_queue(root, str(cfg), run, storage_options=opts)
    assert Storage(root, opts).ls() == ["queue.yaml"] and read_queue(root, opts).run == run
    done = tick(root, extract=local_extract, storage_options=opts)
    assert done.worked and done.run == run and not done.extended and done.request_files == []


def test_a_tick_that_lost_its_lease_moves_nothing_on(local_queue):
    """A tick whose lease was broken and taken by another while it worked (stalled past its
    expiry, say) must not publish over the other's work: it stops before state.json."""
    from engram_ray.io.lease import LeaseHeld

    q, _, first = local_queue
    q.write_bytes("shards/part-2.parquet", shard(2))

    def taken_over_meanwhile(cfg):
        Lease(q.child("_lease")).break_()
        Lease(q.child("_lease"), timeout_s=3600).acquire()  # another tick's now
        return local_extract(cfg)

    with pytest.raises(LeaseHeld, match="lost the lease"):
        tick(q.uri, extract=taken_over_meanwhile)
    assert not q.exists("state.json") and q.exists("_lease")  # the other's lease stays
