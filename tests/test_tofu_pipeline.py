"""``engram-ray tofu`` (issue 23): TOFU's published file layout read and checked (author concepts
from row order), the prompt format, and the whole pipeline on synthetic TOFU-layout data with
tiny Llamas trained by ``eval/train_lm.py``: OpenUnlearning's files out, forget01 forgotten."""

from __future__ import annotations

import json
import math
import os

import pytest

from engram_ray.cli import main
from engram_ray.eval.lm_scores import QATemplate, encode_qa
from engram_ray.eval.openunlearning import SUITE_METRICS
from pipelines.tofu import (
    LLAMA3_TEMPLATE_ARGS,
    author_name,
    load_tofu,
    render_prompt,
    select_alpha,
    template_for,
)
from pipelines.tofu_synth import QA_PER_AUTHOR, train_models, write_synthetic_tofu


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu-synth")
    write_synthetic_tofu(str(root / "data"), n_authors=4, extras=True)
    return root


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def dump(path, rs):
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))


def copy_data(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_synthetic_files_have_tofus_layout(synth):
    d = synth / "data"
    names = sorted(os.listdir(d))
    assert {"full.json", "forget01.json", "forget01_perturbed.json", "retain99.json",
            "retain_perturbed.json", "holdout01.json", "forget05.json", "retain95.json",
            "forget10.json", "retain90.json"} <= set(names)
    full = rows(d / "full.json")
    assert len(full) == 4 * QA_PER_AUTHOR and set(full[0]) == {"question", "answer"}
    for split, k in (("forget01", 1), ("forget05", 2), ("forget10", 3)):
        assert rows(d / f"{split}.json") == full[-k * QA_PER_AUTHOR:]
        pct = int(split[-2:])
        assert rows(d / f"retain{100 - pct}.json") == full[: -k * QA_PER_AUTHOR]
    pert = rows(d / "forget01_perturbed.json")
    assert set(pert[0]) == {"question", "answer", "paraphrased_answer", "perturbed_answer"}
    assert all(len(r["perturbed_answer"]) == 3 for r in pert)
    assert not {r["question"] for r in rows(d / "holdout01.json")} & {r["question"] for r in full}


def test_author_concepts_follow_row_order_and_match_the_split_sizes(synth):
    data = load_tofu(str(synth / "data"), ["forget01", "forget10"])
    assert data.n_authors == 4
    assert data.forget_authors == {"forget01": ["author_003"],
                                   "forget10": ["author_001", "author_002", "author_003"]}
    assert data.forget["forget01"] == data.full[3 * QA_PER_AUTHOR:] and author_name(3) == "author_003"
    assert len(data.holdout["forget01"]) == QA_PER_AUTHOR
    assert len(data.real_authors) == 3 and len(data.world_facts) == 2


@pytest.mark.parametrize("change, match", [
    (lambda d: dump(d / "full.json", rows(d / "full.json")[:-1]),
     r"full.json: 79 rows is not a whole number of authors at 20 QA rows each"),
    (lambda d: dump(d / "forget01.json", rows(d / "forget01.json")[:-1]),
     r"forget01.json: 19 rows is not a whole number of authors"),
    (lambda d: dump(d / "forget01.json", rows(d / "full.json")[:20]),
     r"forget01.json: row 0 is not full.json row 60 \(TOFU's forget sets are the last authors"),
    (lambda d: dump(d / "retain99.json", rows(d / "full.json")[:40]),
     r"retain99.json: 40 rows, expected the 60 rows of full.json before forget01"),
    (lambda d: dump(d / "forget01_perturbed.json",
                    [{**r, "perturbed_answer": []} for r in rows(d / "forget01_perturbed.json")]),
     r"forget01_perturbed.json: row 0 has no non-empty list of strings 'perturbed_answer'"),
    (lambda d: os.remove(d / "retain_perturbed.json"), r"retain_perturbed.json: missing"),
    (lambda d: (d / "full.json").write_text("{oops\n"), r"full.json: not JSON lines"),
])
def test_bad_files_are_one_error_naming_the_file(synth, tmp_path, change, match):
    d = copy_data(synth / "data", tmp_path / "d")
    change(d)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_tofu(str(d), ["forget01"])


def test_published_sizes_are_checked_against_the_split_percentage(tmp_path):
    """With TOFU's 200 authors, forgetXX must hold XX % of them (2 / 10 / 20 authors)."""
    full = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4000)]
    pert = [{**r, "paraphrased_answer": "p", "perturbed_answer": ["x"]} for r in full]
    dump(tmp_path / "full.json", full)
    dump(tmp_path / "retain_perturbed.json", pert[:400])
    dump(tmp_path / "forget05.json", full[-400:])  # forget10's size under forget05's name
    dump(tmp_path / "forget05_perturbed.json", pert[-400:])
    with pytest.raises(ValueError, match=r"forget05.json: 20 authors, but forget05 is 5% of "
                                         r"full.json's 200 authors \(10\)"):
        load_tofu(str(tmp_path), ["forget05"])
    dump(tmp_path / "forget10.json", full[-400:])
    (tmp_path / "forget10_perturbed.json").write_text(
        "[" + ",".join(json.dumps(r) for r in pert[-400:]) + "]")  # one JSON array also reads
    data = load_tofu(str(tmp_path), ["forget10"])
    assert data.forget_authors["forget10"] == [author_name(i) for i in range(180, 200)]
    with pytest.raises(ValueError, match="expected forgetXX"):
        load_tofu(str(tmp_path), ["retain90"])


