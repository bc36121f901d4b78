"""Per-sample TOFU scores of a HuggingFace causal LM, and the one-call evaluation on top of them.

Encoding (the ai-engram reference convention): the *prompt* is tokenized **with** the
tokenizer's special tokens (BOS for Llama-style tokenizers), the *answer* **without** them, and
the two id lists are concatenated; every loss, log-prob and argmax below is taken on the answer
tokens only. :class:`QATemplate` says how a question and an answer become text (a plain
``"Question: …\\nAnswer:"`` prompt by default, or the tokenizer's chat template); training
(:mod:`engram_ray.eval.train_lm`) uses the same encoder, so train and eval agree token for token.

One teacher-forced forward pass per batch (right padding) gives, for every answer token, its
log-prob, whether the argmax hits it (EM, ES), and the mean and standard deviation of
``log p(v)`` under the model's next-token distribution (Min-k%++). Greedy generation (left
padding, ``max_new_tokens = |answer| + margin``, cut at EOS) gives ROUGE-L. Paraphrased and
perturbed answers only need their mean NLL (truth ratio). All of it runs under
``torch.no_grad()`` in eval mode with greedy decoding, so it is deterministic.

:class:`TofuEvaluator` scores the gold (retain-only) and base (fine-tuned) anchors once, and then
turns any edited model into the full metric dict in one call; :func:`evaluate_tofu` is the
one-shot form and :func:`evaluate_tofu_dirs` loads HF directories and Parquet splits. The metric
definitions are in :mod:`engram_ray.eval.tofu`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engram_ray.eval import tofu

__all__ = [
    "DEFAULT_TEMPLATE",
    "QAScores",
    "QATemplate",
    "TofuEvaluator",
    "TofuScores",
    "as_records",
    "encode_qa",
    "evaluate_tofu",
    "evaluate_tofu_dirs",
    "greedy_generate",
    "mia_scores",
    "score_qa",
    "score_tofu",
    "split_metrics",
    "teacher_forced",
]


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class QATemplate:
    """How a QA pair becomes tokens: ``prompt`` / ``answer`` format strings, or (``chat=True``)
    the tokenizer's chat template for the prompt (with an optional system prompt, and the
    ``date_string`` that Llama-3 chat templates print, as OpenUnlearning's ``template_args``
    pass it; ``None``: the template's own default)."""

    prompt: str = "Question: {question}\nAnswer:"
    answer: str = " {answer}"
    chat: bool = False
    system_prompt: str | None = None
    append_eos: bool = False
    date_string: str | None = None


DEFAULT_TEMPLATE = QATemplate()


def _prompt_ids(tokenizer, question: str, template: QATemplate) -> list[int]:
    if not template.chat:
        return list(tokenizer(template.prompt.format(question=question)).input_ids)
    msgs = [{"role": "system", "content": template.system_prompt}] if template.system_prompt else []
    msgs.append({"role": "user", "content": question})
    extra = {"date_string": template.date_string} if template.date_string is not None else {}
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **extra)
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def encode_qa(
    tokenizer, question: str, answer: str, template: QATemplate = DEFAULT_TEMPLATE
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)``: prompt with special tokens, answer without (EOS appended
    only when ``template.append_eos``)."""
    ans = list(tokenizer(template.answer.format(answer=answer), add_special_tokens=False).input_ids)
    if template.append_eos:
        ans.append(tokenizer.eos_token_id)
    if not ans:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    return _prompt_ids(tokenizer, question, template), ans


def as_records(data: Any) -> list[dict[str, Any]]:
    """Rows as dicts from a ``pyarrow.Table``, a list of dicts, or a dict of columns."""
    if hasattr(data, "to_pylist"):
        return data.to_pylist()
    if isinstance(data, Mapping):
        cols = list(data)
        return [dict(zip(cols, vals)) for vals in zip(*(data[c] for c in cols))]
    return [dict(r) for r in data]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


# ----------------------------------------------------------------------------- model passes


@dataclass
class TokenScores:
    """Per answer token: log-prob, argmax hit, and the model distribution's log-prob mean/std."""

    logprobs: np.ndarray
    hits: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @property
    def nll(self) -> float:
        return float(-self.logprobs.mean())


