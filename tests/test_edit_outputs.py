"""Edits, batches and their outputs: one writer per output, content-addressed markers, verified
skips, incomplete attempts recognised and redone, the base model checked (issue 20)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from engram_ray.apply import SKIPPED, apply, apply_run
from engram_ray.cli import main
from engram_ray.config import EditSpec, ExtractConfig
from engram_ray.local import extract_from_config
from engram_ray.requests import read_requests, run_batch


@pytest.fixture(scope="module")
def run_uri(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("outputs")
    rows = [{"author": a, "q": f"who is {a} {i}?", "a": f"{a} wrote book {i}"}
            for i in range(6) for a in ("ada", "bo")]
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return extract_from_config(ExtractConfig.from_dict({
        "model": {"path": tiny_llama_dir},
        "data": {"paths": [str(data)], "concept_column": "author", "prompt_column": "q",
                 "answer_column": "a"},
        "store": {"uri": str(tmp / "runs"), "run_id": "base", "keep_statistics": True},
        "parallel": {"progress_interval_s": None}})).uri


def _requests(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_requests(str(path))


def _marker_matches_files(out):
    edit = json.loads((out / "edit.json").read_text())
    for name, rec in edit["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == rec["sha256"], name
    return edit


def test_batch_rerun_skips_only_what_it_verifies(run_uri, tmp_path):
    """A rerun skips an output only when its marker names this very request and every file
    verifies: a changed α is refused naming both requests; a truncated or deleted file makes
    the output incomplete, redone; the redone output equals the first."""
    out = tmp_path / "o"
    req = {"request_id": "r", "run": run_uri, "concepts": ["ada"], "out": str(out)}
    assert [r["status"] for r in run_batch(_requests(tmp_path / "a.jsonl", [req]))] == ["done"]
    first = {k: v.clone() for k, v in load_file(str(out / "model.safetensors")).items()}
    assert [r["status"] for r in run_batch(_requests(tmp_path / "a.jsonl", [req]))] == \
        ["skipped"]
    changed = run_batch(_requests(tmp_path / "b.jsonl", [{**req, "alpha": 5.0}]))
    assert changed[0]["status"] == "failed" and "holds another edit" in changed[0]["error"]
    other = run_batch(_requests(tmp_path / "c.jsonl", [{**req, "concepts": ["bo"]}]))
    assert other[0]["status"] == "failed" and "['ada']" in other[0]["error"]
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after the commit
    assert [r["status"] for r in run_batch(_requests(tmp_path / "a.jsonl", [req]))] == ["done"]
    assert all(torch.equal(first[k], v) for k, v in load_file(str(weights)).items())
    weights.unlink()  # deleted
    assert [r["status"] for r in run_batch(_requests(tmp_path / "a.jsonl", [req]))] == ["done"]
    _marker_matches_files(out)


def test_two_requests_sharing_an_output_are_refused(run_uri, tmp_path):
    rows = [{"request_id": f"r{i}", "run": run_uri, "concepts": [c], "out": str(tmp_path / "o")}
            for i, c in enumerate(("ada", "bo"))]
    with pytest.raises(ValueError, match="'r0' and 'r1' share the output"):
        _requests(tmp_path / "r.jsonl", rows)


def test_an_interrupted_upload_is_named_incomplete_and_redone(run_uri, s3_bucket, monkeypatch,
                                                             capsys):
    """kill -9 during an S3 upload: the prefix holds the attempt's note and some files, no
    marker. The rerun says the output is incomplete and redoes it under the lease."""
    import engram_ray.io.export as export

    opts = s3_bucket.storage_options
    out = f"{s3_bucket.uri}/edited"
    real = export.upload_dir

    def killed(local, dest, marker="edit.json"):
        names = sorted(os.listdir(local))
        for name in ["_INCOMPLETE.json", *[n for n in names if n.endswith(".json")][:1]]:
            dest.fs.put_file(os.path.join(local, name), dest.path(name))
        raise KeyboardInterrupt("kill -9")  # no cleanup runs after a kill

    monkeypatch.setattr(export, "upload_dir", killed)
    monkeypatch.setattr("engram_ray.apply.upload_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        apply_run(run_uri, ["ada"], out=out, storage_options=opts)
    monkeypatch.setattr("engram_ray.apply.upload_dir", real)
    keys = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="edited/")["Contents"]
    assert "edited/_INCOMPLETE.json" in {k["Key"] for k in keys}
    [outcome] = apply(run_uri, [EditSpec(forget=["ada"], out=out)], storage_options=opts,
                      skip_complete=True)
    assert outcome is None
    assert "is incomplete (an earlier attempt stopped before its marker" in \
        capsys.readouterr().err
    [again] = apply(run_uri, [EditSpec(forget=["ada"], out=out)], storage_options=opts,
                    skip_complete=True)
    assert again == SKIPPED


def test_concurrent_applies_to_one_s3_output_never_mix(run_uri, s3_bucket, monkeypatch):
    """Two applies of different edits race for one prefix, the window between the output's
    check and its upload widened: exactly one writes; the output's marker always describes
    the weights it holds."""
    import engram_ray.io.outputs as outputs

    opts = s3_bucket.storage_options
    out = f"{s3_bucket.uri}/raced"
    real = outputs.inspect

    def slow(*a, **k):
        got = real(*a, **k)
        time.sleep(1.0)  # a wide window between the check and the write
        return got

    monkeypatch.setattr("engram_ray.apply.inspect", slow)
    barrier, results = threading.Barrier(2), {}

    def edit(alpha):
        barrier.wait()
        results[alpha] = apply(run_uri, [EditSpec(forget=["ada"], out=out, alpha=alpha)],
                               storage_options=opts)[0]

    threads = [threading.Thread(target=edit, args=(a,)) for a in (1.0, 5.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [a for a, r in results.items() if r is None]
    assert len(won) == 1, results
    lost = results[({1.0, 5.0} - set(won)).pop()]
    assert "locked" in str(lost) or "holds another edit" in str(lost)
    from engram_ray.io.storage import Storage

    dest = Storage(out, opts)
    marker = dest.read_json("edit.json")
    assert marker["alpha"] == won[0]
    for name, rec in marker["files"].items():
        assert hashlib.sha256(dest.read_bytes(name)).hexdigest() == rec["sha256"], name


def test_stale_partial_stages_are_removed_by_the_next_writer(run_uri, tmp_path):
    out = tmp_path / "edited"
    stale = tmp_path / "edited.partial-0123456789ab"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    keep = tmp_path / "edited.partial-notours"
    keep.mkdir()
    apply_run(run_uri, ["bo"], out=str(out))
    assert not stale.exists() and keep.exists()
    _marker_matches_files(out)


def test_a_base_model_replaced_after_extraction_is_refused(run_uri, tmp_path, tiny_llama_dir,
                                                           capsys):
    """Other weights of the same shapes in the run's model folder: apply, --format peft and
    batch refuse them naming the module; --model with --allow-other-weights edits them,
    recorded in edit.json."""
    moved = tmp_path / "model"
    os.makedirs(moved)
    for name in os.listdir(tiny_llama_dir):
        src = os.path.join(tiny_llama_dir, name)
        if name == "model.safetensors":
            state = load_file(src)
            save_file({k: v + 0.01 for k, v in state.items()}, str(moved / name),
                      metadata={"format": "pt"})
        else:
            (moved / name).write_bytes(open(src, "rb").read())
    for fmt in ("full", "peft"):
        rc = main(["apply", "--run", run_uri, "--forget", "ada", "--model", str(moved),
                   "--format", fmt, "--out", str(tmp_path / f"refused-{fmt}")])
        err = capsys.readouterr().err
        assert rc == 2 and "sha256 differs" in err and "module '" in err, err
        assert not (tmp_path / f"refused-{fmt}").exists()
    rc = main(["apply", "--run", run_uri, "--forget", "ada", "--model", str(moved),
               "--allow-other-weights", "--out", str(tmp_path / "allowed")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "allowed" / "edit.json").read_text())["allow_other_weights"]


def test_tampered_kept_statistics_are_refused_by_an_extension(run_uri, tmp_path, tiny_llama_dir):
    """Scaling a run's kept Σ_total by 3 is caught by the manifest's sha256 of the spectrum
    file before --extend merges anything."""
    import shutil

    from engram_ray.runs import open_run

    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run_uri, copy)
    stats = copy / "statistics"
    name = sorted(os.listdir(stats))[0]
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    blob = (stats / name).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + n]).get("__metadata__", {})
    tensors = load_bytes(blob)
    tensors["total"] = tensors["total"] * 3
    (stats / name).write_bytes(save_bytes(tensors, metadata=meta))
    with pytest.raises(ValueError, match=f"{name} fails its sha256 check"):
        open_run(str(copy)).group_statistics(name.removesuffix(".safetensors"))


def test_an_apply_racing_an_overwrite_of_its_run_names_the_run(run_uri, tmp_path):
    """The run is overwritten (a new generation, the old files collected) between an apply's
    open and its reads: one line naming the run, not a bare [Errno 2]."""
    import shutil

    from engram_ray.runs import open_run

    copy = tmp_path / "runs" / "r"
    shutil.copytree(run_uri, copy)
    run = open_run(str(copy))
    shutil.rmtree(copy / "payload")  # what an overwrite's clean-up does to the old generation
    with pytest.raises(FileNotFoundError, match=f"run {copy} changed while it was read"):
        run.engram("ada", run.modules[0])
