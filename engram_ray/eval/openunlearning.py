"""TOFU evaluation logs in OpenUnlearning's format: ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json``.

OpenUnlearning (locuslab/open-unlearning) is what people who evaluate unlearning on TOFU run.
Its TOFU suite writes two files into the eval directory:

* ``TOFU_EVAL.json``: one entry per metric it computed *and every metric those were computed
  from*, keys sorted, each ``{"agg_value": x, "value_by_index": {"<row>": {...}}}`` where
  ``<row>`` is the row's index in its split file (0-based, as a string once in JSON);
* ``TOFU_SUMMARY.json``: ``{metric: agg_value}`` for the suite's own metrics only, those whose
  value is not ``None`` (so ``forget_quality`` is absent when no retain log was given).

The suite's metrics (its default ``eval/tofu.yaml``) and what they are built from:

========================  ==========================================================================
``forget_Q_A_Prob``        per row ``prob = exp(-avg_loss)``, ``avg_loss`` the mean NLL of the answer
                           tokens (the closing EOS / end-of-turn token included); mean over rows
``forget_Q_A_ROUGE``       ROUGE-L recall of the greedy answer against the reference; mean
``forget_truth_ratio``     per row ``R = exp(-mean_j avg_loss(perturbed_j)) / (exp(-avg_loss(para))
                           + 1e-10)`` (the perturbed answers' *losses* are averaged: a geometric
                           mean of probabilities); aggregate ``mean(min(R, 1/(R + 1e-10)))``
``forget_quality``         p-value of ``scipy.stats.ks_2samp`` between this model's forget-set ``R``
                           values and the retain model's (``forget_truth_ratio.value_by_index`` of
                           the retain model's ``TOFU_EVAL.json``, the ``retain_logs_path``)
``model_utility``          harmonic mean of ``retain_Q_A_Prob``, ``retain_Q_A_ROUGE``,
                           ``retain_Truth_Ratio`` (``mean(max(0, 1 - R))``), and for real authors
                           (``ra_``) and world facts (``wf_``): ``*_Q_A_Prob_normalised`` (``p / (p +
                           Σ_j p_j + 1e-10)`` over the answer and its perturbations), ``*_Q_A_ROUGE``,
                           ``*_Truth_Ratio`` (the answer itself as the correct one)
``privleak``               ``(s - r) / (r + 1e-10) · 100`` with ``s = 1 - AUC`` of the Min-k% (k = 0.4)
                           attack separating forget (label 0) from holdout (label 1) rows and ``r = 1 -``
                           the retain model's AUC from its log (``mia_min_k.agg_value``), or ``r = 0.5``
``extraction_strength``    ``1 - k/n`` with ``k`` the shortest answer prefix after which the
                           teacher-forced argmax is right to the end; the closing EOS is not counted
========================  ==========================================================================

The forget-set numbers use ``forgetXX_perturbed`` (question, answer, paraphrased_answer,
perturbed_answer), the retain numbers ``retain_perturbed``, the MIA ``forgetXX`` and
``holdoutXX``. Differences from OpenUnlearning, stated so numbers are read right: ROUGE here
tokenizes as :func:`engram_ray.eval.tofu.rouge_tokenize` (no Porter stemmer: ``rouge-score`` is
not a dependency), and a split that is absent (``real_authors*``, ``world_facts*``,
``holdoutXX``) leaves its metrics out; ``model_utility`` is then the harmonic mean of what is
there (:data:`UTILITY_PARTS` names all nine).

Per-row scores come from :mod:`engram_ray.eval.lm_scores` (:class:`QAScores`); this module is
pure numbers and JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

from engram_ray.eval import tofu

__all__ = [
    "EPS",
    "SUITE_METRICS",
    "UTILITY_PARTS",
    "eval_logs",
    "forget_quality_from_logs",
    "read_retain_logs",
    "rouge_scores",
    "summarize",
    "truth_ratios",
    "write_logs",
]

EPS = 1e-10  # OpenUnlearning's guard in its ratios
SUITE_METRICS = ("extraction_strength", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_quality",
                 "forget_truth_ratio", "model_utility", "privleak")
UTILITY_PARTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                 "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                 "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")


def _by_index(values) -> dict[str, Any]:
    return {str(i): v for i, v in enumerate(values)}


def _prob_entry(nll: np.ndarray) -> dict:
    """``probability``: per row ``{"prob", "avg_loss"}``; the mean of ``prob``."""
    nll = np.asarray(nll, dtype=np.float64)
    prob = np.exp(-nll)
    return {"agg_value": float(prob.mean()),
            "value_by_index": _by_index({"prob": float(p), "avg_loss": float(v)}
                                        for p, v in zip(prob, nll))}


def _multi_prob_entry(nlls: list[np.ndarray]) -> dict:
    """``probability`` over several answers per row: lists per row; the mean over rows of
    each row's mean ``prob``."""
    rows = [np.asarray(v, dtype=np.float64) for v in nlls]
    return {"agg_value": float(np.mean([np.exp(-v).mean() for v in rows])),
            "value_by_index": _by_index({"prob": np.exp(-v).tolist(), "avg_loss": v.tolist()}
                                        for v in rows)}


