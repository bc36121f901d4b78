"""A synthetic dataset in TOFU's published file layout, and tiny Llamas trained on it.

TOFU's files (``locuslab/TOFU``) and its 1B checkpoints cannot be reached offline, so the
``engram-ray tofu`` pipeline is exercised on files laid out exactly as TOFU publishes them,
about fictitious authors invented by :func:`engram_ray.eval.corpus.make_corpus`:

* ``full.json``: every author's QA rows, :data:`QA_PER_AUTHOR` (20) per author, author after
  author, columns ``question`` and ``answer`` only (TOFU has no author column);
* ``forgetXX.json``: the last authors' rows of ``full.json``, in order; ``retainYY.json``
  (``YY = 100 - XX``): the rows before them;
* ``forgetXX_perturbed.json``: the forget rows with ``paraphrased_answer`` (str) and
  ``perturbed_answer`` (list of str); ``retain_perturbed.json``: the same columns on the first
  authors' rows;
* ``holdoutXX.json``: as many rows of authors that are *not* in ``full.json`` (MIA non-members);
* ``real_authors(_perturbed).json`` and ``world_facts(_perturbed).json`` (optional): ``question``,
  ``answer``, ``perturbed_answer``; here stand-ins drawn from retained authors' facts (a tiny
  model knows no real-world facts), so their numbers mean "knowledge the edit should keep".

All files are JSON lines, as ``datasets`` reads TOFU's. The forget sets hold whole authors, so
with fewer than 100 authors the ``XX`` names say which published split a file plays, not its
percentage (:data:`DEFAULT_FORGET_AUTHORS`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

__all__ = ["DEFAULT_FORGET_AUTHORS", "QA_PER_AUTHOR", "train_models", "write_synthetic_tofu"]

QA_PER_AUTHOR = 20  # TOFU: 20 QA pairs per author
DEFAULT_FORGET_AUTHORS = {"forget01": 1, "forget05": 2, "forget10": 3}


def _write(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_synthetic_tofu(out_dir: str, n_authors: int = 4, *, holdout_authors: int | None = None,
                         forget_authors: Mapping[str, int] | None = None,
                         retain_perturbed_authors: int = 1, extras: bool = False,
                         seed: int = 0) -> dict[str, str]:
    """Write the files (see the module docstring) under ``out_dir``; returns ``{name: path}``.

    ``forget_authors`` maps each forget split to its number of authors (default
    :data:`DEFAULT_FORGET_AUTHORS`, keeping those that leave at least one retained author);
    ``holdout_authors`` authors beyond ``full.json`` back every ``holdoutXX`` (default: the
    largest forget split's count); ``extras`` adds real-authors and world-facts stand-ins.
    """
    from engram_ray.eval.corpus import make_corpus

    forget_authors = dict(forget_authors or {k: v for k, v in DEFAULT_FORGET_AUTHORS.items()
                                             if v < n_authors})
    if not forget_authors or max(forget_authors.values()) >= n_authors:
        raise ValueError(f"{n_authors} authors leave no retained author for {forget_authors}")
    n_hold = holdout_authors or max(forget_authors.values())
    corpus = make_corpus(n_authors + n_hold, QA_PER_AUTHOR, seed=seed).to_pylist()
    q = QA_PER_AUTHOR
    rows, held = corpus[: n_authors * q], corpus[n_authors * q:]
    os.makedirs(out_dir, exist_ok=True)
    plain = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    pert = [{"question": r["question"], "answer": r["answer"],
             "paraphrased_answer": r["paraphrased_answer"],
             "perturbed_answer": list(r["perturbed_answer"])} for r in rows]
    paths = {"full": _write(os.path.join(out_dir, "full.json"), plain)}
    for split, k in sorted(forget_authors.items()):
        pct = split[len("forget"):]
        cut = (n_authors - k) * q
        paths[split] = _write(os.path.join(out_dir, f"{split}.json"), plain[cut:])
        paths[f"{split}_perturbed"] = _write(os.path.join(out_dir, f"{split}_perturbed.json"),
                                             pert[cut:])
        retain = f"retain{100 - int(pct):02d}"
        paths[retain] = _write(os.path.join(out_dir, f"{retain}.json"), plain[:cut])
        hold = [{"question": r["question"], "answer": r["answer"]} for r in held[: k * q]]
        paths[f"holdout{pct}"] = _write(os.path.join(out_dir, f"holdout{pct}.json"), hold)
    paths["retain_perturbed"] = _write(os.path.join(out_dir, "retain_perturbed.json"),
                                       pert[: retain_perturbed_authors * q])
    if extras:
        picks = pert[: q : 4]  # a few facts of the first (always retained) author
        for name, rows_ in (("real_authors", picks[::2]), ("world_facts", picks[1::2])):
            full_rows = [{"question": r["question"], "answer": r["answer"],
                          "perturbed_answer": r["perturbed_answer"]} for r in rows_]
            paths[name] = _write(os.path.join(out_dir, f"{name}.json"),
                                 [{"question": r["question"], "answer": r["answer"]}
                                  for r in rows_])
            paths[f"{name}_perturbed"] = _write(
                os.path.join(out_dir, f"{name}_perturbed.json"), full_rows)
    return paths


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_models(data_dir: str, out_dir: str, retain_splits: tuple[str, ...] = ("retain99",), *,
                 hidden: int = 64, layers: int = 2, epochs: int = 30, lr: float = 3e-3,
                 vocab_size: int = 512, seed: int = 0, num_threads: int | None = 1
                 ) -> dict[str, str]:
    """Tiny Llamas (``engram_ray.eval.train_lm``) saved as HF directories under ``out_dir``:
    ``full`` trained on ``full.json`` and one per ``retain_splits`` (the retain models whose
    eval logs give forget quality), all from the same seeded init and one byte-level tokenizer
    trained on every file of ``data_dir``. Returns ``{name: directory}``."""
    import pyarrow as pa

    from engram_ray.eval.train_lm import finetune_lm, qa_texts, torch_threads
    from engram_ray.models.tiny import build_tokenizer, tiny_llama

    tables = [pa.Table.from_pylist(_read(os.path.join(data_dir, f)))
              for f in sorted(os.listdir(data_dir)) if f.endswith(".json")]
    texts = qa_texts([t.select([c for c in t.column_names
                                if c in ("question", "answer", "paraphrased_answer",
                                         "perturbed_answer")]) for t in tables])
    tok = build_tokenizer(texts, vocab_size=vocab_size)
    out = {}
    for name in ("full", *retain_splits):
        rows = _read(os.path.join(data_dir, f"{name}.json"))
        with torch_threads(num_threads):
            model = finetune_lm(tiny_llama(vocab_size=len(tok), hidden=hidden, layers=layers,
                                           seed=seed), tok, rows, epochs=epochs, lr=lr,
                                seed=seed, batch_size=16)
        out[name] = os.path.join(out_dir, name)
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out
