"""A batch request's eval summary (issue 10): base and edited model's loss and accuracy on an
eval set, split into forget and retain rows, carried by the output's marker and the summary
table, equal to an independent computation, and never changing what is written."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from engram_ray.config import ExtractConfig
from engram_ray.eval.corpus import make_corpus
from engram_ray.eval.train_lm import finetune_lm, qa_texts, torch_threads
from engram_ray.local import extract_from_config
from engram_ray.models.tiny import build_tokenizer, tiny_llama
from engram_ray.requests import EVAL_COLUMNS, read_requests, run_batch, write_summary

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama that has learnt the synthetic authors corpus (6 authors × 4 questions),
    a run extracted from that corpus, and the corpus as an eval set in the run's columns."""
    tmp = tmp_path_factory.mktemp("batch-eval")
    corpus = make_corpus(n_authors=6, qa_per_author=4, seed=0)
    tok = build_tokenizer(qa_texts([corpus]), vocab_size=512)
    with torch_threads(1):
        model = finetune_lm(tiny_llama(vocab_size=len(tok), hidden=64, layers=1, seed=0), tok,
                            corpus, epochs=40, batch_size=16)
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    rows = [{"author": r["author"], "prompt": f"Question: {r['question']}\nAnswer:",
             "answer": " " + r["answer"]} for r in corpus.to_pylist()]
    (tmp / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp / "data" / "part-0.parquet")
    eval_set = tmp / "eval.jsonl"  # the eval set in another format than the run's data
    eval_set.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ExtractConfig.from_dict({
        "model": {"path": str(tmp / "model")},
        "data": {"paths": [str(tmp / "data")], "concept_column": "author",
                 "prompt_column": "prompt", "answer_column": "answer",
                 "max_length": MAX_LENGTH},
        "store": {"uri": str(tmp / "runs"), "run_id": "base"},
    })
    run = extract_from_config(cfg, log=open(os.devnull, "w")).uri
    authors = sorted({r["author"] for r in rows})
    return {"run": run, "model": str(tmp / "model"), "eval": str(eval_set), "rows": rows,
            "authors": authors}


