"""TOFU end to end as the field runs it: TOFU's published files and a checkpoint in,
OpenUnlearning's ``TOFU_EVAL.json`` / ``TOFU_SUMMARY.json`` and a report out.

    engram-ray tofu --data DIR_OR_S3 --model DIR_OR_S3 --split forget10 [--split forget05 …]
                    [--alpha 1.0 …] [--retain-logs forget10=RETAIN90_TOFU_EVAL.json …] --out OUT

1. **Data** (:func:`load_tofu`): TOFU's files as published (``full.json``, ``forgetXX.json``,
   ``forgetXX_perturbed.json``, ``retain_perturbed.json``; ``retainYY.json``, ``holdoutXX.json``,
   ``real_authors_perturbed.json``, ``world_facts_perturbed.json`` when present), JSON lines or
   one JSON array, local or ``s3://``. TOFU has no author column: ``full.json`` holds each
   author's 20 QA rows in order, and ``forgetXX`` is the last authors' rows. Author ``i`` is
   therefore rows ``[20 i, 20 i + 20)`` of ``full.json``; this is checked against the files
   (every forget set is whole authors and equals the tail of ``full.json`` row for row, its
   ``retainYY`` the head, its ``_perturbed`` file the same questions, and with the published
   200 authors ``forgetXX`` is XX % of them) and a mismatch is an error naming the file.
2. **Prompt format** (:func:`template_for`): OpenUnlearning's ``template_args`` when given;
   else the tokenizer's chat template with OpenUnlearning's Llama-3 arguments (system prompt
   "You are a helpful assistant.", ``date_string`` "10 Apr 2025"); a tokenizer without a chat
   template gets TOFU's plain ``Question: … Answer: …`` tags.
3. **Extraction**: one run over ``full.json`` whose concepts are the authors of the chosen forget
   splits (``author_180`` … ``author_199`` for forget10); every other row counts in Σ_total only.
   Rows are rendered through the template and only the answer tokens count (``prompt_column`` /
   ``answer_column``). ``--local``: the single-process engine; else the Ray pipeline.
4. **Edits**: every (split, α) in one batch (:func:`engram_ray.apply.apply`, the one edit driver). With
   ``--validation-rows N`` and several α, each edit is first scored on a validation slice (the
   first N rows of ``forgetXX_perturbed`` and ``retain_perturbed``, teacher forced) and only
   each split's selected α (:func:`select_alpha`) is evaluated in full.
5. **Evaluation** of the unedited model and of each edit, per split, in OpenUnlearning's format
   (:mod:`engram_ray.eval.openunlearning`): ``OUT/<split>/base/`` and
   ``OUT/<split>/alpha_<α>/`` each hold ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json``; ``OUT``
   itself holds those of the first split's first α. With ``--retain-logs`` (the retain model's
   ``TOFU_EVAL.json`` per split), forget quality and privleak are measured against it.
6. **Report**: ``OUT/report.md``, ``OUT/tofu.png`` (forget quality against model utility for
   each split and α, the unedited model and the retain model as reference points) and
   ``OUT/results.json``.

``--eval-only`` skips 3–4 and evaluates the model as it is: what a retain model's log is made
with. :func:`run_demo` (``engram-ray demo --pipeline tofu``) runs it all on synthetic TOFU-layout
data with tiny Llamas (:mod:`pipelines.tofu_synth`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LLAMA3_TEMPLATE_ARGS",
    "QA_PER_AUTHOR",
    "TofuData",
    "author_name",
    "load_tofu",
    "render_prompt",
    "run_demo",
    "run_tofu",
    "select_alpha",
    "template_for",
]

QA_PER_AUTHOR = 20  # TOFU: each fictitious author has 20 QA pairs
PUBLISHED_AUTHORS = 200  # TOFU's full.json: 200 authors, 4000 rows
# OpenUnlearning's template_args for its Llama-3.2 TOFU checkpoints (configs/model/*.yaml).
LLAMA3_TEMPLATE_ARGS = {"apply_chat_template": True, "system_prompt": "You are a helpful assistant.",
                        "date_string": "10 Apr 2025"}
_SPLIT = re.compile(r"forget(\d\d)")


def _say(msg: str) -> None:
    print(f"[tofu] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def author_name(index: int) -> str:
    """The concept name of the ``index``-th author of ``full.json`` (0-based, row order)."""
    return f"author_{index:03d}"


@dataclass
class TofuData:
    """TOFU's files, read and checked; ``forget_authors[split]`` are the split's concepts."""

    uri: str
    full: list[dict]
    forget: dict[str, list[dict]]
    forget_perturbed: dict[str, list[dict]]
    retain_perturbed: list[dict]
    forget_authors: dict[str, list[str]]
    holdout: dict[str, list[dict]] = field(default_factory=dict)
    real_authors: list[dict] | None = None
    world_facts: list[dict] | None = None
    qa_per_author: int = QA_PER_AUTHOR

    @property
    def n_authors(self) -> int:
        return len(self.full) // self.qa_per_author


def _read_rows(storage, name: str, required: bool) -> list[dict] | None:
    """A JSON-lines file (or one JSON array) of objects; ``None`` if absent and optional."""
    where = storage.uri_of(name)
    if not storage.exists(name):
        if required:
            raise FileNotFoundError(f"{where}: missing (a TOFU data directory needs it)")
        return None
    text = storage.read_bytes(name).decode("utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise ValueError(f"{where}: not JSON lines or a JSON array ({e})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: row {i} is not an object")
        for col in ("question", "answer"):
            if not isinstance(r.get(col), str):
                raise ValueError(f"{where}: row {i} has no string column {col!r}")
    return rows


def _check_perturbed(where: str, rows: list[dict], paraphrased: bool) -> None:
    for i, r in enumerate(rows):
        if paraphrased and not isinstance(r.get("paraphrased_answer"), str):
            raise ValueError(f"{where}: row {i} has no string column 'paraphrased_answer'")
        p = r.get("perturbed_answer")
        if not isinstance(p, list) or not p or not all(isinstance(a, str) for a in p):
            raise ValueError(f"{where}: row {i} has no non-empty list of strings "
                             "'perturbed_answer'")


def _same_rows(where: str, rows: list[dict], ref: list[dict], ref_name: str, offset: int,
               why: str) -> None:
    for i, (r, s) in enumerate(zip(rows, ref)):
        if (r["question"], r["answer"]) != (s["question"], s["answer"]):
            raise ValueError(f"{where}: row {i} is not {ref_name} row {offset + i} ({why})")


def load_tofu(uri: str, splits: Sequence[str], storage_options: Mapping | None = None,
              qa_per_author: int = QA_PER_AUTHOR) -> TofuData:
    """Read and check TOFU's files under ``uri`` for the forget ``splits`` (module docstring)."""
    from engram_ray.io.storage import Storage

    if not splits:
        raise ValueError("at least one forget split (e.g. forget10) is needed")
    store = Storage(uri, storage_options)
    full = _read_rows(store, "full.json", True)
    q = qa_per_author
    if not full or len(full) % q:
        raise ValueError(f"{store.uri_of('full.json')}: {len(full)} rows is not a whole number of "
                         f"authors at {q} QA rows each (TOFU's layout)")
    n_authors = len(full) // q
    data = TofuData(uri=uri, full=full, forget={}, forget_perturbed={}, retain_perturbed=[],
                    forget_authors={}, qa_per_author=q)
    for split in splits:
        m = _SPLIT.fullmatch(split)
        if m is None:
            raise ValueError(f"--split {split!r}: expected forgetXX (forget01, forget05, forget10)")
        pct = int(m.group(1))
        name = f"{split}.json"
        rows = _read_rows(store, name, True)
        where = store.uri_of(name)
        if not rows or len(rows) % q or len(rows) >= len(full):
            raise ValueError(f"{where}: {len(rows)} rows is not a whole number of authors "
                             f"({q} rows each) fewer than full.json's {n_authors}")
        k = len(rows) // q
        if n_authors == PUBLISHED_AUTHORS and k != PUBLISHED_AUTHORS * pct // 100:
            raise ValueError(f"{where}: {k} authors, but {split} is {pct}% of full.json's "
                             f"{n_authors} authors ({PUBLISHED_AUTHORS * pct // 100})")
        start = len(full) - len(rows)
        _same_rows(where, rows, full[start:], "full.json", start,
                   "TOFU's forget sets are the last authors of full.json, in order")
        retain_name = f"retain{100 - pct:02d}.json"
        retain = _read_rows(store, retain_name, False)
        if retain is not None:
            if len(retain) != start:
                raise ValueError(f"{store.uri_of(retain_name)}: {len(retain)} rows, expected the "
                                 f"{start} rows of full.json before {split}")
            _same_rows(store.uri_of(retain_name), retain, full, "full.json", 0,
                       "TOFU's retain sets are the first rows of full.json")
        pname = f"{split}_perturbed.json"
        pert = _read_rows(store, pname, True)
        if len(pert) != len(rows):
            raise ValueError(f"{store.uri_of(pname)}: {len(pert)} rows, {name} has {len(rows)}")
        for i, (a, b) in enumerate(zip(pert, rows)):
            if a["question"] != b["question"]:
                raise ValueError(f"{store.uri_of(pname)}: row {i}'s question is not {name}'s")
        _check_perturbed(store.uri_of(pname), pert, paraphrased=True)
        data.forget[split], data.forget_perturbed[split] = rows, pert
        data.forget_authors[split] = [author_name(i) for i in range(n_authors - k, n_authors)]
        hold = _read_rows(store, f"holdout{pct:02d}.json", False)
        if hold is not None:
            data.holdout[split] = hold
    data.retain_perturbed = _read_rows(store, "retain_perturbed.json", True)
    _check_perturbed(store.uri_of("retain_perturbed.json"), data.retain_perturbed, True)
    for attr, name in (("real_authors", "real_authors_perturbed.json"),
                       ("world_facts", "world_facts_perturbed.json")):
        rows = _read_rows(store, name, False)
        if rows is not None:
            _check_perturbed(store.uri_of(name), rows, paraphrased=False)
            setattr(data, attr, rows)
    return data


