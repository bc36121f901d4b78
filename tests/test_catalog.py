"""``list`` and ``show --json``: committed runs only, described from their own metadata."""

from __future__ import annotations

import os

import torch
from torch import nn

from engram_ray import Batch, extract
from engram_ray.io.catalog import describe_run, list_runs


def test_list_shows_committed_runs_only_with_their_concepts_and_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(40, 4)
    labels = ["a"] * 10 + ["b"] * 10 + [None] * 20
    first = extract(model, [Batch(x, labels)], uri=str(tmp_path / "store" / "r1"))
    extract(model, [Batch(x, ["c"] * 5 + [None] * 35)], uri=str(tmp_path / "store" / "r2"))
    os.makedirs(tmp_path / "store" / "half-written")  # no commit marker: not a run
    os.makedirs(tmp_path / "store" / "_checkpoints" / "r3")
    runs = list_runs(str(tmp_path / "store"))
    assert [r["run_id"] for r in runs] == ["r1", "r2"]
    assert runs[0]["concepts"] == ["a", "b"] and runs[0]["modules"] == 2
    assert runs[0]["model_fingerprint"] == runs[1]["model_fingerprint"]
    assert runs[0]["committed_at"] <= runs[1]["committed_at"]
    one = describe_run(first)
    assert one["engrams"]["factored"] + one["engrams"]["dense"] == 4


def test_cli_version_list_show_json_and_batch(tmp_path, capsys):
    import json

    import pytest

    from engram_ray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "engram-ray 0.1.0" in capsys.readouterr().out
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    extract(model, [Batch(torch.randn(20, 4), ["a"] * 10 + [None] * 10)],
            uri=str(tmp_path / "store" / "r1"))
    assert main(["list", str(tmp_path / "store"), "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run["run_id"] == "r1" and run["concepts"] == ["a"]
    assert main(["show", run["uri"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["modules"] == 2
    # A batch whose one request fails: exit 1, one line, the summary names it.
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text(json.dumps({"request_id": "x", "run": run["uri"], "concepts": ["zz"],
                                "out": str(tmp_path / "x")}) + "\n")
    assert main(["batch", str(reqs), "--local"]) == 1
    err = capsys.readouterr().err
    assert "1 of 1 request(s) failed" in err and (tmp_path / "reqs.summary.parquet").exists()


def test_list_shows_good_runs_and_marks_a_tampered_one_with_its_reason(tmp_path, capsys):
    """Issue 20: one run whose run.json was edited made ``list`` fail, hiding every good run."""
    import json

    import pytest

    from engram_ray.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(20, 4)
    for name in ("r1", "r2", "r3"):
        extract(model, [Batch(x, ["a"] * 10 + [None] * 10)], uri=str(tmp_path / "store" / name))
    info = tmp_path / "store" / "r2" / "run.json"
    info.write_text(info.read_text().replace('"a"', '"b"', 1))
    runs = list_runs(str(tmp_path / "store"))
    assert [(r["run_id"], r["error"] is None) for r in runs] == [
        ("r1", True), ("r3", True), ("r2", False)]
    assert "run.json" in runs[2]["error"] and "\n" not in runs[2]["error"]
    assert main(["list", str(tmp_path / "store")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("r1  ") and err[1].startswith("r3  ")
    assert err[2].startswith("r2  BAD: ") and "run.json" in err[2]
    assert main(["list", str(tmp_path / "store"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["run_id"] for r in listed] == ["r1", "r3", "r2"] and listed[2]["error"]
    with pytest.raises(ValueError, match="is a file, not a store"):  # was an empty listing
        list_runs(str(info))