@torch.no_grad()
def teacher_forced(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
    var_floor: float = 1e-6,
) -> list[TokenScores]:
    """One right-padded forward per batch; :class:`TokenScores` for each ``(prompt, answer)``.

    ``sigma`` is ``sqrt(max(Var, var_floor))`` so Min-k%++ stays finite on a one-hot prediction.
    """
    model.eval()
    dev, out = _device(model), []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        length = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, (p, a) in enumerate(chunk):
            ids[i, : len(p) + len(a)] = torch.tensor([*p, *a])
            mask[i, : len(p) + len(a)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for i, (p, a) in enumerate(chunk):
            # logits at t-1 predict the token at t: the answer's predictions start at len(p)-1.
            lp = torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(a) - 1].float(), dim=-1)
            target = torch.tensor(a, device=lp.device)
            prob = lp.exp()
            mu = (prob * lp).sum(-1)
            var = ((prob * lp * lp).sum(-1) - mu * mu).clamp_min(var_floor)
            out.append(
                TokenScores(
                    logprobs=lp.gather(-1, target[:, None])[:, 0].double().cpu().numpy(),
                    hits=(lp.argmax(-1) == target).cpu().numpy(),
                    mu=mu.double().cpu().numpy(),
                    sigma=var.sqrt().double().cpu().numpy(),
                )
            )
    return out


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations (left-padded batches), each cut at its own token limit and at EOS.

    Greedy decoding is prefix-consistent, so generating a batch to its longest limit and cutting
    each row to its own limit equals generating every prompt alone.
    """
    from transformers import GenerationConfig

    model.eval()
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    dev, out = _device(model), []
    for start in range(0, len(prompts), batch_size):
        chunk, lim = prompts[start : start + batch_size], limits[start : start + batch_size]
        length = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, length - len(p) :] = torch.tensor(list(p))
            mask[i, length - len(p) :] = 1
        cfg = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max(lim), pad_token_id=pad,
            eos_token_id=eos, bos_token_id=tokenizer.bos_token_id,
        )
        gen = model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg
        )[:, length:].tolist()
        for row, n in zip(gen, lim):
            row = row[:n]
            out.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    return out


# ----------------------------------------------------------------------------- per split


@dataclass
class QAScores:
    """Per-sample scores of one model on one QA split (arrays aligned with the rows)."""

    questions: list[str]
    answers: list[str]
    tokens: list[TokenScores]
    generations: list[str] | None = None
    paraphrased_nll: np.ndarray | None = None
    perturbed_nll: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def nll(self) -> np.ndarray:
        return np.array([t.nll for t in self.tokens])


def score_qa(
    model,
    tokenizer,
    data: Any,
    *,
    template: QATemplate = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    generate: bool = True,
    gen_margin: int = 8,
) -> QAScores:
    """Teacher-forced token scores, greedy generations and paraphrased / perturbed answer NLLs.

    ``data``: rows with ``question`` and ``answer``, optionally ``paraphrased_answer`` (str) and
    ``perturbed_answer`` (list of str); see :func:`as_records`.
    """
    rows = as_records(data)
    pad = _pad_id(tokenizer)
    enc = [encode_qa(tokenizer, r["question"], r["answer"], template) for r in rows]
    res = QAScores(
        questions=[r["question"] for r in rows],
        answers=[r["answer"] for r in rows],
        tokens=teacher_forced(model, enc, pad, batch_size),
    )
    if generate:
        ids = greedy_generate(
            model, tokenizer, [p for p, _ in enc], [len(a) + gen_margin for _, a in enc], batch_size
        )
        res.generations = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in ids]
    if rows and rows[0].get("paraphrased_answer") is not None:
        para = [encode_qa(tokenizer, r["question"], r["paraphrased_answer"], template) for r in rows]
        res.paraphrased_nll = np.array([t.nll for t in teacher_forced(model, para, pad, batch_size)])
    if rows and rows[0].get("perturbed_answer") is not None:
        flat = [(i, encode_qa(tokenizer, r["question"], a, template))
                for i, r in enumerate(rows) for a in r["perturbed_answer"]]
        nll = [t.nll for t in teacher_forced(model, [e for _, e in flat], pad, batch_size)]
        per: list[list[float]] = [[] for _ in rows]
        for (i, _), v in zip(flat, nll):
            per[i].append(v)
        res.perturbed_nll = [np.array(v) for v in per]
    return res


def mia_scores(scores: QAScores, k: float = 0.4) -> dict[str, np.ndarray]:
    """Per-sample scores of the four MIA attacks (higher = looks less like training data)."""
    nll = scores.nll
    return {
        "loss": nll,
        "zlib": np.array([tofu.zlib_score(v, a) for v, a in zip(nll, scores.answers)]),
        "min_k": np.array([tofu.min_k_score(t.logprobs, k) for t in scores.tokens]),
        "min_k_plus_plus": np.array(
            [tofu.min_k_plus_plus_score(t.logprobs, t.mu, t.sigma, k) for t in scores.tokens]
        ),
    }


def _truth_ratios(scores: QAScores, mean: str, correct: str = "paraphrased") -> np.ndarray | None:
    if scores.perturbed_nll is None:
        return None
    right = scores.paraphrased_nll if correct == "paraphrased" else None
    if right is None:
        right = scores.nll
    return tofu.truth_ratio(right, scores.perturbed_nll, mean=mean)


def split_metrics(
    scores: QAScores,
    name: str,
    *,
    forget: bool = False,
    options: bool = False,
    truth_ratio_mean: str = "geometric",
) -> dict[str, float]:
    """Split-level means ``{name}_nll/_prob/_rouge_l/_em/_es/_truth_ratio``.

    ``forget`` picks the forget-set truth-ratio convention; ``options`` (real-authors /
    world-facts style sets) normalizes ``_prob`` over the answer and its perturbations and uses
    the answer itself as the truth-ratio's correct answer.
    """
    nll = scores.nll
    out = {
        f"{name}_nll": float(nll.mean()),
        f"{name}_prob": float(np.mean(tofu.answer_probability(nll))),
        f"{name}_em": float(np.mean([tofu.exact_memorization(t.hits) for t in scores.tokens])),
        f"{name}_es": float(np.mean([tofu.extraction_strength(t.hits) for t in scores.tokens])),
    }
    if options and scores.perturbed_nll is not None:
        out[f"{name}_prob"] = float(
            np.mean(tofu.option_normalized_probability(nll, scores.perturbed_nll))
        )
    if scores.generations is not None:
        out[f"{name}_rouge_l"] = float(
            np.mean([tofu.rouge_l_recall(a, g) for a, g in zip(scores.answers, scores.generations)])
        )
    ratios = _truth_ratios(scores, truth_ratio_mean, "answer" if options else "paraphrased")
    if ratios is not None:
        out[f"{name}_truth_ratio"] = tofu.truth_ratio_score(ratios, forget=forget)
    return out


# ----------------------------------------------------------------------------- TOFU


@dataclass
class TofuScores:
    """One model's :class:`QAScores` on every split (computed once, reusable as an anchor)."""

    forget: QAScores
    retain: QAScores
    holdout: QAScores
    extra: dict[str, QAScores] = field(default_factory=dict)