def write_requests(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def request(t, rid, concepts, out, **kw):
    return {"request_id": rid, "run": t["run"], "concepts": concepts, "out": str(out), **kw}


def marker_eval(out, name="edit.json"):
    return json.loads((out / name).read_text())["eval"]


def reference_scores(model_dir, rows, max_length=MAX_LENGTH):
    """Summed answer-token NLL, argmax hits and token count of each row, computed here
    without engram-ray: transformers' own model and tokenizer, one row at a time (no padding),
    the prompt with special tokens and the answer without, truncated to ``max_length``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            ids = (p + tok(r["answer"], add_special_tokens=False)["input_ids"])[:max_length]
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            targets = torch.tensor(ids[len(p):])
            pred = logits[len(p) - 1:len(ids) - 1]
            out.append((float(torch.nn.functional.cross_entropy(pred, targets, reduction="sum")),
                        int((pred.argmax(-1) == targets).sum()), len(targets)))
    return out


def reference_split(scores, rows, forget):
    """The eval summary's numbers from :func:`reference_scores`: loss and accuracy per split."""
    split = {}
    for name, keep in (("forget", lambda r: r["author"] in forget),
                       ("retain", lambda r: r["author"] not in forget)):
        picked = [s for s, r in zip(scores, rows) if keep(r)]
        tokens = sum(s[2] for s in picked)
        split[name] = {"rows": len(picked), "tokens": tokens,
                       "loss": sum(s[0] for s in picked) / tokens,
                       "acc": sum(s[1] for s in picked) / tokens}
    return split


def test_eval_equals_an_independent_computation_and_changes_no_weight(tmp_path, trained):
    """(a) The marker's base and edited numbers equal transformers' own cross-entropy of the
    base directory and of the written edited checkpoint, on the answer tokens; and the
    checkpoint written with eval is tensor for tensor the one written without it, its
    ``edit.json`` the same but for ``"eval"``."""
    t, forget = trained, trained["authors"][:2]
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        request(t, "with", forget, tmp_path / "with", eval=t["eval"]),
        request(t, "without", forget, tmp_path / "without")]))
    assert [r["status"] for r in run_batch(reqs)] == ["done", "done"]
    ev = marker_eval(tmp_path / "with")
    assert ev["set"] == t["eval"] and ev["model"] == "edited checkpoint"
    assert ev["tokens"] == "answer"
    base = reference_split(reference_scores(t["model"], t["rows"]), t["rows"], forget)
    after = reference_split(reference_scores(str(tmp_path / "with"), t["rows"]), t["rows"],
                            forget)
    for split in ("forget", "retain"):
        assert ev[split]["rows"] == base[split]["rows"] and ev[split]["rows"] > 0
        assert ev[split]["tokens"] == base[split]["tokens"]
        for label, ref in (("base", base), ("edited", after)):
            assert ev[split][f"loss_{label}"] == pytest.approx(ref[split]["loss"], rel=1e-5)
            assert ev[split][f"acc_{label}"] == pytest.approx(ref[split]["acc"], abs=1e-12)
    a = load_file(str(tmp_path / "with" / "model.safetensors"))
    b = load_file(str(tmp_path / "without" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with_marker = json.loads((tmp_path / "with" / "edit.json").read_text())
    without = json.loads((tmp_path / "without" / "edit.json").read_text())
    del with_marker["eval"]
    assert with_marker == without


def test_forgetting_raises_the_forget_loss_more_than_the_retain_loss(tmp_path, trained,
                                                                    monkeypatch):
    """(b) The model has learnt the corpus (low loss, high accuracy on every split). Forgetting
    any one author (α = 0.5) raises the loss of that author's answers more than the other
    authors' and lowers their accuracy more; over the six authors the forget loss rises at
    least 1.5 times as much as the retain loss. (A one-layer model of width 64 has little room
    to keep authors apart: the retain loss rises too, which the comparison allows.) The base
    model scores the set once for all six requests."""
    import engram_ray.eval.edit_scores as edit_scores

    t, calls = trained, []
    real = edit_scores.score_rows

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(edit_scores, "score_rows", counted)
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        request(t, f"r{i}", [a], tmp_path / f"r{i}", eval=t["eval"], alpha=0.5)
        for i, a in enumerate(t["authors"])]))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["done"] * 6, rows
    assert len(calls) == 1 + 6  # the base once, each edited model once
    rises = []
    for r in rows:
        assert r["forget_loss_base"] < 1.0 and r["retain_loss_base"] < 1.0, r
        assert r["forget_acc_base"] > 0.9 and r["retain_acc_base"] > 0.9, r
        rises.append((r["forget_loss_edited"] - r["forget_loss_base"],
                      r["retain_loss_edited"] - r["retain_loss_base"]))
        assert rises[-1][0] > rises[-1][1] > 0, r
        assert (r["forget_acc_base"] - r["forget_acc_edited"]
                > r["retain_acc_base"] - r["retain_acc_edited"]), r
    assert sum(f for f, _ in rises) > 1.5 * sum(r for _, r in rises), rises
    # The base model's numbers are shared: its loss over the whole set is every request's.
    whole = [(r["forget_loss_base"] * r["forget_tokens"] + r["retain_loss_base"]
              * r["retain_tokens"]) / (r["forget_tokens"] + r["retain_tokens"]) for r in rows]
    assert whole == pytest.approx([whole[0]] * 6, rel=1e-12)


def test_marker_and_summary_table_carry_the_eval_and_a_rerun_reads_it_back(tmp_path, trained):
    """(c) The eval goes into ``edit.json`` (and the summary table's columns, null for a
    request without eval); a re-run skips the done requests and still reports their eval,
    read back from their markers."""
    t = trained
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        request(t, "ev", [t["authors"][0]], tmp_path / "ev", eval=t["eval"]),
        request(t, "plain", [t["authors"][1]], tmp_path / "plain")]))
    first = run_batch(reqs)
    assert [r["status"] for r in first] == ["done", "done"]
    ev = marker_eval(tmp_path / "ev")
    assert first[0]["forget_loss_edited"] == ev["forget"]["loss_edited"]
    assert first[0]["retain_acc_base"] == ev["retain"]["acc_base"]
    again = run_batch(reqs)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    assert {k: again[0][k] for k in EVAL_COLUMNS} == {k: first[0][k] for k in EVAL_COLUMNS}
    assert all(again[1][k] is None for k in EVAL_COLUMNS)
    summary = pq.read_table(write_summary(again, str(tmp_path / "summary.parquet"), reqs))
    assert set(EVAL_COLUMNS) | {"eval"} <= set(summary.column_names)
    assert summary.schema.field("forget_loss_base").type == pa.float64()
    table = summary.to_pylist()
    assert table[0]["eval"] == t["eval"] and table[0]["eval_model"] == "edited checkpoint"
    assert table[0]["retain_loss_edited"] == ev["retain"]["loss_edited"]
    assert table[0]["forget_rows"] == ev["forget"]["rows"] == 4
    assert table[1]["eval"] is None and table[1]["forget_loss_base"] is None
    # A summary with no eval at all still has typed eval columns.
    plain = pq.read_table(write_summary(again[1:], str(tmp_path / "plain.parquet"), reqs))
    assert plain.schema.field("retain_tokens").type == pa.int64()


