"""Many edited variants of one model: PEFT adapters vs full checkpoints, side by side in one run.

    .venv/bin/python benchmarks/adapter_variants.py [--quick] [--variants 20] [--out docs/adapters.md]

Two models, each extracted once from the same synthetic fictitious-author corpus (concept =
author, answer tokens counted), then ``--variants`` forget edits (variant i forgets 1–3
authors), each written both ways:

- ``full``: ``apply_run`` (what ``apply --format full`` runs): the edited checkpoint, streamed;
- ``peft``: :func:`engram_ray.apply.write_peft_adapter`: a LoRA adapter for the base.

Measured per variant: bytes written, seconds to write, seconds to load (the full checkpoint
with ``from_pretrained``; the adapter with ``load_adapter`` onto the one base already in memory,
how a server swaps variants), the adapter's worst reported relative error, and for the first
variant the largest logit difference between the adapter on the base and the full checkpoint.

Models: a small Llama (hidden 256, 4 layers, float32, every linear module, its untied lm_head
included) and a "1B-shaped" stack (Llama-3.2-1B's widths: hidden 2048, intermediate 8192, 32
heads, 8 KV heads, bfloat16, tied embeddings; 2 layers, a small vocabulary). The 1B-shaped run
selects q/k/v/o/gate/up: ``down_proj`` reads 8192-wide inputs and its one float64
``eigh`` of the 8192² Σ would take ~7 minutes on the 2-core machine the table was measured on
(50 s measured at 4096², n³ scaling)
(its adapter would be the size of ``up_proj``'s: same (out + in)); the tied lm_head is refused
by the adapter (see docs/adapters.md). Timings are wall-clock on a shared machine: read ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engram_ray import apply_edit, plan_edit  # noqa: E402
from engram_ray.apply import (
    apply_run,  # noqa: E402
    write_peft_adapter,  # noqa: E402
)
from engram_ray.eval.corpus import corpus_texts, make_corpus  # noqa: E402
from engram_ray.io.data import DataConfig, collate, encode_rows  # noqa: E402
from engram_ray.local import extract  # noqa: E402
from engram_ray.models.loading import ModelSpec, load_model, load_tokenizer  # noqa: E402
from engram_ray.models.tiny import save_tiny_llama  # noqa: E402

PROMPT = "Question: {q}\nAnswer:"
BEGIN, END = "<!-- adapter-variants:begin -->", "<!-- adapter-variants:end -->"
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
MODELS = {
    "Llama 256×4 (fp32)": dict(
        arch=dict(hidden=256, layers=4, heads=8, kv_heads=4), dtype=torch.float32,
        select={}),
    "1B-shaped ×2 layers (bf16)": dict(
        arch=dict(hidden=2048, intermediate_size=8192, layers=2, heads=32, kv_heads=8,
                  tie_word_embeddings=True, rope_theta=500000.0), dtype=torch.bfloat16,
        select={"target_modules": ATTN_MLP}),
}
QUICK = {"Llama 256×4 (fp32)": dict(hidden=128, layers=2, heads=8, kv_heads=4),
         "1B-shaped ×2 layers (bf16)": dict(hidden=512, intermediate_size=2048, layers=2,
                                            heads=8, kv_heads=2, tie_word_embeddings=True)}


def build(tmp: str, name: str, quick: bool, n_authors: int):
    """Save the model, extract its run over the corpus; returns (model dir, run, seconds)."""
    spec = MODELS[name]
    arch = QUICK[name] if quick else spec["arch"]
    corpus = make_corpus(n_authors=n_authors, qa_per_author=4 if quick else 8, seed=0)
    tag = name.split()[0]
    src = os.path.join(tmp, f"{tag}-model")
    torch.manual_seed(0)
    save_tiny_llama(src, corpus=corpus_texts(corpus), vocab_size=512, **arch)
    if spec["dtype"] != torch.float32:  # the checkpoint in the model's shipping dtype
        load_model(ModelSpec(path=src), dtype=spec["dtype"]).save_pretrained(src)
    tok = load_tokenizer(ModelSpec(path=src))
    model = load_model(ModelSpec(path=src), dtype=torch.float32).eval()  # extraction in fp32
    t0 = time.perf_counter()
    run = extract(model, _batches(tok, corpus), uri=os.path.join(tmp, f"{tag}-run"),
                  config={"model": {"path": src}}, **spec["select"])
    return src, run, time.perf_counter() - t0, sorted(set(corpus.column("author").to_pylist()))


def _batches(tok, corpus, batch_size: int = 8):
    """The pipeline's encoding: prompt with special tokens + answer, answer tokens counted."""
    rows = corpus.to_pylist()
    cols = {"author": [r["author"] for r in rows],
            "prompt": [PROMPT.format(q=r["question"]) for r in rows],
            "answer": [" " + r["answer"] for r in rows]}
    cfg = DataConfig(paths=["in-memory"], concept_column="author", prompt_column="prompt",
                     answer_column="answer", max_length=128, batch_size=batch_size)
    enc = encode_rows(cols, cfg, tok)
    n = len(enc["concept"])
    return [collate({k: v[i:i + batch_size] for k, v in enc.items()}, tok.pad_token_id)
            for i in range(0, n, batch_size)]