def score_tofu(
    model,
    tokenizer,
    forget: Any,
    retain: Any,
    holdout: Any,
    extra_utility_sets: Mapping[str, Any] | None = None,
    *,
    template: QATemplate = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    gen_margin: int = 8,
) -> TofuScores:
    """:func:`score_qa` on the forget, retain, holdout and any extra utility splits."""
    kw = {"template": template, "batch_size": batch_size, "gen_margin": gen_margin}
    return TofuScores(
        forget=score_qa(model, tokenizer, forget, **kw),
        retain=score_qa(model, tokenizer, retain, **kw),
        holdout=score_qa(model, tokenizer, holdout, **kw),
        extra={k: score_qa(model, tokenizer, v, **kw) for k, v in (extra_utility_sets or {}).items()},
    )


def _summary(s: TofuScores, k: float, tr_mean: str) -> dict[str, float]:
    """Everything that needs one model only (split means, utility, MIA AUCs, raw aggregates)."""
    out = split_metrics(s.forget, "forget", forget=True, truth_ratio_mean=tr_mean)
    out.update(split_metrics(s.holdout, "holdout", truth_ratio_mean=tr_mean))
    utility_sets = {"retain": split_metrics(s.retain, "retain", truth_ratio_mean=tr_mean)}
    for name, sc in s.extra.items():
        utility_sets[name] = split_metrics(sc, name, options=True, truth_ratio_mean=tr_mean)
    for part in utility_sets.values():
        out.update(part)
    out["model_utility"] = tofu.model_utility(
        {f"{n}_{m}": part[f"{n}_{m}"] for n, part in utility_sets.items()
         for m in ("prob", "rouge_l", "truth_ratio") if f"{n}_{m}" in part}
    )
    f_mia, h_mia = mia_scores(s.forget, k), mia_scores(s.holdout, k)
    aucs = {a: tofu.mia_auc(f_mia[a], h_mia[a]) for a in tofu.MIA_ATTACKS}
    out.update({f"mia_{a}": v for a, v in aucs.items()})
    out["memorization_raw"] = tofu.memorization_raw(
        out["forget_prob"], out.get("forget_rouge_l", 0.0), out["forget_em"], out["forget_es"]
    )
    out["utility_raw"] = out["model_utility"]
    out["privacy_raw"] = tofu.privacy_raw(aucs)
    out["overall_raw"] = tofu.harmonic_mean(
        [out["memorization_raw"], out["utility_raw"], out["privacy_raw"]]
    )
    return out


