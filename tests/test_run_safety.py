"""Run paths that cannot destroy, one writer per run, and a commit that covers run.json
(issue 13, storage half). Each test reproduces a failure seen in review on the old writer:

- ``store.run_id: .`` / ``..`` / ``../x`` removed the store, a committed run, or an unrelated
  directory; ``run_id: data`` removed the input shards; all exited 0;
- ``overwrite: true`` killed mid-write lost the old good run;
- two writers of one run id both reached commit (A's manifest, B's payloads);
- an edited run.json was trusted; a truncated run.json or ``_COMMITTED`` gave a bare JSON error.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from torch import nn

from engram_ray import Batch, extract, open_run
from engram_ray.config import ConfigError, ExtractConfig, StoreConfig
from engram_ray.io.lease import LeaseHeld
from engram_ray.io.storage import Storage
from engram_ray.io.store import RunWriter, run_lease


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3, bias=False))


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.randn(40, 5, generator=g), ["a"] * 10 + ["b"] * 10 + [None] * 20)]


def engrams(run):
    return {(c, m): run.engram(c, m) for c in run.concepts for m in run.modules}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tree(root):
    """Every file below ``root`` with its bytes (what must survive untouched)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# ---------------------------------------------------------------- run ids and target paths

@pytest.mark.parametrize("run_id", [".", "..", "../important", "a/b", "_staging", "_leases",
                                    "_checkpoints", "", "run id", "x" * 201])
def test_unsafe_run_id_is_a_config_error(run_id):
    with pytest.raises(ConfigError, match="store.run_id"):
        StoreConfig(uri="runs", run_id=run_id)


def test_config_run_id_dot_and_dotdot_touch_nothing(tmp_path):
    store = tmp_path / "store"
    committed = extract(mlp(), batches(), uri=str(store / "good")).uri
    (tmp_path / "important").mkdir()
    (tmp_path / "important" / "keep.txt").write_text("precious")
    before = tree(tmp_path)
    for run_id in (".", "..", "../important"):
        raw = {"model": {"factory": "torch.nn:Identity"}, "data": {"paths": ["x.parquet"],
               "text_column": "t"}, "store": {"uri": str(store), "run_id": run_id,
                                              "overwrite": True}}
        with pytest.raises(ConfigError, match="store.run_id"):
            ExtractConfig.from_dict(raw)
    assert tree(tmp_path) == before
    assert open_run(committed).concepts == ["a", "b"]


@pytest.mark.parametrize("tail", [".", "..", "_staging", "x/.."])
def test_python_api_uri_last_component_must_be_safe(tmp_path, tail):
    store = tmp_path / "store"
    committed = extract(mlp(), batches(), uri=str(store / "good")).uri
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="run id"):
        extract(mlp(), batches(), uri=f"{store}/{tail}", overwrite=True)
    with pytest.raises(ValueError, match="run id"):
        RunWriter(f"{store}/{tail}", overwrite=True)
    assert tree(tmp_path) == before
    assert open_run(committed).concepts == ["a", "b"]


def test_run_id_naming_a_data_directory_or_file_is_refused_and_kept(tmp_path):
    store = tmp_path / "work"
    (store / "data").mkdir(parents=True)
    (store / "data" / "part-0.parquet").write_bytes(b"PAR1 input shard")
    (store / "notes.txt").write_text("not a run")
    before = tree(tmp_path)
    for name in ("data", "notes.txt"):
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="is not an engram run"):
                extract(mlp(), batches(), uri=str(store / name), overwrite=overwrite)
    assert tree(tmp_path) == before
    assert not os.listdir(store / "_leases")  # every refused writer released its lease


def test_commit_layout_staging_and_lease_are_cleaned(tmp_path):
    store = tmp_path / "runs"
    run = extract(mlp(), batches(), uri=str(store / "r1"))
    assert sorted(os.listdir(run.uri)) == ["_COMMITTED", "manifest.parquet", "payload",
                                           "run.json", "statistics"]
    marker = json.loads(open(os.path.join(run.uri, "_COMMITTED")).read())
    assert marker["generation"] == "" and len(marker["run_json_sha256"]) == 64
    assert os.listdir(store / "_staging") == [] and os.listdir(store / "_leases") == []


# ---------------------------------------------------------------- overwrite

@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs"), None
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket.uri}/runs", bucket.storage_options