def truth_ratios(correct_nll, wrong_nlls) -> np.ndarray:
    """Per row ``exp(-mean_j wrong_j) / (exp(-correct) + EPS)`` (OpenUnlearning's ``truth_ratio``)."""
    wrong = np.array([np.asarray(v, dtype=np.float64).mean() for v in wrong_nlls])
    return np.exp(-wrong) / (np.exp(-np.asarray(correct_nll, dtype=np.float64)) + EPS)


_ratios = truth_ratios


def _truth_ratio_entry(ratios: np.ndarray, forget: bool) -> dict:
    agg = (np.mean(np.minimum(ratios, 1.0 / (ratios + EPS))) if forget
           else np.mean(np.maximum(0.0, 1.0 - ratios)))
    return {"agg_value": float(agg),
            "value_by_index": _by_index({"score": float(r)} for r in ratios)}


def rouge_scores(reference: str, generation: str) -> dict[str, float]:
    """``rouge1_recall``, ``rougeL_f1`` and ``rougeL_recall`` of ``generation`` against
    ``reference`` on :func:`~engram_ray.eval.tofu.rouge_tokenize` tokens: ROUGE-1 recall is the
    clipped unigram overlap over ``|ref|``; ROUGE-L uses the LCS (``P = LCS/|gen|``, ``R =
    LCS/|ref|``, ``F1 = 2PR/(P+R)``); all 0 when either side has no token."""
    ref, gen = tofu.rouge_tokenize(reference), tofu.rouge_tokenize(generation)
    if not ref or not gen:
        return {"rouge1_recall": 0.0, "rougeL_f1": 0.0, "rougeL_recall": 0.0}
    counts: dict[str, int] = {}
    for t in gen:
        counts[t] = counts.get(t, 0) + 1
    overlap = 0
    for t in ref:
        if counts.get(t, 0) > 0:
            counts[t] -= 1
            overlap += 1
    lcs = tofu.lcs_length(ref, gen)
    p, r = lcs / len(gen), lcs / len(ref)
    return {"rouge1_recall": overlap / len(ref), "rougeL_f1": 0.0 if lcs == 0 else 2 * p * r / (p + r),
            "rougeL_recall": r}


def _rouge_entry(scores) -> dict:
    rows = [{**rouge_scores(a, g), "input": q, "ground_truth": a, "generation": g}
            for q, a, g in zip(scores.questions, scores.answers, scores.generations)]
    return {"agg_value": float(np.mean([r["rougeL_recall"] for r in rows])),
            "value_by_index": _by_index(rows)}


def _hits(t, drop_last: bool) -> np.ndarray:
    return t.hits[:-1] if drop_last and t.hits.size > 1 else t.hits


def _token_entry(scores, fn, drop_last: bool) -> dict:
    vals = [float(fn(_hits(t, drop_last))) for t in scores.tokens]
    return {"agg_value": float(np.mean(vals)), "value_by_index": _by_index({"score": v} for v in vals)}