class TofuEvaluator:
    """Scores the anchors once; ``evaluator(model)`` then returns the full TOFU metric dict.

    ``gold`` (retain-only model) and ``base`` (the fine-tuned model before any edit) may each be
    a model, a precomputed :class:`TofuScores`, or ``None``. Keys always present: the split means
    (``forget_*``, ``retain_*``, ``holdout_*``), ``model_utility``, ``mia_loss``, ``mia_zlib``,
    ``mia_min_k``, ``mia_min_k_plus_plus`` and ``memorization_raw``, ``utility_raw``,
    ``privacy_raw``, ``overall_raw``. With ``gold``: ``forget_quality``,
    ``forget_quality_log10`` and the gold-anchored ``privacy``; with ``base``: the anchored
    ``utility``; with both: ``memorization`` and the paper's ``overall``.
    """

    def __init__(
        self,
        tokenizer,
        forget: Any,
        retain: Any,
        holdout: Any,
        gold: Any = None,
        base: Any = None,
        *,
        extra_utility_sets: Mapping[str, Any] | None = None,
        template: QATemplate = DEFAULT_TEMPLATE,
        batch_size: int = 16,
        gen_margin: int = 8,
        k: float = 0.4,
        truth_ratio_mean: str = "geometric",
    ):
        self.tokenizer = tokenizer
        self.splits = (as_records(forget), as_records(retain), as_records(holdout))
        self.extra = {n: as_records(v) for n, v in (extra_utility_sets or {}).items()}
        self.kw = {"template": template, "batch_size": batch_size, "gen_margin": gen_margin}
        self.k, self.tr_mean = k, truth_ratio_mean
        self.gold, self.base = self._anchor(gold), self._anchor(base)
        self.gold_summary = self._summarize(self.gold) if self.gold is not None else None
        self.base_summary = self._summarize(self.base) if self.base is not None else None

    def _anchor(self, m: Any) -> TofuScores | None:
        return m if m is None or isinstance(m, TofuScores) else self.score(m)

    def _summarize(self, s: TofuScores) -> dict[str, float]:
        return _summary(s, self.k, self.tr_mean)

    def score(self, model) -> TofuScores:
        """Per-sample scores of ``model`` on all splits."""
        return score_tofu(model, self.tokenizer, *self.splits, self.extra, **self.kw)

    def metrics(self, scores: TofuScores) -> dict[str, float]:
        """The metric dict for precomputed ``scores`` (see the class docstring)."""
        out = self._summarize(scores)
        if self.gold is not None:
            tr = _truth_ratios(scores.forget, self.tr_mean)
            gold_tr = _truth_ratios(self.gold.forget, self.tr_mean)
            if tr is not None and gold_tr is not None:
                fq = tofu.forget_quality(tr, gold_tr)
                out["forget_quality"] = fq
                out["forget_quality_log10"] = math.log10(max(fq, 1e-300))
            out["privacy"] = tofu.privacy_vs_gold(
                mia_scores(scores.forget, self.k), mia_scores(self.gold.forget, self.k)
            )
        if self.base_summary is not None:
            out["utility"] = tofu.anchored_utility(
                out["model_utility"], self.base_summary["model_utility"]
            )
        if self.gold_summary is not None and self.base_summary is not None:
            out.update(
                tofu.anchored_scores(out, self.gold_summary, self.base_summary, out["privacy"])
            )
        return out

    def __call__(self, model) -> dict[str, float]:
        return self.metrics(self.score(model))