def _bytes(path: str, suffix: str = "") -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(suffix))


def variants(authors: list[str], n: int) -> list[list[str]]:
    """Variant i forgets 1, 2 or 3 consecutive authors (i mod 3 + 1)."""
    return [[authors[(i + j) % len(authors)] for j in range(i % 3 + 1)] for i in range(n)]


def measure(tmp: str, src: str, run, forgets: list[list[str]]) -> list[dict]:
    """Per variant: write and load both ways; the full checkpoint is removed once measured."""
    from peft import PeftModel

    rows, served = [], None
    for i, forget in enumerate(forgets):
        full, adapter = os.path.join(tmp, f"full-{i}"), os.path.join(tmp, f"peft-{i}")
        t0 = time.perf_counter()
        apply_run(run.uri, forget, alpha=1.0, out=full)
        t1 = time.perf_counter()
        meta = write_peft_adapter(run, forget, alpha=1.0, out=adapter)
        t2 = time.perf_counter()
        edited = load_model(ModelSpec(path=full)).eval()
        t3 = time.perf_counter()
        if served is None:
            served = PeftModel.from_pretrained(load_model(ModelSpec(path=src)), adapter,
                                               adapter_name="v0").eval()
        else:
            served.load_adapter(adapter, adapter_name=f"v{i}")
        t4 = time.perf_counter()
        row = {"forget": len(forget), "full_bytes": _bytes(full, ".safetensors"),
               "peft_bytes": _bytes(adapter), "full_write": t1 - t0, "peft_write": t2 - t1,
               "full_load": t3 - t2, "peft_load": t4 - t3, "rel_error": meta["max_rel_error"],
               "forms": sorted({s["form"] for s in meta["modules"].values()})}
        if i == 0:
            row["full_vs_exact"], row["peft_vs_exact"] = _logit_errors(served, edited, src, run,
                                                                       forget)
        rows.append(row)
        shutil.rmtree(full)
        del edited
    return rows


@torch.no_grad()
def _logit_errors(served, edited, src: str, run, forget) -> tuple[float, float]:
    """Largest logit error of the full checkpoint and of the adapter on the base, against the
    exact edit (the base's weights in float32, ``apply_edit`` in float32)."""
    exact = load_model(ModelSpec(path=src), dtype=torch.float32).eval()
    apply_edit(exact, plan_edit(run, forget, alpha=1.0))
    served.set_adapter("v0")
    x = torch.randint(3, 300, (2, 24))
    want = exact(x).logits
    return (float((edited(x).logits.float() - want).abs().max()),
            float((served(x).logits.float() - want).abs().max()))


def table(results: dict[str, tuple]) -> str:
    med = statistics.median
    lines = [
        "| model | variants | full: MiB | adapter: MiB (median / max) | bytes ratio | "
        "full: write s | adapter: write s | full: load s | adapter: load s | adapter forms | "
        "worst rel. error | max abs logit error vs exact edit: full / adapter |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (rows, _) in results.items():
        fb, pb = med(r["full_bytes"] for r in rows), [r["peft_bytes"] for r in rows]
        forms = sorted({f for r in rows for f in r["forms"]})
        lines.append(
            f"| {name} | {len(rows)} | {fb / 2**20:.1f} | {med(pb) / 2**20:.2f} / "
            f"{max(pb) / 2**20:.2f} | {fb / med(pb):.1f}× | "
            f"{med(r['full_write'] for r in rows):.2f} | {med(r['peft_write'] for r in rows):.2f} | "
            f"{med(r['full_load'] for r in rows):.2f} | {med(r['peft_load'] for r in rows):.2f} | "
            f"{', '.join(forms)} | {max(r['rel_error'] for r in rows):.1e} | "
            f"{rows[0]['full_vs_exact']:.1e} / {rows[0]['peft_vs_exact']:.1e} |")
    extracted = ", ".join(f"{name} {s:.0f} s" for name, (_, s) in results.items())
    return "\n".join(lines) + f"\n\nOne extraction per model (not in the table): {extracted}.\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller models (a smoke run)")
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--authors", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None,
                    help="also write the table here (between the markers, if the file has them)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="engram-adapters-") as tmp:
        for name in MODELS:
            sub = os.path.join(tmp, name.split()[0])
            os.makedirs(sub)
            src, run, extract_s, authors = build(sub, name, args.quick, args.authors)
            rows = measure(sub, src, run, variants(authors, args.variants))
            results[name] = (rows, extract_s)
            print(f"{name}: done", file=sys.stderr, flush=True)
    text = table(results)
    print(text)
    if args.out:
        splice(args.out, text)


def splice(path: str, text: str) -> None:
    """Replace the text between ``BEGIN`` and ``END`` in ``path`` (the whole file without them)."""
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
