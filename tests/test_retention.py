"""``engram-ray gc STORE --keep N``: only committed runs that a newer committed run of the
store extends are deleted, beyond the newest N of each lineage; a dry run by default; each
deletion under the run's lease with the commit marker removed first; nothing that is not a
committed run is touched. On local disk and on the loopback S3 server (moto)."""

from __future__ import annotations

import json

import pytest
from test_incremental import config, shards  # noqa: F401 - the shards fixture

from engram_ray.cli import main
from engram_ray.io.catalog import list_runs
from engram_ray.io.storage import Storage
from engram_ray.io.store import RunWriter, open_run, run_exists, run_lease
from engram_ray.local import extract_from_config
from engram_ray.retention import gc, plan_gc


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """``(store URI, storage options)``: a local folder or a prefix of a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "runs"), None
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket.uri}/runs", bucket.storage_options


def commit(store_uri: str, run_id: str, opts, extends: str | None = None) -> str:
    """A committed run (real commit protocol, empty manifest) whose run.json extends
    ``extends``: what gc reads, without an extraction."""
    info = {"run_id": run_id, **({"extends": extends} if extends else {})}
    return RunWriter(f"{store_uri}/{run_id}", opts).commit([], info)


def lineage(store_uri, opts) -> list[str]:
    """a ← b ← c (c extends b extends a), and d that nothing extends."""
    a = commit(store_uri, "a", opts)
    b = commit(store_uri, "b", opts, extends=a)
    c = commit(store_uri, "c", opts, extends=b)
    d = commit(store_uri, "d", opts)
    return [a, b, c, d]


def put(s: Storage, rel: str, data: bytes) -> None:
    s.makedirs(rel.rsplit("/", 1)[0] if "/" in rel else "")
    s.write_bytes(rel, data)


def ids(uris) -> list[str]:
    return sorted(u.rstrip("/").rsplit("/", 1)[-1] for u in uris)


def test_dry_run_is_the_default_and_lists_what_delete_removes(store):
    uri, opts = store
    lineage(uri, opts)
    plan = gc(uri, 1, storage_options=opts)
    assert plan.dry_run and ids(plan.delete) == ["a", "b"] and ids(plan.keep) == ["c", "d"]
    assert ids(r["uri"] for r in list_runs(uri, opts)) == ["a", "b", "c", "d"]  # untouched
    assert ids(plan_gc(uri, 2, storage_options=opts).delete) == ["a"]
    assert plan_gc(uri, 3, storage_options=opts).delete == []
    done = gc(uri, 1, delete=True, storage_options=opts)
    assert not done.dry_run and ids(done.delete) == ids(plan.delete) and not done.skipped
    assert ids(r["uri"] for r in list_runs(uri, opts)) == ["c", "d"]
    assert open_run(f"{uri}/c", opts).info["extends"].endswith("/b")  # kept, still readable
    s = Storage(uri, opts)
    assert not s.exists("a") or s.ls("a") == []  # nothing of a left (S3: no prefix at all)
    assert not s.exists("_leases") or s.ls("_leases") == []  # every lease given back


def test_nothing_but_committed_runs_is_touched(store):
    uri, opts = store
    a, b, c, d = lineage(uri, opts)
    s = Storage(uri, opts)
    put(s, "notes/readme.txt", b"not a run")              # a folder of someone's
    put(s, "e/run.json", b"{}")                           # a run without its marker
    put(s, "_checkpoints/x/state.json", b"{}")            # reserved names
    put(s, "b/extra.txt", b"someone put this here")       # a superseded run, not only ours
    result = gc(uri, 1, delete=True, storage_options=opts)
    assert ids(result.delete) == ["a"]
    assert "not run files" in result.skipped[b] and "extra.txt" in result.skipped[b]
    assert run_exists(b, opts) and s.exists("b/extra.txt")
    for rel in ("notes/readme.txt", "e/run.json", "_checkpoints/x/state.json"):
        assert s.exists(rel), rel


def test_a_run_whose_lease_is_held_is_kept(store):
    uri, opts = store
    a, b, *_ = lineage(uri, opts)
    lease = run_lease(a, opts)  # a writer overwriting a, alive
    try:
        result = gc(uri, 1, delete=True, storage_options=opts)
    finally:
        lease.release()
    assert ids(result.delete) == ["b"] and "in use" in result.skipped[a]
    assert run_exists(a, opts) and not run_exists(b, opts)


def test_the_run_a_queue_extends_next_is_kept(store):
    uri, opts = store
    a, b, *_ = lineage(uri, opts)
    queue = Storage(f"{uri}-queue", opts)
    put(queue, "state.json", json.dumps({"run": b, "config": "x", "ticks": 3}).encode())
    result = gc(uri, 1, delete=True, queues=[queue.uri], storage_options=opts)
    assert ids(result.delete) == ["a"] and run_exists(b, opts)


def test_the_marker_goes_first(tmp_path, monkeypatch):
    """A gc that dies after removing the marker leaves no run that looks committed."""
    uri = str(tmp_path / "runs")
    a, *_ = lineage(uri, None)
    real_rm = Storage.rm

    def dying_rm(self, rel="", recursive=True):
        if rel == "run.json":
            raise OSError("killed")
        return real_rm(self, rel, recursive)

    monkeypatch.setattr(Storage, "rm", dying_rm)
    with pytest.raises(OSError, match="killed"):
        gc(uri, 1, delete=True)
    monkeypatch.setattr(Storage, "rm", real_rm)
    assert not run_exists(a) and "a" not in ids(r["uri"] for r in list_runs(uri))
    with pytest.raises(FileNotFoundError, match="not a committed engram run"):
        open_run(a)


def test_cli(tmp_path, capsys):
    uri = str(tmp_path / "runs")
    lineage(uri, None)
    assert main(["gc", uri, "--keep", "1"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["dry_run"] is True and ids(summary["would_delete"]) == ["a", "b"]
    assert "would delete" in err and "--delete deletes" in err
    assert len(list_runs(uri)) == 4
    assert main(["gc", uri, "--keep", "1", "--delete"]) == 0
    summary = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert ids(summary["deleted"]) == ["a", "b"] and len(list_runs(uri)) == 2
    assert main(["gc", uri, "--keep", "0"]) == 2
    assert "--keep must be an integer ≥ 1" in capsys.readouterr()[1]
    assert main(["gc", str(tmp_path / "nope"), "--keep", "1"]) == 2
    assert f"store {tmp_path / 'nope'} does not exist" in capsys.readouterr()[1]
    assert main(["gc", uri, "--keep", "1", "--queue", str(tmp_path / "noqueue")]) == 2
    assert "--queue" in capsys.readouterr()[1]


def test_real_extension_chain(tmp_path, shards, tiny_llama_dir, capsys):  # noqa: F811
    """Runs written by ``extract --extend`` (run.json's real ``extends``), base then two
    extensions: gc --keep 1 leaves the newest, which still opens and holds every concept."""
    runs = tmp_path / "runs"
    files = sorted(shards.glob("*.parquet"))
    base = extract_from_config(config(tiny_llama_dir, files[:2], runs, "r0",
                                      keep_statistics=True))
    mid = extract_from_config(config(tiny_llama_dir, files[:3], runs, "r1", extend=base.uri))
    new = extract_from_config(config(tiny_llama_dir, files, runs, "r2", extend=mid.uri))
    assert main(["gc", str(runs), "--keep", "1", "--delete"]) == 0
    summary = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert ids(summary["deleted"]) == ["r0", "r1"] and ids(summary["kept"]) == ["r2"]
    assert open_run(new.uri).concepts == ["ada", "bo", "cy"]


def test_forks_other_stores_and_self_references(tmp_path):
    """Two extensions of one run both supersede it; a run extending a run of another store,
    or naming itself, proves nothing here."""
    uri, other = str(tmp_path / "runs"), str(tmp_path / "elsewhere")
    a = commit(uri, "a", None)
    commit(uri, "b", None, extends=a)
    commit(uri, "c", None, extends=a)
    x = commit(other, "x", None)
    commit(uri, "y", None, extends=x)
    commit(uri, "z", None, extends=f"{uri}/z")
    plan = plan_gc(uri, 1)
    assert ids(plan.delete) == ["a"] and ids(plan.keep) == ["b", "c", "y", "z"]
    assert ids(plan.extended_by[a]) == ["b", "c"]
    assert plan_gc(other, 1).delete == []