def evaluate_tofu(model, tokenizer, *args: Any, **kwargs: Any) -> dict[str, float]:
    """All TOFU metrics of ``model`` in one call:
    ``evaluate_tofu(model, tokenizer, forget, retain, holdout, gold_model=None, base_model=None,
    **options)`` is ``TofuEvaluator(tokenizer, forget, retain, holdout, gold, base,
    **options)(model)`` (see :class:`TofuEvaluator` for the keys and options; the anchors may be
    models or precomputed :class:`TofuScores`). The arguments are forwarded, not restated, so
    the two cannot drift apart. To evaluate many edits against the same anchors, build a
    :class:`TofuEvaluator` once."""
    for alias, name in (("gold_model", "gold"), ("base_model", "base")):
        if alias in kwargs:
            kwargs[name] = kwargs.pop(alias)
    return TofuEvaluator(tokenizer, *args, **kwargs)(model)


def _load(model_dir: str, device: str | None, dtype: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(model_dir)


def evaluate_tofu_dirs(
    model_dir: str,
    gold_dir: str | None,
    forget_path: str,
    retain_path: str,
    holdout_path: str,
    *,
    base_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | None = None,
    dtype: Any = None,
    **kwargs: Any,
) -> dict[str, float]:
    """:func:`evaluate_tofu` on local HF checkpoint directories and Parquet splits (columns
    ``question``, ``answer``, optional ``paraphrased_answer`` and ``perturbed_answer``).

    Each anchor (``gold_dir``, optional ``base_dir``) is scored with its own tokenizer; models
    load in ``dtype`` (default float32) on ``device`` (default: CUDA if available, else CPU).
    """
    from engram_ray.eval.corpus import read_split

    splits = [read_split(p, storage_options) for p in (forget_path, retain_path, holdout_path)]
    extra = kwargs.pop("extra_utility_sets", None)
    anchors = []
    for d in (gold_dir, base_dir):
        if d is None:
            anchors.append(None)
            continue
        m, tok = _load(d, device, dtype)
        anchors.append(TofuEvaluator(tok, *splits, extra_utility_sets=extra, **kwargs).score(m))
        del m
    model, tok = _load(model_dir, device, dtype)
    return evaluate_tofu(model, tok, *splits, *anchors, extra_utility_sets=extra, **kwargs)