def test_a_bad_eval_set_fails_only_its_request(tmp_path, trained):
    """(d) An eval set without the run's answer column, or one that does not exist, fails its
    request with a one-line error naming the set and the column; nothing complete-looking is
    left; the other requests (one with a good eval set) are done."""
    t = trained
    bad = tmp_path / "no-answer.jsonl"
    bad.write_text("".join(json.dumps({"author": r["author"], "prompt": r["prompt"]}) + "\n"
                           for r in t["rows"]))
    missing = str(tmp_path / "nowhere.parquet")
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        request(t, "good", [t["authors"][0]], tmp_path / "good", eval=t["eval"]),
        request(t, "bad", [t["authors"][0]], tmp_path / "bad", eval=str(bad)),
        request(t, "missing", [t["authors"][1]], tmp_path / "missing", eval=missing,
                format="peft"),
        request(t, "plain", [t["authors"][1]], tmp_path / "plain")]))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["done", "failed", "failed", "done"], rows
    assert "'answer'" in rows[1]["error"] and str(bad) in rows[1]["error"]
    assert missing in rows[2]["error"]
    assert all("\n" not in r["error"] for r in rows[1:3])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "missing").exists()
    assert rows[0]["forget_loss_edited"] is not None and rows[1]["forget_loss_edited"] is None


def test_peft_requests_report_the_dense_edit(tmp_path, trained):
    """(e) A peft request's ``adapter_meta.json`` carries the eval of the dense edit, said so,
    equal to the full request's of the same edit; the adapter itself is the one written
    without eval."""
    t, forget = trained, trained["authors"][:2]
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        request(t, "lora", forget, tmp_path / "lora", eval=t["eval"], format="peft"),
        request(t, "lora-plain", forget, tmp_path / "lora-plain", format="peft"),
        request(t, "full", forget, tmp_path / "full", eval=t["eval"])]))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["done"] * 3, rows
    ev = marker_eval(tmp_path / "lora", "adapter_meta.json")
    assert ev["model"] == "dense edit" and rows[0]["eval_model"] == "dense edit"
    full = marker_eval(tmp_path / "full")
    assert {s: ev[s] for s in ("forget", "retain")} == {s: full[s] for s in ("forget", "retain")}
    a = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "lora-plain" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def features_run(tmp_path_factory):
    """A run of an MLP factory (engram-ray's own) on feature vectors: no tokens to score."""
    from safetensors.torch import save_file

    from engram_ray.models.sequential import mlp

    tmp = tmp_path_factory.mktemp("features")
    net = mlp([4, 8, 3], seed=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "w.safetensors"))
    rng = np.random.default_rng(0)
    pq.write_table(pa.Table.from_pylist([{"concept": ["a", "b"][i % 2],
                                          "x": rng.normal(size=4).tolist()} for i in range(20)]),
                   tmp / "d.parquet")
    cfg = ExtractConfig.from_dict({
        "model": {"factory": "engram_ray.models.sequential:mlp", "weights": str(tmp / "w.safetensors"),
                  "kwargs": {"sizes": [4, 8, 3]}},
        "data": {"paths": [str(tmp / "d.parquet")], "features_column": "x"},
        "store": {"uri": str(tmp / "runs"), "run_id": "f"}})
    return extract_from_config(cfg, log=open(os.devnull, "w")).uri, str(tmp / "d.parquet")


def test_a_run_that_cannot_be_scored_fails_only_its_eval_requests(tmp_path, features_run):
    """A factory model (no tokenizer) on feature vectors: its eval requests fail naming the
    eval set and why, the request without eval is written."""
    run, data = features_run
    reqs = read_requests(write_requests(tmp_path / "r.jsonl", [
        {"request_id": "ev", "run": run, "concepts": "a", "out": str(tmp_path / "ev"),
         "eval": data},
        {"request_id": "plain", "run": run, "concepts": "a", "out": str(tmp_path / "plain")}]))
    rows = run_batch(reqs)
    assert [r["status"] for r in rows] == ["failed", "done"], rows
    assert data in rows[0]["error"] and "factory" in rows[0]["error"]
    assert not (tmp_path / "ev").exists() and (tmp_path / "plain" / "edit.json").exists()


@pytest.mark.parametrize("value", [5, "", ["a.parquet"], True])
def test_the_eval_column_is_validated(tmp_path, value):
    path = write_requests(tmp_path / "bad.jsonl", [
        {"request_id": "a", "run": "r", "concepts": ["c"], "out": "o", "eval": value}])
    with pytest.raises(ValueError, match=r"bad.jsonl, row 0 \(request_id 'a'\): column 'eval'"):
        read_requests(path)