def _mia_entry(forget, holdout, k: float) -> dict:
    """``mia_min_k``: per-row Min-k% scores of both sets and the AUC (forget label 0)."""
    f = np.array([tofu.min_k_score(t.logprobs, k) for t in forget.tokens])
    h = np.array([tofu.min_k_score(t.logprobs, k) for t in holdout.tokens])
    auc = tofu.mia_auc(f, h)
    part = {"forget": f, "holdout": h}
    out: dict[str, Any] = {name: {"agg_value": float(v.mean()),
                                  "value_by_index": _by_index({"score": float(s)} for s in v)}
                           for name, v in part.items()}
    out["auc"] = out["agg_value"] = auc
    return out


def _options(prefix: str, scores, logs: dict) -> None:
    """The ``ra_`` / ``wf_`` entries: the answer against its perturbations."""
    logs[f"{prefix}_Q_A_Prob"] = _prob_entry(scores.nll)
    logs[f"{prefix}_Q_A_PERT_Prob"] = _multi_prob_entry(scores.perturbed_nll)
    correct = np.exp(-scores.nll)
    wrong = np.array([np.exp(-np.asarray(v)).sum() for v in scores.perturbed_nll])
    norm = correct / (correct + wrong + EPS)
    logs[f"{prefix}_Q_A_Prob_normalised"] = {
        "agg_value": float(norm.mean()), "value_by_index": _by_index({"prob": float(p)} for p in norm)}
    if scores.generations is not None:
        logs[f"{prefix}_Q_A_ROUGE"] = _rouge_entry(scores)
    logs[f"{prefix}_Truth_Ratio"] = _truth_ratio_entry(
        _ratios(scores.nll, scores.perturbed_nll), forget=False)


def _need(scores, name: str, *attrs: str) -> None:
    for a in attrs:
        if getattr(scores, a) is None:
            col = {"paraphrased_nll": "paraphrased_answer", "perturbed_nll": "perturbed_answer",
                   "generations": "generations"}[a]
            raise ValueError(f"{name}: no {col} scores (the split needs that column)")


def eval_logs(
    forget,
    retain,
    *,
    mia_forget=None,
    holdout=None,
    real_authors=None,
    world_facts=None,
    retain_logs: Mapping | None = None,
    eos_scored: bool = True,
    k: float = 0.4,
) -> dict[str, dict]:
    """The ``TOFU_EVAL.json`` dict of one model from its per-row :class:`QAScores`.

    ``forget``: scores on ``forgetXX_perturbed`` (with generations, paraphrased and perturbed
    NLLs); ``retain``: on ``retain_perturbed``; ``mia_forget`` / ``holdout``: teacher-forced
    scores on ``forgetXX`` / ``holdoutXX`` (the MIA; both or neither); ``real_authors`` /
    ``world_facts``: on the ``*_perturbed`` files. ``retain_logs``: the retain model's
    ``TOFU_EVAL.json`` (:func:`read_retain_logs`) for ``forget_quality`` and ``privleak``.
    ``eos_scored``: the answers' last token is the closing EOS, left out of EM/ES as
    OpenUnlearning does.
    """
    _need(forget, "forget split", "paraphrased_nll", "perturbed_nll", "generations")
    _need(retain, "retain_perturbed", "paraphrased_nll", "perturbed_nll", "generations")
    logs: dict[str, dict] = {}
    logs["forget_Q_A_Prob"] = _prob_entry(forget.nll)
    logs["forget_Q_A_PARA_Prob"] = _prob_entry(forget.paraphrased_nll)
    logs["forget_Q_A_PERT_Prob"] = _multi_prob_entry(forget.perturbed_nll)
    logs["forget_Q_A_ROUGE"] = _rouge_entry(forget)
    ratios = _ratios(forget.paraphrased_nll, forget.perturbed_nll)
    logs["forget_truth_ratio"] = _truth_ratio_entry(ratios, forget=True)
    logs["forget_quality"] = {"agg_value": None if retain_logs is None else
                              forget_quality_from_logs(logs, retain_logs)}
    logs["extraction_strength"] = _token_entry(forget, tofu.extraction_strength, eos_scored)
    logs["retain_Q_A_Prob"] = _prob_entry(retain.nll)
    logs["retain_Q_A_PARA_Prob"] = _prob_entry(retain.paraphrased_nll)
    logs["retain_Q_A_PERT_Prob"] = _multi_prob_entry(retain.perturbed_nll)
    logs["retain_Q_A_ROUGE"] = _rouge_entry(retain)
    logs["retain_Truth_Ratio"] = _truth_ratio_entry(
        _ratios(retain.paraphrased_nll, retain.perturbed_nll), forget=False)
    for prefix, scores in (("ra", real_authors), ("wf", world_facts)):
        if scores is not None:
            _need(scores, f"{prefix} split", "perturbed_nll", "generations")
            _options(prefix, scores, logs)
    parts = [logs[p]["agg_value"] for p in UTILITY_PARTS if p in logs]
    logs["model_utility"] = {"agg_value": tofu.harmonic_mean(parts)}
    if (mia_forget is None) != (holdout is None):
        raise ValueError("the MIA needs both the forget rows and the holdout rows")
    if holdout is not None:
        logs["mia_min_k"] = _mia_entry(mia_forget, holdout, k)
        ref = 0.5
        if retain_logs is not None and retain_logs.get("mia_min_k") is not None:
            ref = float(retain_logs["mia_min_k"]["agg_value"])
        s, r = 1.0 - logs["mia_min_k"]["agg_value"], 1.0 - ref
        logs["privleak"] = {"agg_value": (s - r) / (r + EPS) * 100.0}
    return dict(sorted(logs.items()))


