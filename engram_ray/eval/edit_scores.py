"""The eval summary of an edit (``engram-ray batch``, a request's ``eval`` column).

A request naming an eval set gets, before its output's completion marker is written, the
mean per-token NLL and the next-token accuracy of the base model and of the edited model on
that set, split into ``forget`` rows (whose concept the request forgets) and ``retain`` rows
(every other row, reference-only rows included), with their row and token counts. A good
edit raises the forget loss and leaves the retain loss where it was.

Which tokens: the set has the run's own data columns and is encoded exactly as extraction
encoded its rows (:func:`engram_ray.io.data.encode_rows` with the run's recorded column names
and ``max_length``), and the tokens scored are the ones extraction counted: the answer tokens
of a prompt/answer run, every token of a text run but the first (which nothing predicts).
Scores are teacher forced: the logits at position t-1 score the token at t.

Which models: the run's base model, loaded once per run (in its checkpoint's dtype), and for
each request the base with the request's plan applied in memory
(:func:`~engram_ray.core.edit.apply_edit`); the touched parameters are copied first and copied
back after, so the next request starts from the base again. For a full request that is the
checkpoint it writes (bit for bit in float32; in 16-bit dtypes up to the rounding of the
subtraction, which ``apply_edit`` does in the weight's dtype and the checkpoint writer in
float32); for a ``peft`` request it is the dense edit, which the adapter equals up to the
per-module error its ``adapter_meta.json`` reports (``"model": "dense edit"``). The base
model's scores of a set are computed once and shared by every request naming it. Scoring runs
where the batch runs, on CPU.

A run whose model cannot be scored this way (a factory model: no tokenizer; a
``features_column`` run: no tokens) or an eval set that cannot be read or lacks a column
raises a one-line :class:`EvalError` naming the eval set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engram_ray.config import DataConfig
from engram_ray.core.edit import EditPlan, apply_edit
from engram_ray.io.data import collate, encode_rows, pad_token_id, read_table, resolve_files
from engram_ray.models.loading import ModelSpec, load_model, load_tokenizer

__all__ = ["EditEvaluator", "EvalError", "RowScores", "edited", "eval_data_config",
           "score_rows", "split_summary"]

# The data config keys an eval set takes from the run (its paths and format are its own).
_DATA_KEYS = ("concept_column", "text_column", "prompt_column", "answer_column",
              "max_length", "batch_size")


class EvalError(ValueError):
    """An eval set that cannot be scored: unreadable, a column missing, or a run whose model
    has no tokens to score."""


@dataclass
class RowScores:
    """Per eval row: summed NLL of its scored tokens, argmax hits, scored tokens."""

    nll: np.ndarray  # float64
    hits: np.ndarray  # int64
    tokens: np.ndarray  # int64


def eval_data_config(run, uri: str, spec: ModelSpec,
                     storage_options: Mapping | None = None) -> DataConfig:
    """The data config reading the eval set ``uri`` with the run's own columns and
    ``max_length``; an :class:`EvalError` when the run cannot be evaluated."""
    if spec.path is None:
        raise EvalError(f"eval {uri}: run {run.uri} builds its model with factory "
                        f"{spec.factory!r}, which has no tokenizer: nothing to score")
    raw = (run.info.get("config") or {}).get("data")
    if not raw:
        raise EvalError(f"eval {uri}: run {run.uri} does not record its data config "
                        "(the columns to read)")
    if raw.get("features_column"):
        raise EvalError(f"eval {uri}: run {run.uri} was extracted from feature vectors "
                        f"(features_column {raw['features_column']!r}): no tokens to score")
    kept = {k: raw[k] for k in _DATA_KEYS if raw.get(k) is not None}
    return DataConfig(paths=[uri], storage_options=dict(storage_options or {}) or None, **kept)


def _read_encoded(cfg: DataConfig, tokenizer) -> dict[str, np.ndarray]:
    """Every row of the set encoded as extraction encodes (rows with no counted token
    dropped); an :class:`EvalError` naming the set when it cannot be read."""
    uri = cfg.paths[0]
    try:
        tables = [read_table(f, cfg) for f in resolve_files(cfg)]  # each set file built once
        parts = [encode_rows(t, cfg, tokenizer, stats={}) for t in tables]
    except (ValueError, OSError) as e:
        raise EvalError(f"eval {uri}: {str(e).splitlines()[0]}") from e
    encoded = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not len(encoded["concept"]):
        raise EvalError(f"eval {uri}: no row with a token to score")
    return encoded


@torch.no_grad()
def score_rows(model: nn.Module, encoded: Mapping[str, np.ndarray], pad_id: int,
               batch_size: int = 8) -> RowScores:
    """Teacher-forced :class:`RowScores` of encoded rows (``encode_rows``' layout): the
    logits at t-1 score the token at t, for every t the row's mask counts (t ≥ 1)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(encoded["concept"]), batch_size):
        batch = collate({k: v[start:start + batch_size] for k, v in encoded.items()}, pad_id)
        ids = batch.inputs["input_ids"].to(device)
        logits = getattr(model(input_ids=ids, attention_mask=batch.inputs["attention_mask"]
                               .to(device)), "logits", None)
        if logits is None:
            raise EvalError(f"model {type(model).__name__} has no language-model head "
                            "(its output has no logits): nothing to score")
        logits, target = logits[:, :-1].float(), ids[:, 1:]
        counted = batch.mask[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target,
                                                reduction="none")
        hits = logits.argmax(-1) == target
        out.append(((nll.double() * counted).sum(1), (hits & counted).sum(1), counted.sum(1)))
    return RowScores(*(torch.cat(parts).cpu().numpy() for parts in zip(*out)))


def split_summary(concepts: np.ndarray, forget: Sequence[str], base: RowScores,
                  edited: RowScores) -> dict[str, dict]:
    """``{"forget": …, "retain": …}``: rows, tokens and the base and edited model's mean
    per-token NLL (``loss_*``) and next-token accuracy (``acc_*``) on each (None: no token)."""
    forget = set(forget)
    in_forget = np.array([c in forget for c in concepts], dtype=bool)
    out = {}
    for name, rows in (("forget", in_forget), ("retain", ~in_forget)):
        tokens = int(base.tokens[rows].sum())
        split = {"rows": int(rows.sum()), "tokens": tokens}
        for label, s in (("base", base), ("edited", edited)):
            split[f"loss_{label}"] = float(s.nll[rows].sum() / tokens) if tokens else None
            split[f"acc_{label}"] = float(s.hits[rows].sum() / tokens) if tokens else None
        out[name] = split
    return out


@contextmanager
def edited(model: nn.Module, plan: EditPlan) -> Iterator[nn.Module]:
    """``model`` with ``plan`` applied in place, its touched parameters copied back after.
    The plan is applied as a copy (``apply_edit`` notes tied weights in the plan it is given,
    and the written output's marker reports the plan's own notes)."""
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in plan.scales:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue  # apply_edit refuses it, naming the module, before changing anything
        for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
            if isinstance(p, torch.Tensor) and id(p) not in saved:
                saved[id(p)] = (p, p.detach().clone())
    try:
        apply_edit(model, dataclasses.replace(plan, notes=[]))
        yield model
    finally:
        with torch.no_grad():
            for p, original in saved.values():
                p.copy_(original)


class EditEvaluator:
    """The eval summaries of one run's edits: its base model and tokenizer loaded once (on
    first use), each eval set read, encoded and scored on the base model once. ``location``:
    the model's path as the caller built it (``models.loading.model_location``)."""

    def __init__(self, run, spec: ModelSpec, storage_options: Mapping | None = None, *,
                 location=None) -> None:
        self.run, self.spec, self.storage_options = run, spec, storage_options
        self.location = location
        self._model = self._tokenizer = None
        self._sets: dict[str, tuple[DataConfig, dict, RowScores]] = {}

    def _base(self):
        if self._model is None:
            self._tokenizer = load_tokenizer(self.spec, self.storage_options,
                                             location=self.location)
            self._model = load_model(self.spec, self.storage_options, location=self.location)
        return self._model, self._tokenizer

    def _set(self, uri: str) -> tuple[DataConfig, dict, RowScores]:
        if uri not in self._sets:
            cfg = eval_data_config(self.run, uri, self.spec, self.storage_options)
            model, tokenizer = self._base()
            encoded = _read_encoded(cfg, tokenizer)
            base = score_rows(model, encoded, pad_token_id(tokenizer), cfg.batch_size)
            self._sets[uri] = (cfg, encoded, base)
        return self._sets[uri]

    def summary(self, uri: str, plan: EditPlan, model_label: str) -> dict:
        """The eval summary of ``plan`` on the set ``uri`` (what the marker's ``"eval"``
        holds): the set, which model was scored, and :func:`split_summary`."""
        cfg, encoded, base = self._set(uri)
        model, tokenizer = self._base()
        with edited(model, plan):
            after = score_rows(model, encoded, pad_token_id(tokenizer), cfg.batch_size)
        return {"set": uri, "model": model_label,
                "tokens": "answer" if cfg.mode == "prompt_answer" else "text",
                **split_summary(encoded["concept"], plan.forget, base, after)}
