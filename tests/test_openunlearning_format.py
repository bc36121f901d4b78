"""OpenUnlearning's TOFU_EVAL.json / TOFU_SUMMARY.json from per-row scores (issue 23): forget
quality against a hand-written retain log equals scipy's KS test on the same numbers, and every
other number equals its formula written out here, independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from engram_ray.eval.lm_scores import QAScores, TokenScores
from engram_ray.eval.openunlearning import (
    SUITE_METRICS,
    eval_logs,
    read_retain_logs,
    rouge_scores,
    summarize,
    write_logs,
)


def scores(nlls, hits=None, para=None, pert=None, gens=None, answers=None):
    """QAScores whose answer NLLs are ``nlls`` (each row one token per entry of its hits)."""
    rows = []
    for i, v in enumerate(nlls):
        h = np.asarray(hits[i] if hits is not None else [True, True], dtype=bool)
        lp = np.full(h.size, -v)
        rows.append(TokenScores(lp, h, np.zeros(h.size), np.ones(h.size)))
    n = len(nlls)
    answers = answers or [f"born in city {i}" for i in range(n)]
    return QAScores(questions=[f"q{i}" for i in range(n)], answers=answers, tokens=rows,
                    generations=gens if gens is not None else list(answers),
                    paraphrased_nll=None if para is None else np.asarray(para, dtype=float),
                    perturbed_nll=None if pert is None else [np.asarray(p, float) for p in pert])


FORGET = scores([0.2, 0.5, 1.0, 0.1], hits=[[True, False, True], [True, True, True],
                                             [False, True, False], [True, True, False]],
                para=[0.3, 0.4, 1.2, 0.2], pert=[[1.0, 2.0], [0.5, 0.7], [1.1, 0.9], [3.0, 1.0]],
                gens=["born in city 0", "born in paris", "", "city 3 born in"])
RETAIN = scores([0.1, 0.3, 0.2], para=[0.2, 0.3, 0.4], pert=[[1.5], [0.2], [2.0]])
# A retain model's log as OpenUnlearning writes it (only what forget quality and privleak read).
RETAIN_LOG = {
    "forget_truth_ratio": {"agg_value": 0.61, "value_by_index": {
        "0": {"score": 0.93}, "1": {"score": 1.21}, "2": {"score": 0.58}, "3": {"score": 0.77}}},
    "mia_min_k": {"agg_value": 0.44, "auc": 0.44},
    "model_utility": {"agg_value": 0.52},
}


def truth_ratios(para, pert):
    return np.array([np.exp(-np.mean(w)) / (np.exp(-c) + 1e-10) for c, w in zip(para, pert)])


def test_forget_quality_is_scipys_ks_test_against_a_hand_written_retain_log(tmp_path):
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(RETAIN_LOG, indent=4))
    ref = read_retain_logs(str(path), forget_rows=4)
    logs = eval_logs(FORGET, RETAIN, retain_logs=ref)
    tr = truth_ratios([0.3, 0.4, 1.2, 0.2], [[1.0, 2.0], [0.5, 0.7], [1.1, 0.9], [3.0, 1.0]])
    mine = [logs["forget_truth_ratio"]["value_by_index"][str(i)]["score"] for i in range(4)]
    np.testing.assert_allclose(mine, tr, rtol=1e-12)
    want = stats.ks_2samp(tr, [0.93, 1.21, 0.58, 0.77]).pvalue
    assert logs["forget_quality"]["agg_value"] == pytest.approx(want, rel=1e-12)
    assert logs["forget_truth_ratio"]["agg_value"] == pytest.approx(
        np.mean(np.minimum(tr, 1 / (tr + 1e-10))))
    # No retain log: forget quality has no value and stays out of the summary, as OpenUnlearning.
    alone = eval_logs(FORGET, RETAIN)
    assert alone["forget_quality"] == {"agg_value": None}
    assert "forget_quality" not in summarize(alone)


def test_every_number_equals_its_formula():
    logs = eval_logs(FORGET, RETAIN)
    assert logs["forget_Q_A_Prob"]["agg_value"] == pytest.approx(
        np.mean(np.exp(-np.array([0.2, 0.5, 1.0, 0.1]))))
    assert logs["forget_Q_A_Prob"]["value_by_index"]["1"] == {
        "prob": pytest.approx(np.exp(-0.5)), "avg_loss": pytest.approx(0.5)}
    assert logs["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["avg_loss"] == [1.0, 2.0]
    assert logs["forget_Q_A_PERT_Prob"]["agg_value"] == pytest.approx(np.mean(
        [np.mean(np.exp(-np.array(p))) for p in ([1.0, 2.0], [0.5, 0.7], [1.1, 0.9], [3.0, 1.0])]))
    # Extraction strength leaves the closing EOS (the last token) out: hits[:-1].
    es = [1 - 2 / 2, 1 - 0 / 2, 1 - 1 / 2, 1 - 0 / 2]
    assert logs["extraction_strength"]["agg_value"] == pytest.approx(np.mean(es))
    with_eos = eval_logs(FORGET, RETAIN, eos_scored=False)
    assert with_eos["extraction_strength"]["agg_value"] == pytest.approx(
        np.mean([1 - 2 / 3, 1.0, 1 - 3 / 3, 1 - 3 / 3]))
    rouge = [r["rougeL_recall"] for r in logs["forget_Q_A_ROUGE"]["value_by_index"].values()]
    assert rouge == pytest.approx([1.0, 2 / 4, 0.0, 2 / 4])
    rtr = truth_ratios([0.2, 0.3, 0.4], [[1.5], [0.2], [2.0]])
    assert logs["retain_Truth_Ratio"]["agg_value"] == pytest.approx(np.mean(np.maximum(0, 1 - rtr)))
    parts = [np.mean(np.exp(-np.array([0.1, 0.3, 0.2]))), 1.0, np.mean(np.maximum(0, 1 - rtr))]
    assert logs["model_utility"]["agg_value"] == pytest.approx(stats.hmean(parts))


def test_real_authors_world_facts_privleak_and_the_file_layout(tmp_path):
    ra = scores([0.2, 0.9], pert=[[1.0, 2.0, 0.5], [0.3, 0.4, 0.6]])
    wf = scores([0.4], pert=[[0.4, 0.4]])
    member = scores([0.1, 0.2, 0.05], hits=[[True, True]] * 3)
    holdout = scores([0.9, 0.15, 2.0, 1.5], hits=[[True, True]] * 4)
    logs = eval_logs(FORGET, RETAIN, real_authors=ra, world_facts=wf, mia_forget=member,
                     holdout=holdout, retain_logs=RETAIN_LOG)
    norm = [np.exp(-0.2) / (np.exp(-0.2) + np.exp(-1.0) + np.exp(-2.0) + np.exp(-0.5) + 1e-10),
            np.exp(-0.9) / (np.exp(-0.9) + np.exp(-0.3) + np.exp(-0.4) + np.exp(-0.6) + 1e-10)]
    assert logs["ra_Q_A_Prob_normalised"]["agg_value"] == pytest.approx(np.mean(norm))
    assert [logs["ra_Truth_Ratio"]["value_by_index"][i]["score"] for i in ("0", "1")] == \
        pytest.approx(truth_ratios([0.2, 0.9], [[1.0, 2.0, 0.5], [0.3, 0.4, 0.6]]))
    assert len([k for k in logs if k.startswith(("retain_", "ra_", "wf_")) and k.endswith(
        ("Q_A_Prob", "ROUGE", "Truth_Ratio", "normalised"))]) == 11
    # Min-k (k = 0.4) of a constant row is its NLL; AUC: holdout (label 1) above forget.
    auc = np.mean([(h > f) + 0.5 * (h == f) for f in (0.1, 0.2, 0.05)
                   for h in (0.9, 0.15, 2.0, 1.5)])
    assert logs["mia_min_k"]["auc"] == logs["mia_min_k"]["agg_value"] == pytest.approx(auc)
    assert logs["privleak"]["agg_value"] == pytest.approx(
        ((1 - auc) - (1 - 0.44)) / (1 - 0.44 + 1e-10) * 100)
    no_ref = eval_logs(FORGET, RETAIN, mia_forget=member, holdout=holdout)
    assert no_ref["privleak"]["agg_value"] == pytest.approx(((1 - auc) - 0.5) / 0.5 * 100)
    eval_path, summary_path = write_logs(str(tmp_path / "out"), logs)
    text = open(eval_path).read()
    assert text.startswith('{\n    "extraction_strength"')  # sorted keys, indent 4
    summary = json.loads(open(summary_path).read())
    assert list(summary) == sorted(SUITE_METRICS)
    assert summary["forget_quality"] == logs["forget_quality"]["agg_value"]
    assert json.loads(text)["mia_min_k"]["forget"]["value_by_index"]["2"] == {"score": 0.05}


@pytest.mark.parametrize("log, match", [
    ({"model_utility": {"agg_value": 1}}, "no forget_truth_ratio.value_by_index"),
    ({"forget_truth_ratio": {"value_by_index": {"0": {"score": "x"}}}},
     r"value_by_index\['0'\].score is not a finite number"),
    ({"forget_truth_ratio": {"value_by_index": {str(i): {"score": 1.0} for i in range(3)}}},
     "has 3 rows but the forget split has 4"),
    ({"forget_truth_ratio": {"value_by_index": {str(i): {"score": 1.0} for i in range(4)}},
      "mia_min_k": {"agg_value": None}}, "mia_min_k.agg_value is not a finite number"),
])
def test_a_bad_retain_log_is_one_error_naming_the_file_and_key(tmp_path, log, match):
    path = tmp_path / "retain.json"
    path.write_text(json.dumps(log))
    with pytest.raises(ValueError, match=match) as e:
        read_retain_logs(str(path), forget_rows=4)
    assert str(path) in str(e.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        read_retain_logs(str(path))


def test_rouge_scores_by_hand():
    r = rouge_scores("The cat sat on the mat", "the mat the cat")
    # ref: the cat sat on the mat (6); gen: the mat the cat (4); LCS "the cat" / "the mat" = 2.
    assert r["rougeL_recall"] == pytest.approx(2 / 6)
    assert r["rougeL_f1"] == pytest.approx(2 * (2 / 4) * (2 / 6) / (2 / 4 + 2 / 6))
    assert r["rouge1_recall"] == pytest.approx(4 / 6)  # the, cat, the, mat (clipped counts)
    assert rouge_scores("x", "") == {"rouge1_recall": 0.0, "rougeL_f1": 0.0, "rougeL_recall": 0.0}