def forget_quality_from_logs(logs: Mapping, retain_logs: Mapping) -> float:
    """KS-test p-value between the ``forget_truth_ratio`` per-row scores of two logs."""
    mine = [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
    ref = [v["score"] for v in retain_logs["forget_truth_ratio"]["value_by_index"].values()]
    return float(stats.ks_2samp(np.asarray(mine), np.asarray(ref)).pvalue)


def summarize(logs: Mapping) -> dict[str, float]:
    """``TOFU_SUMMARY.json``: the suite's metrics with a value, keys sorted."""
    return {k: logs[k]["agg_value"] for k in sorted(logs)
            if k in SUITE_METRICS and logs[k].get("agg_value") is not None}


def read_retain_logs(path: str, storage_options: Mapping | None = None,
                     forget_rows: int | None = None) -> dict:
    """A retain model's ``TOFU_EVAL.json`` (local or ``s3://``), checked for what forget
    quality needs: ``forget_truth_ratio.value_by_index`` of finite ``score`` numbers (as many
    as ``forget_rows`` when given: a log of another split is refused), and ``mia_min_k``'s
    ``agg_value`` when present. A ``ValueError`` names the file and the key otherwise."""
    from engram_ray.io.storage import Storage

    try:
        logs = json.loads(Storage(path, storage_options).read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"retain log {path}: cannot read it as JSON ({e})") from None
    if not isinstance(logs, dict):
        raise ValueError(f"retain log {path}: expected a JSON object of metrics")
    tr = logs.get("forget_truth_ratio")
    if not isinstance(tr, dict) or not isinstance(tr.get("value_by_index"), dict) \
            or not tr["value_by_index"]:
        raise ValueError(f"retain log {path}: no forget_truth_ratio.value_by_index (an "
                         "OpenUnlearning TOFU_EVAL.json of the retain model is needed)")
    for idx, v in tr["value_by_index"].items():
        s = v.get("score") if isinstance(v, dict) else None
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"retain log {path}: forget_truth_ratio.value_by_index[{idx!r}]."
                             f"score is not a finite number ({s!r})")
    n = len(tr["value_by_index"])
    if forget_rows is not None and n != forget_rows:
        raise ValueError(f"retain log {path}: forget_truth_ratio has {n} rows but the forget "
                         f"split has {forget_rows} (a log of another split?)")
    mia = logs.get("mia_min_k")
    if mia is not None:
        a = mia.get("agg_value") if isinstance(mia, dict) else None
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"retain log {path}: mia_min_k.agg_value is not a finite number")
    return logs


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def write_logs(out_dir: str, logs: Mapping) -> tuple[str, str]:
    """Write ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` (keys sorted, indent 4, as
    OpenUnlearning does) into the local directory ``out_dir``; returns both paths. Each file
    is written to a temporary name and renamed, so a reader never sees half a file."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, data in (("TOFU_EVAL.json", dict(sorted(logs.items()))),
                       ("TOFU_SUMMARY.json", summarize(logs))):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            json.dump(_plain(data), f, indent=4)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths[0], paths[1]