def chat_tokenizer(with_bos_in_template: bool):
    from engram_ray.models.tiny import build_tokenizer

    tok = build_tokenizer(["Question: where was Ivo born? user system assistant date"], 200)
    bos = "{{ bos_token }}" if with_bos_in_template else ""
    tok.chat_template = (
        bos + "{% if date_string is defined %}[{{ date_string }}]{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


def test_rendered_prompt_tokenizes_as_the_evaluated_prompt():
    """Extraction tokenizes the rendered prompt text with special tokens; evaluation applies
    the chat template to ids. With a template that writes the BOS (Llama-3's) both give the
    same ids, one BOS, with the date string. A template without BOS on a tokenizer that adds
    one cannot be rendered so (the text gains the BOS): the pipeline refuses it (``_extract``
    compares the two) and ``--template-args`` is the way out."""
    tok = chat_tokenizer(True)
    template = template_for(tok)
    assert template.chat and template.system_prompt == LLAMA3_TEMPLATE_ARGS["system_prompt"]
    assert template.answer == "{answer}" and template.append_eos  # the turn is the answer
    text = render_prompt(tok, template, "where was Ivo born?")
    ids = encode_qa(tok, "where was Ivo born?", "Oslo", template)[0]
    assert list(tok(text).input_ids) == ids
    assert ids.count(tok.bos_token_id) == 1
    assert "[10 Apr 2025]" in tok.decode(ids)
    tok = chat_tokenizer(False)
    ids = encode_qa(tok, "where was Ivo born?", "Oslo", template)[0]
    assert list(tok(render_prompt(tok, template, "where was Ivo born?")).input_ids) == \
        [tok.bos_token_id, *ids]


def test_template_args_as_openunlearning_writes_them():
    from engram_ray.models.tiny import build_tokenizer

    tok = build_tokenizer()
    assert template_for(tok) == QATemplate(append_eos=True)  # no chat template: TOFU's tags
    phi = template_for(tok, {"apply_chat_template": False, "user_start_tag": "Question: ",
                             "user_end_tag": "\n", "asst_start_tag": "Answer: ",
                             "asst_end_tag": "\n\n"})
    assert phi.prompt.format(question="who {x}?") == "Question: who {x}?\nAnswer: "
    assert phi.answer == "{answer}" and phi.append_eos
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['user_tag'\]"):
        template_for(tok, {"apply_chat_template": False, "user_tag": "Q"})
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        template_for(tok, {"apply_chat_template": True})


def test_cli_errors_before_any_work(synth, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["tofu", "--data", str(synth / "data"), "--model", str(tmp_path / "none"),
               "--split", "forget01", "--split", "forget05", "--retain-logs", "x.json",
               "--out", str(out)])
    assert rc == 2
    assert "with several --split give SPLIT=PATH" in capsys.readouterr().err
    bad = tmp_path / "retain.json"
    bad.write_text(json.dumps({"forget_truth_ratio": {"value_by_index": {"0": {"score": 1}}}}))
    rc = main(["tofu", "--data", str(synth / "data"), "--model", str(tmp_path / "none"),
               "--split", "forget01", "--retain-logs", f"forget01={bad}", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"retain log {bad}: forget_truth_ratio has 1 rows but the forget split " \
        "has 20" in err
    assert not out.exists()
    # A failure after --out was created (here: no model there) leaves nothing behind.
    rc = main(["tofu", "--data", str(synth / "data"), "--model", str(tmp_path / "none"),
               "--split", "forget01", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "engram-ray tofu: error: model" in err and str(tmp_path / "none") in err
    assert not out.exists()
    out.mkdir()
    assert main(["tofu", "--data", str(synth / "data"), "--model", str(tmp_path / "none"),
                 "--split", "forget01", "--out", str(out)]) == 2
    assert out.is_dir() and not os.listdir(out)


@pytest.fixture(scope="module")
def trained(synth):
    """A tiny Llama trained on full.json, one on retain99.json, and the latter's TOFU_EVAL.json
    written by ``engram-ray tofu --eval-only`` (the retain log)."""
    from engram_ray.eval.train_lm import torch_threads

    data = str(synth / "data")
    with torch_threads(1):  # tiny models: one thread is fastest (train_lm.torch_threads)
        models = train_models(data, str(synth / "models"), ("retain99",))
        assert main(["tofu", "--data", data, "--model", models["retain99"], "--split",
                     "forget01", "--eval-only", "--out", str(synth / "retain-eval")]) == 0
    return {"data": data, "models": models, "log": str(synth / "retain-eval" / "TOFU_EVAL.json")}


@pytest.mark.slow
def test_tofu_end_to_end_on_synthetic_data(trained, tmp_path, capsys):
    """The command a user runs, twice: the retain model's log (``--eval-only`` on a model
    trained on retain99.json, the fixture), then the full model's forget01 edit against it.

    Stated margins (this seed, measured: forget loss 0.05 → 0.94, forget quality 0.0011 →
    0.0123, model utility 0.965 → 0.936 at α = 1 with ridge 0.1): the edit raises the forget-set
    answer loss at least 5×, raises forget quality, and keeps model utility within 0.05 of the
    unedited model's."""
    from engram_ray.eval.train_lm import torch_threads

    out = tmp_path / "out"
    capsys.readouterr()
    with torch_threads(1):
        assert main(["tofu", "--data", trained["data"], "--model", trained["models"]["full"],
                     "--split", "forget01", "--alpha", "1.0", "--retain-logs", trained["log"],
                     "--local", "--set", "solver.ridge=0.1", "--keep-models",
                     "--out", str(out)]) == 0
    report = capsys.readouterr().out.strip().splitlines()[-1]
    assert report == str(out / "report.md") and os.path.getsize(out / "tofu.png") > 10_000
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert set(summary) == set(SUITE_METRICS)
    assert json.loads((out / "forget01" / "alpha_1" / "TOFU_SUMMARY.json").read_text()) == summary
    base = json.loads((out / "forget01" / "base" / "TOFU_SUMMARY.json").read_text())
    res = json.loads((out / "results.json").read_text())
    edited = next(r for r in res["rows"] if r["alpha"] == 1.0)
    unedited = next(r for r in res["rows"] if r["alpha"] is None)
    assert edited["forget_loss"] > 5 * unedited["forget_loss"], (unedited, edited)
    assert summary["forget_quality"] > base["forget_quality"], (base, summary)
    assert summary["model_utility"] > base["model_utility"] - 0.05, (base, summary)
    assert summary["forget_Q_A_Prob"] < base["forget_Q_A_Prob"]
    assert "| retain model (log) | 1 |" in (out / "report.md").read_text()
    # Per-row values against transformers' own cross-entropy on the kept edited checkpoint:
    # TOFU's plain tags, the answer and its closing EOS scored (OpenUnlearning's labels).
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    edited_dir = out / "models" / "forget01_alpha_1"
    rows_ = [json.loads(line) for line in
             open(os.path.join(trained["data"], "forget01_perturbed.json"))]
    ref = answer_losses(str(edited_dir), [(r["question"], r["answer"]) for r in rows_])
    got = [logs["forget_Q_A_Prob"]["value_by_index"][str(i)]["avg_loss"] for i in range(20)]
    assert got == pytest.approx(ref, rel=1e-4)
    r0 = rows_[0]
    para = answer_losses(str(edited_dir), [(r0["question"], r0["paraphrased_answer"])])[0]
    pert = answer_losses(str(edited_dir), [(r0["question"], a) for a in r0["perturbed_answer"]])
    tr = math.exp(-sum(pert) / len(pert)) / (math.exp(-para) + 1e-10)
    assert logs["forget_truth_ratio"]["value_by_index"]["0"]["score"] == pytest.approx(tr, rel=1e-4)


def answer_losses(model_dir: str, pairs) -> list[float]:
    """Mean NLL of `` answer`` + EOS after ``Question: q\nAnswer:``, one row at a time with
    transformers' model, tokenizer and cross-entropy (no engram-ray code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for q, a in pairs:
            p = tok(f"Question: {q}\nAnswer:")["input_ids"]
            ans = tok(f" {a}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([p + ans])).logits[0].double()
            out.append(float(torch.nn.functional.cross_entropy(
                logits[len(p) - 1:-1], torch.tensor(ans))))
    return out


def test_select_alpha_rule():
    base = {"utility": 1.0}
    c = {0.5: {"utility": 0.99, "forget_quality": 0.1, "forget_loss": 1.0},
         1.0: {"utility": 0.96, "forget_quality": 0.4, "forget_loss": 2.0},
         2.0: {"utility": 0.90, "forget_quality": 0.9, "forget_loss": 3.0}}
    assert select_alpha(base, c, 0.05)[0] == 1.0
    assert select_alpha(base, c, 0.2)[0] == 2.0
    assert select_alpha(base, c, 0.0)[0] == 0.5  # nothing keeps 1.0: the highest utility
    assert "no α kept" in select_alpha(base, c, 0.0)[1]
    no_log = {a: {**v, "forget_quality": None} for a, v in c.items()}
    assert select_alpha(base, no_log, 0.05) == (1.0, "highest validation forget_loss with "
                                                      "utility ≥ 0.95")


@pytest.mark.slow
def test_alpha_selected_on_the_validation_slice(trained, tmp_path):
    """Three α written in one batch, scored on a 20-row validation slice (forget01's whole
    forget set here), the rule applied to the recorded numbers, and only the selected α
    evaluated in full: its full-eval forget loss and forget quality are the validation ones
    (the same rows, teacher forced either way)."""
    from engram_ray.eval.train_lm import torch_threads

    out = tmp_path / "out"
    with torch_threads(1):
        assert main(["tofu", "--data", trained["data"], "--model", trained["models"]["full"],
                     "--split", "forget01", "--alpha", "0.25", "--alpha", "1.0", "--alpha", "3",
                     "--validation-rows", "20", "--retain-logs", trained["log"], "--local",
                     "--set", "solver.ridge=0.1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    val = res["validation"]["splits"]["forget01"]
    floor = 0.95 * val["unedited"]["utility"]
    ok = {float(a): v for a, v in val["alphas"].items() if v["utility"] >= floor}
    want = max(ok, key=lambda a: ok[a]["forget_quality"]) if ok else None
    assert val["selected"] == want and set(val["alphas"]) == {"0.25", "1", "3"}
    edited = [r for r in res["rows"] if r["alpha"] is not None]
    assert [r["alpha"] for r in edited] == [want]
    assert sorted(os.listdir(out / "forget01")) == ["alpha_" + f"{want:g}", "base"]
    assert edited[0]["forget_loss"] == pytest.approx(val["alphas"][f"{want:g}"]["forget_loss"],
                                                     rel=1e-9)
    assert edited[0]["forget_quality"] == pytest.approx(
        val["alphas"][f"{want:g}"]["forget_quality"], rel=1e-9)
    assert "α selected on the validation slice" in (out / "report.md").read_text()
    assert not (out / "models").exists()  # edited checkpoints removed unless --keep-models

def test_files_and_retain_log_are_read_from_s3(synth, s3_bucket):
    """A bucket copy of TOFU's files (and of a retain log) reads as the local one does."""
    from engram_ray.eval.openunlearning import read_retain_logs

    for f in os.listdir(synth / "data"):
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"tofu/{f}",
                                    Body=(synth / "data" / f).read_bytes())
    log = {"forget_truth_ratio": {"value_by_index": {str(i): {"score": 0.5} for i in range(20)}}}
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="logs/TOFU_EVAL.json",
                                Body=json.dumps(log).encode())
    remote = load_tofu(f"{s3_bucket.uri}/tofu", ["forget01", "forget05"],
                       s3_bucket.storage_options)
    local = load_tofu(str(synth / "data"), ["forget01", "forget05"])
    assert remote.full == local.full and remote.forget_authors == local.forget_authors
    assert remote.forget_perturbed == local.forget_perturbed
    assert remote.holdout == local.holdout and remote.real_authors == local.real_authors
    assert read_retain_logs(f"{s3_bucket.uri}/logs/TOFU_EVAL.json", s3_bucket.storage_options,
                            20) == log
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket.uri}/nope/full.json: missing"):
        load_tofu(f"{s3_bucket.uri}/nope", ["forget01"], s3_bucket.storage_options)


def test_template_args_flag_reads_json_or_an_openunlearning_model_config(tmp_path):
    from engram_ray.cli import _template_args

    cfg = tmp_path / "Llama-2-7b-hf.yaml"  # as OpenUnlearning's configs/model/*.yaml
    cfg.write_text('model_args:\n  pretrained_model_name_or_path: "meta-llama/Llama-2-7b-hf"\n'
                   'template_args:\n  apply_chat_template: False\n  user_start_tag: "Question: "\n'
                   '  user_end_tag: "\\n"\n  asst_start_tag: "Answer: "\n  asst_end_tag: "\\n\\n"\n')
    assert _template_args(str(cfg), None) == {
        "apply_chat_template": False, "user_start_tag": "Question: ", "user_end_tag": "\n",
        "asst_start_tag": "Answer: ", "asst_end_tag": "\n\n"}
    assert _template_args('{"apply_chat_template": true}', None) == {"apply_chat_template": True}
    assert _template_args(None, None) is None
    with pytest.raises(ValueError, match="--template-args: not valid JSON"):
        _template_args("{oops", None)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping"):
        _template_args(str(tmp_path / "list.yaml"), None)