def test_overwrite_failing_after_staging_keeps_the_old_run(tmp_path, monkeypatch):
    """Everything solved and staged, then the writer dies (old writer: the old run was
    already deleted when the new writer started)."""
    uri = str(tmp_path / "runs" / "r")
    old = engrams(extract(mlp(0), batches(0), uri=uri))

    def killed_at_commit(self, *a, **k):
        raise RuntimeError("killed after staging")

    monkeypatch.setattr(RunWriter, "commit", killed_at_commit)
    with pytest.raises(RuntimeError, match="killed"):
        extract(mlp(1), batches(1), uri=uri, overwrite=True)
    monkeypatch.undo()
    assert same(engrams(open_run(uri, model=mlp(0))), old)
    assert sorted(os.listdir(uri)) == ["_COMMITTED", "manifest.parquet", "payload", "run.json",
                                       "statistics"]
    assert os.listdir(tmp_path / "runs" / "_staging") == []


def test_overwrite_failing_while_publishing_keeps_the_old_run(place, monkeypatch):
    store, opts = place
    uri = f"{store}/r"
    old = engrams(extract(mlp(0), batches(0), uri=uri, storage_options=opts))
    real_publish = RunWriter._publish

    def killed_in_publish(self, generation):  # every file published aside, no marker yet
        real_publish(self, generation)
        assert generation.startswith("v-")
        raise RuntimeError("killed while publishing")

    monkeypatch.setattr(RunWriter, "_publish", killed_in_publish)
    with pytest.raises(RuntimeError, match="killed"):
        extract(mlp(1), batches(1), uri=uri, overwrite=True, storage_options=opts)
    monkeypatch.undo()
    assert same(engrams(open_run(uri, opts, model=mlp(0))), old)
    assert sorted(Storage(uri, opts).ls()) == ["_COMMITTED", "manifest.parquet", "payload",
                                               "run.json", "statistics"]  # abort removed the rest


def test_overwrite_killed_without_cleanup_keeps_old_run_until_the_next_commit(tmp_path,
                                                                              monkeypatch):
    """A hard kill after publishing, before the marker (no abort runs): the old run is still
    the one in force; the next writer (breaking the dead writer's lease) commits and collects
    the leftovers."""
    uri = str(tmp_path / "runs" / "r")
    old = engrams(extract(mlp(0), batches(0), uri=uri))

    def killed(storage, rel, data):
        raise KeyboardInterrupt("kill -9")

    import engram_ray.io.store as store

    monkeypatch.setattr(store, "_write_atomic", killed)
    monkeypatch.setattr(RunWriter, "abort", lambda self: None)  # a killed process cleans nothing
    with pytest.raises(KeyboardInterrupt):
        extract(mlp(1), batches(1), uri=uri, overwrite=True)
    monkeypatch.undo()
    assert any(n.startswith("v-") for n in os.listdir(uri))  # the new files, published aside
    assert same(engrams(open_run(uri, model=mlp(0))), old)
    with pytest.raises(LeaseHeld, match=r"locked by .* pid \d+ .*break_lease"):
        extract(mlp(1), batches(1), uri=uri, overwrite=True)
    run_lease(uri, break_lease=True).release()  # the documented way out
    new_run = extract(mlp(1), batches(1), uri=str(tmp_path / "oracle"))
    run = extract(mlp(1), batches(1), uri=uri, overwrite=True)
    assert same(engrams(run), engrams(new_run)) and not same(engrams(run), old)
    left = sorted(os.listdir(uri))
    assert left == ["_COMMITTED", "manifest.parquet", "payload", "run.json", "statistics"] or (
        left[0] == "_COMMITTED" and len(left) == 2 and left[1].startswith("v-"))
    assert os.listdir(tmp_path / "runs" / "_staging") == []


def test_overwrite_alternates_generations_and_collects_the_old_one(place):
    store, opts = place
    uri = f"{store}/r"
    names = []
    for i in range(3):
        got = engrams(extract(mlp(i), batches(i), uri=uri, overwrite=True, storage_options=opts))
        run = open_run(uri, opts, model=mlp(i))
        assert same(engrams(run), got)
        names.append(sorted(Storage(uri, opts).ls()))
        assert run.marker["generation"] == ("" if i % 2 == 0 else names[-1][1])
    assert names[0] == names[2] == ["_COMMITTED", "manifest.parquet", "payload", "run.json",
                                    "statistics"]
    assert len(names[1]) == 2 and names[1][1].startswith("v-")  # the flat files collected


# ---------------------------------------------------------------- one writer per run