# ----------------------------------------------------------------------------- template


def template_for(tokenizer, template_args: Mapping | None = None):
    """The :class:`~engram_ray.eval.lm_scores.QATemplate` of a run (module docstring, 2.).

    OpenUnlearning's ``template_args``: ``apply_chat_template: true`` uses the tokenizer's chat
    template with ``system_prompt`` and ``date_string``; ``false`` wraps the question as
    ``system_prompt_with_special_tokens + user_start_tag + question + user_end_tag +
    asst_start_tag`` and the answer follows directly. Answers are scored with the closing EOS
    (``append_eos``), as OpenUnlearning's labels end with it.
    """
    from engram_ray.eval.lm_scores import QATemplate

    args = dict(template_args) if template_args is not None else (
        dict(LLAMA3_TEMPLATE_ARGS) if getattr(tokenizer, "chat_template", None) else None)
    if args is None:
        return QATemplate(append_eos=True)
    known = {"apply_chat_template", "system_prompt", "system_prompt_with_special_tokens",
             "user_start_tag", "user_end_tag", "asst_start_tag", "asst_end_tag", "date_string"}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"template_args: unknown key(s) {sorted(unknown)}; known {sorted(known)}")
    if args.get("apply_chat_template"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template_args: apply_chat_template is true but the tokenizer has "
                             "no chat template")
        # The assistant turn is the answer itself (the template ends the header with "\n\n").
        return QATemplate(chat=True, answer="{answer}", system_prompt=args.get("system_prompt"),
                          date_string=args.get("date_string"), append_eos=True)
    missing = [k for k in ("user_start_tag", "user_end_tag", "asst_start_tag") if k not in args]
    if missing:
        raise ValueError(f"template_args: apply_chat_template is false and {missing} are missing")

    def esc(s: str | None) -> str:
        return (s or "").replace("{", "{{").replace("}", "}}")

    prompt = (esc(args.get("system_prompt_with_special_tokens")) + esc(args["user_start_tag"])
              + "{question}" + esc(args["user_end_tag"]) + esc(args["asst_start_tag"]))
    return QATemplate(prompt=prompt, answer="{answer}", append_eos=True)


