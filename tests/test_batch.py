"""Batch unlearning requests: each request equals a single ``apply`` of it, a failing request
is recorded without stopping the others, and a re-run skips what is done."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from engram_ray.apply import apply_run
from engram_ray.config import ExtractConfig
from engram_ray.local import extract_from_config
from engram_ray.requests import read_requests, run_batch, write_summary


@pytest.fixture(scope="module")
def run_uri(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", "Smith, John ", None][i % 4],
             "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(16)]
    (tmp / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp / "data" / "part-0.parquet")
    cfg = ExtractConfig.from_dict({
        "model": {"path": tiny_llama_dir},
        "data": {"paths": [str(tmp / "data")], "concept_column": "author",
                 "prompt_column": "question", "answer_column": "answer", "max_length": 64},
        "store": {"uri": str(tmp / "runs"), "run_id": "base"},
    })
    return extract_from_config(cfg, log=open(os.devnull, "w")).uri


def write_requests(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_batch_equals_single_applies_records_failures_and_skips_done(tmp_path, run_uri):
    out = tmp_path / "out"
    reqs = read_requests(write_requests(tmp_path / "requests.jsonl", [
        {"request_id": "r1", "run": run_uri, "concepts": ["ada"], "out": str(out / "r1")},
        {"request_id": "bad", "run": run_uri, "concepts": ["nobody"], "out": str(out / "bad")},
        {"request_id": "r2", "run": run_uri, "concepts": ["bo", "Smith, John "], "alpha": 0.5,
         "scale": "weight_norm", "modules": ["down_proj"], "out": str(out / "r2")},
    ]))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert "nobody" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert not os.path.exists(out / "bad" / "edit.json")  # nothing that looks complete
    # Each output equals a single apply of the same request.
    single = apply_run(run_uri, ["bo", "Smith, John "], alpha=0.5, scale="weight_norm",
                       modules=["down_proj"], out=str(tmp_path / "single"))
    a = load_file(os.path.join(out / "r2", "model.safetensors"))
    b = load_file(os.path.join(single, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The summary stands on its own; a re-run skips what is done and retries the failure.
    summary = write_summary(rows, str(tmp_path / "summary.parquet"), reqs)
    table = pq.read_table(summary).to_pylist()
    assert [(r["request_id"], r["status"]) for r in table] == [
        ("r1", "done"), ("bad", "failed"), ("r2", "done")]
    assert table[2]["concepts"] == ["bo", "Smith, John "] and table[2]["alpha"] == 0.5
    again = run_batch(reqs)
    assert [r["status"] for r in again] == ["skipped", "failed", "skipped"]


def test_a_request_failing_mid_write_leaves_nothing_complete(tmp_path, run_uri, monkeypatch):
    import engram_ray.io.export as export

    real, calls = export.SafetensorsWriter.write, []

    def dies_mid_write(self, name, t):
        if calls:  # one tensor read, edited and written, then the disk fills up
            raise OSError("disk full")
        calls.append(name)
        real(self, name, t)

    monkeypatch.setattr(export.SafetensorsWriter, "write", dies_mid_write)
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        {"request_id": "x", "run": run_uri, "concepts": "ada", "out": str(tmp_path / "x")}]))
    [row] = run_batch(reqs)
    assert row["status"] == "failed" and "disk full" in row["error"] and calls
    assert not os.path.exists(tmp_path / "x" / "edit.json")
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")
    monkeypatch.setattr(export.SafetensorsWriter, "write", real)
    assert [r["status"] for r in run_batch(reqs)] == ["done"]  # the re-run completes it


@pytest.mark.parametrize("rows, match", [
    ([{"request_id": "a", "run": "r", "concepts": ["c"]}], "column 'out'"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "alfa": 1}], "'alfa'"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "alpha": "x"}], "alpha"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o"}] * 2, "appears twice"),
    ([], "no requests"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "format": "gguf"}],
     "row 0 \\(request_id 'a'\\): column 'format' must be one of"),
    ([{"request_id": "a", "run": "r", "concepts": 5, "out": "o"}],
     "request_id 'a'.*column 'concepts' must be"),
    ([{"request_id": "a", "run": "r", "concepts": ["c", None], "out": "o"}],
     "request_id 'a'.*column 'concepts' must be"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "modules": 3}],
     "request_id 'a'.*column 'modules' must be"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "scale": "weight_nrom"}],
     "request_id 'a'.*column 'scale'.*'weight_nrom'"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "alpha": True}],
     "request_id 'a'.*column 'alpha' must be a number"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "format": "peft",
       "adapter_exact_dense": "yes"}], "request_id 'a'.*column 'adapter_exact_dense'"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "format": "peft",
       "adapter_rtol": "tight"}], "column .adapter_rtol. must be a number"),
    ([{"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "adapter_rtol": 0.1}],
     "need format 'peft'"),
])
def test_bad_request_files_name_the_file_row_and_column(tmp_path, rows, match):
    path = write_requests(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match) as e:
        read_requests(path)
    assert "bad.jsonl" in str(e.value)


def test_full_and_peft_requests_each_equal_their_single_apply(tmp_path, run_uri):
    """``format`` per request (issue 12): a peft request writes the adapter a single
    ``apply --format peft`` writes (with its ``adapter_rtol`` / ``adapter_exact_dense``);
    a full one the checkpoint; the peft done marker is ``adapter_meta.json`` (a re-run skips
    it)."""
    out = tmp_path / "out"
    reqs = read_requests(write_requests(tmp_path / "requests.jsonl", [
        {"request_id": "full", "run": run_uri, "concepts": ["ada"], "out": str(out / "full")},
        {"request_id": "lora", "run": run_uri, "concepts": ["ada", "bo"], "format": "peft",
         "adapter_rtol": 0.01, "out": str(out / "lora")},
        {"request_id": "exact", "run": run_uri, "concepts": ["ada", "bo", "Smith, John "],
         "format": "peft", "adapter_exact_dense": True, "alpha": 0.7, "out": str(out / "exact")},
    ]))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["done"] * 3, rows
    for name, concepts, kw in [
            ("lora", ["ada", "bo"], {"adapter_rtol": 0.01}),
            ("exact", ["ada", "bo", "Smith, John "], {"adapter_exact_dense": True, "alpha": 0.7})]:
        single = apply_run(run_uri, concepts, out=str(tmp_path / name), format="peft", **kw)
        assert_same_tensors(out / name / "adapter_model.safetensors",
                            os.path.join(single, "adapter_model.safetensors"))
        assert json.loads((out / name / "adapter_config.json").read_text()) == \
            json.loads((tmp_path / name / "adapter_config.json").read_text())
        meta = json.loads((out / name / "adapter_meta.json").read_text())
        assert meta["forget"] == concepts and meta["exact_dense"] == (name == "exact")
    full = apply_run(run_uri, ["ada"], out=str(tmp_path / "single-full"))
    assert_same_tensors(out / "full" / "model.safetensors",
                        os.path.join(full, "model.safetensors"))
    assert not (out / "lora" / "edit.json").exists()  # each format its own marker
    assert [r["status"] for r in run_batch(reqs)] == ["skipped"] * 3


def test_cli_refuses_a_bad_request_before_any_work(tmp_path, run_uri, capsys):
    """A bad column value in one row (here ``format``) fails the whole batch at once, naming
    the request and the column, exit status 2: no output and no summary is written, not even
    for the good rows (a typo is fixed and the file re-run, not half-run)."""
    from engram_ray.cli import main

    path = write_requests(tmp_path / "requests.jsonl", [
        {"request_id": "good", "run": run_uri, "concepts": ["ada"], "out": str(tmp_path / "g")},
        {"request_id": "typo", "run": run_uri, "concepts": ["ada"], "format": "lora",
         "out": str(tmp_path / "t")}])
    assert main(["batch", path, "--local"]) == 2
    err = capsys.readouterr().err
    assert "request_id 'typo'" in err and "column 'format'" in err and "lora" in err
    assert sorted(os.listdir(tmp_path)) == ["requests.jsonl"]


def _count_group_halves(monkeypatch) -> list[tuple]:
    """Every union's group half (``X_U Σ⁺`` or ``Σ_U Σ⁺``) a run forms: where a batch's work on
    the run's statistics is done (each reads its concepts' rows or blocks from the store)."""
    from engram_ray.io.store import Run

    real, calls = Run._right_uncached, []

    def counted(self, group, concepts, factors):
        calls.append((group, concepts, factors))
        return real(self, group, concepts, factors)

    monkeypatch.setattr(Run, "_right_uncached", counted)
    return calls


def test_union_work_is_done_once_per_group_for_the_whole_batch(tmp_path, run_uri, monkeypatch):
    """Requests on one run share their work (issues 10, 19): three requests forgetting {ada},
    {bo} and {ada, bo} form each input group's half of each union once — 3 per group — and
    no per-concept engram; every output still equals its single apply."""
    from engram_ray.io.store import Run

    specs = [["ada"], ["bo"], ["ada", "bo"]]
    reqs = read_requests(write_requests(tmp_path / "requests.jsonl", [
        {"request_id": f"r{i}", "run": run_uri, "concepts": c, "out": str(tmp_path / f"r{i}")}
        for i, c in enumerate(specs)]))
    calls = _count_group_halves(monkeypatch)
    engrams = []
    monkeypatch.setattr(Run, "engram", lambda *a: engrams.append(a))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["done"] * 3, rows
    groups = {g for g, _, _ in calls}
    assert sorted(calls) == sorted(set(calls)), "a union's group half was formed twice"
    assert len(calls) == 3 * len(groups) and not engrams
    monkeypatch.undo()
    for i, c in enumerate(specs):
        single = apply_run(run_uri, c, out=str(tmp_path / f"single{i}"))
        a = load_file(os.path.join(tmp_path / f"r{i}", "model.safetensors"))
        b = load_file(os.path.join(single, "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), c
        edit = json.loads((tmp_path / f"r{i}" / "edit.json").read_text())
        assert edit["concepts"] == c and edit["run"] == run_uri


@pytest.mark.ray
def test_cli_batch_on_ray_runs_each_run_as_one_task(ray_cluster, tmp_path, run_uri, capsys):
    """``engram-ray batch`` (no ``--local``): the run's requests go to a Ray task together and
    each output equals the single apply."""
    from engram_ray.cli import main

    path = write_requests(tmp_path / "requests.jsonl", [
        {"request_id": f"r{i}", "run": run_uri, "concepts": c, "out": str(tmp_path / f"r{i}")}
        for i, c in enumerate([["ada"], ["ada", "bo"]])])
    assert main(["batch", path]) == 0, capsys.readouterr().err
    table = pq.read_table(str(tmp_path / "requests.summary.parquet")).to_pylist()
    assert [r["status"] for r in table] == ["done", "done"]
    single = apply_run(run_uri, ["ada", "bo"], out=str(tmp_path / "single"))
    a = load_file(os.path.join(tmp_path / "r1", "model.safetensors"))
    b = load_file(os.path.join(single, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scale", ["uniform", "weight_norm"])
def test_store_work_does_not_grow_with_the_number_of_requests(tmp_path, run_uri, monkeypatch,
                                                              scale):
    """Issue 10: work on the run is shared by the requests that need it. Six requests (three
    full, three peft) on three forget sets form each group's half of each union once per
    pass over the modules — the write pass, plus one pass for per-layer scales
    (``weight_norm``) that every request shares — where request by request it would be 6
    (12) times. Every output equals its single apply."""
    specs = [["ada"], ["bo"], ["ada", "bo"]]
    rows = [{"request_id": f"{fmt}{i}", "run": run_uri, "concepts": c, "scale": scale,
             "format": fmt, "out": str(tmp_path / f"{fmt}{i}")}
            for fmt in ("full", "peft") for i, c in enumerate(specs)]
    reqs = read_requests(write_requests(tmp_path / "requests.jsonl", rows))
    calls = _count_group_halves(monkeypatch)
    assert [r["status"] for r in run_batch(reqs)] == ["done"] * 6
    distinct = len(set(calls))
    assert distinct == 3 * len({g for g, _, _ in calls})
    passes = 2 if scale == "uniform" else 3  # full checkpoints, adapters (+ the scales)
    assert len(calls) <= passes * distinct, (len(calls), distinct)
    monkeypatch.undo()
    for i, c in enumerate(specs):
        single = apply_run(run_uri, c, scale=scale, out=str(tmp_path / f"single{i}"))
        assert_same_tensors(tmp_path / f"full{i}" / "model.safetensors",
                            os.path.join(single, "model.safetensors"))
        lora = apply_run(run_uri, c, scale=scale, out=str(tmp_path / f"lora{i}"),
                         format="peft")
        assert_same_tensors(tmp_path / f"peft{i}" / "adapter_model.safetensors",
                            os.path.join(lora, "adapter_model.safetensors"))


def assert_same_tensors(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_edits_equals_plan_edit_number_for_number(run_uri):
    """Batch planning (module-major, every edit's per-layer statistic from one read of each
    module) gives exactly ``plan_edit``'s scales for every scale spelling; an edit that
    cannot be planned gets its error in its place and the others are planned."""
    from engram_ray.core.edit import SharedEngrams, plan_edit, plan_edits
    from engram_ray.runs import open_run

    run = open_run(run_uri)
    scales = ["uniform", "weight_norm", "effective_rank", "weight_norm*effective_rank",
              "uniform*weight_norm", "effective_rank*weight_norm*effective_rank"]
    edits = [(c, a, s, m) for s in scales for c, a, m in [
        (["ada"], 1.0, None), (["bo", "ada"], -0.5, ["down_proj", "q_proj"])]]
    edits.insert(3, (["nobody"], 1.0, "weight_norm", None))
    planned = plan_edits(SharedEngrams(run, ["ada", "bo"]), edits)
    assert isinstance(planned[3], ValueError) and "nobody" in str(planned[3])
    for (concepts, alpha, scale, modules), plan in zip(edits, planned):
        if concepts == ["nobody"]:
            continue
        want = plan_edit(run, concepts, alpha, scale, modules)
        assert plan.scales == want.scales and list(plan.scales) == list(want.scales), scale
        assert plan.forget == want.forget and plan.alpha == want.alpha