def test_second_writer_fails_at_once_naming_the_holder(place):
    store, opts = place
    uri = f"{store}/r"
    first = RunWriter(uri, opts)
    with pytest.raises(LeaseHeld, match=rf"run {uri} is locked by .* pid {os.getpid()} since"):
        extract(mlp(1), batches(1), uri=uri, storage_options=opts)
    with pytest.raises(LeaseHeld):
        RunWriter(uri, opts, overwrite=True)
    rows = _solve_into(first)
    assert first.commit(rows, {"note": "A"}) == uri
    run = open_run(uri, opts, model=mlp(2))
    assert run.info["note"] == "A"
    for c, m in engrams(run):  # every payload matches A's manifest
        run.engram(c, m)
    st = Storage(store, opts)  # committed: the lease released, the staging area gone
    assert not st.exists("_leases/r")
    assert not st.exists("_staging") or st.ls("_staging") == []


def test_concurrent_writers_exactly_one_commits_a_consistent_run(place):
    store, opts = place
    uri = f"{store}/race"
    results, barrier = [], threading.Barrier(3)
    inputs = {seed: (mlp(seed), batches(seed)) for seed in range(3)}  # torch's RNG is global

    def write(seed):
        barrier.wait()
        try:
            results.append(("ok", seed, extract(*inputs[seed], uri=uri, storage_options=opts)))
        except (LeaseHeld, FileExistsError) as e:
            results.append(("refused", seed, e))

    threads = [threading.Thread(target=write, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r[0] == "ok"]
    assert len(ok) == 1 and len(results) == 3, results
    run = open_run(uri, opts, model=inputs[ok[0][1]][0])  # the winner's manifest and payloads
    oracle = extract(mlp(ok[0][1]), batches(ok[0][1]), uri=f"{store}/oracle",
                     storage_options=opts)
    assert same(engrams(run), engrams(oracle))


def _solve_into(writer):
    """mlp(2)'s run solved into ``writer``'s staging area; its manifest rows."""
    from engram_ray.core.capture import collect_statistics
    from engram_ray.core.layers import weight_matrix
    from engram_ray.local import solve_statistics

    model = mlp(2)
    stats = collect_statistics(model, batches(2))
    w = {n: weight_matrix(model.get_submodule(n), i.bias) for n, i in stats.modules.items()}
    return solve_statistics(stats, w, writer)


def test_live_writer_renews_its_lease_and_a_broken_one_cannot_commit(tmp_path):
    uri = str(tmp_path / "runs" / "r")
    a = RunWriter(uri, lease_timeout_s=2.0)  # renewed every second while a lives
    time.sleep(3.5)
    with pytest.raises(LeaseHeld):
        RunWriter(uri, lease_timeout_s=2.0)
    rows = _solve_into(a)
    b = RunWriter(uri, break_lease=True)  # the documented way out (here: wrongly used)
    with pytest.raises(LeaseHeld, match="lost the lease"):
        a.commit(rows, {"note": "A"})
    a.abort()
    b.commit(_solve_into(b), {"note": "B"})
    assert open_run(uri).info["note"] == "B"
    assert os.listdir(tmp_path / "runs" / "_leases") == []


def test_lease_helper_for_other_outputs(tmp_path):
    out = str(tmp_path / "edited")
    lease = run_lease(out, timeout_s=60, what=f"output {out}")
    with pytest.raises(LeaseHeld, match="output .*edited is locked .*--force"):
        run_lease(out, timeout_s=60, what=f"output {out}", how_to_break="apply --force")
    lease.release()
    run_lease(out, timeout_s=60).release()
    assert os.listdir(tmp_path / "_leases") == []


# ---------------------------------------------------------------- the commit covers run.json

def test_tampered_run_json_is_refused_naming_the_file(tmp_path):
    uri = extract(mlp(), batches(), uri=str(tmp_path / "r")).uri
    path = os.path.join(uri, "run.json")
    info = json.load(open(path))
    info["config"] = {"model": {"factory": "os:system", "kwargs": {"command": "touch pwned"}}}
    json.dump(info, open(path, "w"))
    with pytest.raises(ValueError, match=rf"{path} does not match the commit marker"):
        open_run(uri)


@pytest.mark.parametrize("name", ["run.json", "_COMMITTED"])
def test_truncated_metadata_names_the_file(tmp_path, name):
    uri = extract(mlp(), batches(), uri=str(tmp_path / "r")).uri
    path = os.path.join(uri, name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        open_run(uri)


def test_marker_cannot_point_outside_the_run(tmp_path):
    uri = extract(mlp(), batches(), uri=str(tmp_path / "r")).uri
    path = os.path.join(uri, "_COMMITTED")
    marker = json.load(open(path))
    marker["generation"] = "../other"
    json.dump(marker, open(path, "w"))
    with pytest.raises(ValueError, match="invalid generation"):
        open_run(uri)