def render_prompt(tokenizer, template, question: str) -> str:
    """The prompt as text such that ``tokenizer(text)`` (special tokens added, as extraction
    encodes a prompt) gives the ids :func:`~engram_ray.eval.lm_scores.encode_qa` scores: a
    chat template's text loses its leading BOS when the tokenizer adds one itself."""
    if not template.chat:
        return template.prompt.format(question=question)
    msgs = [{"role": "system", "content": template.system_prompt}] if template.system_prompt else []
    msgs.append({"role": "user", "content": question})
    extra = {"date_string": template.date_string} if template.date_string is not None else {}
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **extra)
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    if adds_bos and text.startswith(bos):
        text = text[len(bos):]
    return text


# ----------------------------------------------------------------------------- pipeline


def _alpha_tag(a: float) -> str:
    return f"alpha_{a:g}"


def _check_out(out: str) -> tuple[str, bool]:
    """``out`` made absolute and created; refused if it is a file or a non-empty directory.
    Also returns whether it was created here (what :func:`_discard` may remove)."""
    out = os.path.abspath(out)
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise FileExistsError(f"--out {out}: exists and is not empty")
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    return out, created


def _discard(out: str, created: bool) -> None:
    """After a failure: remove what was written under ``out`` (it was new or empty)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _retain_logs(retain_logs: Mapping[str, str] | None, data: TofuData, storage_options):
    from engram_ray.eval.openunlearning import read_retain_logs

    logs = {}
    for split, path in (retain_logs or {}).items():
        if split not in data.forget:
            raise ValueError(f"--retain-logs {split}={path}: {split} is not a --split")
        logs[split] = read_retain_logs(path, storage_options, len(data.forget_perturbed[split]))
    return logs


def _extract(data: TofuData, model: str, tokenizer, template, out: str, local: bool,
             overrides: Sequence[str], storage_options, max_length: int,
             tokens: str = "answer") -> str:
    """One run over full.json: the chosen splits' authors as concepts, every row in Σ_total.
    ``tokens="answer"`` counts the answer tokens only; ``"all"`` every token of the rendered
    prompt + answer (one text column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engram_ray.config import ExtractConfig, apply_overrides
    from engram_ray.eval.lm_scores import encode_qa

    concepts = set().union(*data.forget_authors.values())
    q = data.qa_per_author
    rows = []
    for i, r in enumerate(data.full):
        name = author_name(i // q)
        rows.append({"author": name if name in concepts else None,
                     "prompt": render_prompt(tokenizer, template, r["question"]),
                     "answer": template.answer.format(answer=r["answer"])})
    first = data.full[0]
    want = encode_qa(tokenizer, first["question"], first["answer"], template)[0]
    got = list(tokenizer(rows[0]["prompt"]).input_ids)
    if got != want:
        raise ValueError("the rendered prompt does not tokenize as the evaluated one (chat "
                         "template and BOS handling disagree); pass --template-args")
    path = os.path.join(out, "data", "extract.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for r in rows:
        r["text"] = r["prompt"] + r["answer"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("author", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
         ("text", pa.string())])), path)
    columns = ({"prompt_column": "prompt", "answer_column": "answer"} if tokens == "answer"
               else {"text_column": "text"})
    raw = {"model": {"path": model},
           "data": {"paths": [path], "concept_column": "author", **columns,
                    "max_length": max_length},
           "store": {"uri": os.path.join(out, "runs"), "run_id": "tofu"}}
    if storage_options:
        raw["data"]["storage_options"] = dict(storage_options)
    cfg = ExtractConfig.from_dict(apply_overrides(raw, list(overrides)))
    if local:
        from engram_ray.local import extract_from_config

        return extract_from_config(cfg).uri
    from engram_ray.distributed.runner import run_extract

    return run_extract(cfg)


class _Scorer:
    """Scores models on the TOFU splits; shared sets (retain, real authors, world facts) once
    per model, forget / holdout per split."""

    def __init__(self, data: TofuData, template, batch_size: int, gen_margin: int,
                 device: str | None, dtype: str):
        self.data, self.template = data, template
        self.kw = {"template": template, "batch_size": batch_size, "gen_margin": gen_margin}
        self.device, self.dtype = device, dtype

    def load(self, path: str, storage_options=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engram_ray.models.loading import model_dir

        local = model_dir(path, storage_options)
        dev = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(local, dtype=getattr(torch, self.dtype))
        return model.to(dev).eval(), AutoTokenizer.from_pretrained(local)

    def logs(self, model, tok, splits: Sequence[str], retain_logs: Mapping) -> dict[str, dict]:
        from engram_ray.eval.lm_scores import score_qa
        from engram_ray.eval.openunlearning import eval_logs

        d = self.data
        shared = {"retain": score_qa(model, tok, d.retain_perturbed, **self.kw)}
        for name in ("real_authors", "world_facts"):
            rows = getattr(d, name)
            shared[name] = None if rows is None else score_qa(model, tok, rows, **self.kw)
        out = {}
        for split in splits:
            forget = score_qa(model, tok, d.forget_perturbed[split], **self.kw)
            mia = hold = None
            if split in d.holdout:
                mia = score_qa(model, tok, d.forget[split], generate=False, **self.kw)
                hold = score_qa(model, tok, d.holdout[split], generate=False, **self.kw)
            out[split] = eval_logs(forget, shared["retain"], mia_forget=mia, holdout=hold,
                                   real_authors=shared["real_authors"],
                                   world_facts=shared["world_facts"],
                                   retain_logs=retain_logs.get(split),
                                   eos_scored=self.template.append_eos)
        return out


def _validation(scorer: _Scorer, model, tok, split: str, rows: int,
                retain_log: Mapping | None) -> dict:
    """Teacher-forced numbers on the validation slice (the first ``rows`` rows of
    ``forgetXX_perturbed`` and of ``retain_perturbed``; no generation): forget quality of the
    slice's truth ratios against the retain log's rows of the same indices (``None`` without
    a log), the forget-set answer loss, and ``utility = HM(retain answer probability,
    retain truth-ratio score)``."""
    import numpy as np
    from scipy import stats

    from engram_ray.eval import tofu as metrics
    from engram_ray.eval.lm_scores import score_qa
    from engram_ray.eval.openunlearning import truth_ratios

    kw = dict(scorer.kw, generate=False)
    f = score_qa(model, tok, scorer.data.forget_perturbed[split][:rows], **kw)
    r = score_qa(model, tok, scorer.data.retain_perturbed[:rows], **kw)
    tr = truth_ratios(f.paraphrased_nll, f.perturbed_nll)
    fq = None
    if retain_log is not None:
        ref = retain_log["forget_truth_ratio"]["value_by_index"]
        ref_tr = [ref[str(i)]["score"] for i in range(len(tr)) if str(i) in ref]
        fq = float(stats.ks_2samp(tr, ref_tr).pvalue)
    rtr = truth_ratios(r.paraphrased_nll, r.perturbed_nll)
    utility = metrics.harmonic_mean([float(np.exp(-r.nll).mean()),
                                     float(np.mean(np.maximum(0.0, 1.0 - rtr)))])
    return {"forget_quality": fq, "forget_loss": float(f.nll.mean()), "utility": utility}


def select_alpha(base: Mapping, candidates: Mapping[float, Mapping], tolerance: float
                 ) -> tuple[float, str]:
    """The α whose validation numbers are best, and why: among the α that keep the validation
    utility at least ``(1 - tolerance)`` × the unedited model's, the highest forget quality
    (the highest forget loss without a retain log), the smallest α on ties; if none keeps it,
    the α with the highest utility."""
    floor = (1.0 - tolerance) * base["utility"]
    ok = [a for a, v in candidates.items() if v["utility"] >= floor]
    if not ok:
        best = max(sorted(candidates), key=lambda a: candidates[a]["utility"])
        return best, f"no α kept utility ≥ {floor:.4g}: the one with the highest utility"
    key = "forget_quality" if all(candidates[a]["forget_quality"] is not None for a in ok) \
        else "forget_loss"
    best = max(sorted(ok), key=lambda a: (candidates[a][key], -a))
    return best, f"highest validation {key} with utility ≥ {floor:.4g}"


def _select(scorer, model, storage_options, pairs, splits, rows, ref_logs, tolerance,
            results, keep_models):
    """Score every edit on the validation slice, keep each split's selected α (the others'
    checkpoints are removed unless ``keep_models``); returns the kept ``pairs``."""
    base_model, tok = scorer.load(model, storage_options)
    base = {s: _validation(scorer, base_model, tok, s, rows, ref_logs.get(s)) for s in splits}
    del base_model
    scored: dict[str, dict[float, dict]] = {s: {} for s in splits}
    for (split, a), e in pairs:
        m, mtok = scorer.load(e.out)
        scored[split][a] = _validation(scorer, m, mtok, split, rows, ref_logs.get(split))
        del m
    results["validation"] = {"rows": rows, "utility_tolerance": tolerance, "splits": {}}
    kept = []
    for split in splits:
        best, why = select_alpha(base[split], scored[split], tolerance)
        results["validation"]["splits"][split] = {
            "unedited": base[split], "alphas": {f"{a:g}": v for a, v in scored[split].items()},
            "selected": best, "why": why}
        _say(f"{split}: α = {best:g} selected on the validation slice ({why})")
        for (s, a), e in pairs:
            if s != split:
                continue
            if a == best:
                kept.append(((s, a), e))
            elif not keep_models:
                shutil.rmtree(e.out)
    return kept


def _forget_nll(logs: Mapping) -> float:
    return float(sum(v["avg_loss"] for v in logs["forget_Q_A_Prob"]["value_by_index"].values())
                 / len(logs["forget_Q_A_Prob"]["value_by_index"]))


def _row(split: str, alpha: float | None, logs: Mapping) -> dict:
    from engram_ray.eval.openunlearning import UTILITY_PARTS, summarize

    s = summarize(logs)
    return {"split": split, "alpha": alpha, **s, "forget_loss": _forget_nll(logs),
            "retain_loss": float(sum(v["avg_loss"] for v in
                                     logs["retain_Q_A_Prob"]["value_by_index"].values())
                                 / len(logs["retain_Q_A_Prob"]["value_by_index"])),
            "utility_parts": [p for p in UTILITY_PARTS if p in logs]}


def run_tofu(
    data: str,
    model: str,
    out: str,
    *,
    splits: Sequence[str] = ("forget10",),
    alphas: Sequence[float] = (1.0,),
    retain_logs: Mapping[str, str] | None = None,
    template_args: Mapping | None = None,
    local: bool = False,
    overrides: Sequence[str] = (),
    storage_options: Mapping | None = None,
    eval_only: bool = False,
    keep_models: bool = False,
    scale: str = "uniform",
    max_length: int = 512,
    batch_size: int = 16,
    gen_margin: int = 32,
    device: str | None = None,
    dtype: str = "float32",
    qa_per_author: int = QA_PER_AUTHOR,
    tokens: str = "answer",
    validation_rows: int = 0,
    utility_tolerance: float = 0.05,
) -> str:
    """Run the pipeline (module docstring); returns the path of ``OUT/report.md``.

    Everything is checked (files, retain logs, α values, the output directory) before any
    model is loaded. ``gen_margin``: greedy answers get ``|answer| + gen_margin`` new tokens.
    ``validation_rows`` > 0 with several α: select α per split on the validation slice
    (:func:`select_alpha` with ``utility_tolerance``) and evaluate only that one in full.
    """
    from engram_ray.eval.openunlearning import write_logs

    t0 = time.time()
    splits = list(dict.fromkeys(splits))
    alphas = [float(a) for a in alphas]
    for a in alphas:
        if not math.isfinite(a):
            raise ValueError(f"--alpha {a}: not a finite number")
    if isinstance(validation_rows, bool) or not isinstance(validation_rows, int) \
            or validation_rows < 0:
        raise ValueError(f"--validation-rows {validation_rows!r}: expected an int ≥ 0")
    if not 0.0 <= utility_tolerance < 1.0:
        raise ValueError(f"--utility-tolerance {utility_tolerance}: expected a number in [0, 1)")
    if tokens not in ("answer", "all"):
        raise ValueError(f"--tokens {tokens!r}: expected answer or all")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    tofu = load_tofu(data, splits, storage_options, qa_per_author)
    ref_logs = _retain_logs(retain_logs, tofu, storage_options)
    out, created = _check_out(out)
    try:
        _say(f"{data}: {tofu.n_authors} authors; " + ", ".join(
            f"{s}: {len(tofu.forget_authors[s])} authors" for s in splits))
        scorer = _Scorer(tofu, None, batch_size, gen_margin, device, dtype)
        base, tok = scorer.load(model, storage_options)
        template = template_for(tok, template_args)
        scorer.template = template
        scorer.kw["template"] = template
        results: dict[str, Any] = {"data": data, "model": model, "splits": splits,
                                   "alphas": [] if eval_only else alphas,
                                   "template": {"chat": template.chat,
                                                "system_prompt": template.system_prompt,
                                                "date_string": template.date_string,
                                                "prompt": template.prompt},
                                   "rows": [], "retain": {}}
        _say("scoring the unedited model")
        base_logs = scorer.logs(base, tok, splits, ref_logs)
        del base
        for split in splits:
            write_logs(os.path.join(out, split, "base"), base_logs[split])
            results["rows"].append(_row(split, None, base_logs[split]))
            if split in ref_logs:
                mu = (ref_logs[split].get("model_utility") or {}).get("agg_value")
                results["retain"][split] = {"forget_quality": 1.0, "model_utility": mu,
                                            "log": retain_logs[split]}
        headline = base_logs[splits[0]]
        if not eval_only:
            from engram_ray.apply import apply
            from engram_ray.config import EditSpec

            run_uri = _extract(tofu, model, tok, template, out, local, overrides, storage_options,
                               max_length, tokens)
            results["run"] = run_uri
            _say(f"run {run_uri}; {len(splits) * len(alphas)} edits in one batch")
            edits = [EditSpec(forget=tuple(tofu.forget_authors[s]), alpha=a, scale=scale,
                              out=os.path.join(out, "models", f"{s}_{_alpha_tag(a)}"))
                     for s in splits for a in alphas]
            errors = apply(run_uri, edits, storage_options=storage_options)
            for e, err in zip(edits, errors):
                if err is not None:
                    raise RuntimeError(f"edit {os.path.basename(e.out)} failed: {err}") from err
            pairs = list(zip([(s, a) for s in splits for a in alphas], edits))
            if validation_rows and len(alphas) > 1:
                pairs = _select(scorer, model, storage_options, pairs, splits, validation_rows,
                                ref_logs, utility_tolerance, results, keep_models)
            for (split, a), e in pairs:
                m, mtok = scorer.load(e.out)
                logs = scorer.logs(m, mtok, [split], ref_logs)[split]
                del m
                write_logs(os.path.join(out, split, _alpha_tag(a)), logs)
                results["rows"].append(_row(split, a, logs))
                if split == splits[0] and a == pairs[0][0][1]:
                    headline = logs
                if not keep_models:
                    shutil.rmtree(e.out)
                _say(f"{split} α={a:g}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in results["rows"][-1].items()
                    if k in ("forget_quality", "model_utility", "forget_Q_A_Prob")))
            if not keep_models:
                shutil.rmtree(os.path.join(out, "models"), ignore_errors=True)
        write_logs(out, headline)
        results["seconds"] = time.time() - t0
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        report = _write_report(out, results)
        _say(f"done in {results['seconds']:.0f}s; open {report}")
        return report
    except BaseException:
        _discard(out, created)  # nothing half-written: --out was new or empty
        raise


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def _write_report(out: str, results: Mapping) -> str:
    """``report.md`` (one table per split: the unedited model, each α, the retain model) and
    ``tofu.png`` (:func:`engram_ray.eval.plots.tofu_tradeoff`)."""
    from engram_ray.eval.plots import tofu_tradeoff

    png = tofu_tradeoff(results["rows"], results["retain"], os.path.join(out, "tofu.png"))
    keys = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob",
            "forget_Q_A_ROUGE", "extraction_strength", "privleak", "forget_loss", "retain_loss")
    lines = ["# TOFU with engram edits", "",
             f"Data `{results['data']}`, model `{results['model']}`, "
             f"prompt {'chat template' if results['template']['chat'] else 'plain tags'}"
             f"{', run ' + repr(results['run']) if 'run' in results else ''}.", "",
             "Metrics are OpenUnlearning's (`TOFU_SUMMARY.json` keys); `forget_loss` / "
             "`retain_loss` are the mean answer NLL on the forget and retain_perturbed rows. "
             "Forget quality needs the retain model's log (`--retain-logs`); without it the "
             "column is empty and privleak uses the reference AUC 0.5.", ""]
    parts = results["rows"][0]["utility_parts"] if results["rows"] else []
    if len(parts) < 9:
        lines += [f"Model utility here is the harmonic mean of {', '.join(parts)} (the files "
                  "for the others are absent): not comparable with published numbers, which "
                  "use all nine.", ""]
    for split in results["splits"]:
        lines += [f"## {split}", "", "| model | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for r in results["rows"]:
            if r["split"] != split:
                continue
            label = "unedited" if r["alpha"] is None else f"edited, α = {r['alpha']:g}"
            lines.append(f"| {label} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
        ret = results["retain"].get(split)
        if ret:
            lines.append("| retain model (log) | 1 | " + _fmt(ret["model_utility"]) + " |"
                         + " — |" * (len(keys) - 2))
        lines.append("")
    val = results.get("validation")
    if val:
        lines += ["## α selected on the validation slice", "",
                  f"First {val['rows']} rows of each forget split's perturbed file and of "
                  "retain_perturbed, teacher forced; utility = HM(retain answer probability, "
                  "retain truth-ratio score); an α must keep at least "
                  f"{1 - val['utility_tolerance']:g}× the unedited model's utility.", "",
                  "| split | α | forget_quality | forget_loss | utility | selected |",
                  "|---|---|---|---|---|---|"]
        for split, v in val["splits"].items():
            rows_ = [("unedited", v["unedited"])] + list(v["alphas"].items())
            for label, r in rows_:
                mark = "✓" if label != "unedited" and float(label) == v["selected"] else ""
                lines.append(f"| {split} | {label} | {_fmt(r['forget_quality'])} | "
                             f"{_fmt(r['forget_loss'])} | {_fmt(r['utility'])} | {mark} |")
        lines.append("")
    lines += [f"![forget quality vs model utility]({os.path.basename(png)})", "",
              f"{results['seconds']:.0f} s in all.", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- demo


def run_demo(out: str = "tofu-demo", *, stages: int = 2, quick: bool = False) -> str:
    """``engram-ray demo --pipeline tofu``: synthetic TOFU-layout data (8 authors; forget01 =
    the last one, forget05 = the last two), a tiny Llama trained on ``full.json`` and retain
    models on ``retain99.json`` / ``retain95.json``, their logs (``--eval-only``), then the
    pipeline (single process) with an α sweep over both splits. Returns the report path.
    ``stages`` is unused (one process); ``quick``: forget01 only, α = 1."""
    from engram_ray.eval.train_lm import torch_threads
    from pipelines.tofu_synth import train_models, write_synthetic_tofu

    del stages
    out = _check_out(out)[0]
    data = os.path.join(out, "data")
    splits = ["forget01"] if quick else ["forget01", "forget05"]
    retain = {"forget01": "retain99", "forget05": "retain95"}
    with torch_threads(1):  # tiny models: one thread is fastest
        write_synthetic_tofu(data, n_authors=8, extras=True)
        models = train_models(data, os.path.join(out, "models"),
                              tuple(retain[s] for s in splits))
        logs = {}
        for s in splits:
            run_tofu(data, models[retain[s]], os.path.join(out, f"{retain[s]}-eval"),
                     splits=[s], eval_only=True)
            logs[s] = os.path.join(out, f"{retain[s]}-eval", "TOFU_EVAL.json")
        return run_tofu(data, models["full"], os.path.join(out, "tofu"), splits=splits,
                        alphas=[1.0] if quick else [0.5, 1.0, 1.5, 2.0], retain_logs=logs,
                        local=True)
