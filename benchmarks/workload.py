"""The Ray-pipeline benchmark workload (issue 11): a small Llama, QA Parquet shards, a config.

    .venv/bin/python benchmarks/workload.py DIR [--rows 1200] [--concepts 50] [--shards 8]

writes ``DIR/model`` (a random ``LlamaForCausalLM``: hidden 384, intermediate 768, 6 layers,
8 heads / 4 KV heads, vocab 512, with a BPE tokenizer trained on the corpus), ``DIR/data``
(the synthetic fictitious-author QA corpus, concept = author, split over Parquet shards) and
``DIR/extract.yaml`` (every default but the paths, so ``engram-ray extract DIR/extract.yaml``
is the CLI's default path). Shared by ``extract_throughput.py`` and ``scaling_bytes.py`` so
every row of both measures the same data.
"""

from __future__ import annotations

import argparse
import json
import os

PROMPT = "Question: {q}\nAnswer:"
MODEL = {"hidden": 384, "layers": 6, "heads": 8, "kv_heads": 4, "vocab_size": 512}


def qa_rows(n_concepts: int, n_rows: int, seed: int = 0) -> list[dict]:
    """``n_rows`` QA rows over ``n_concepts`` authors (``n_rows / n_concepts`` each)."""
    from engram_ray.eval.corpus import make_corpus

    per = max(1, -(-n_rows // n_concepts))
    corpus = make_corpus(n_authors=n_concepts, qa_per_author=per, seed=seed).to_pylist()
    return [{"author": r["author"], "prompt": PROMPT.format(q=r["question"]),
             "answer": " " + r["answer"]} for r in corpus[:n_rows]]


def write_shards(rows: list[dict], root: str, shards: int) -> str:
    """``rows`` round-robin over ``shards`` Parquet files under ``root``; returns ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    for i in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[i::shards]),
                       os.path.join(root, f"part-{i:03d}.parquet"))
    return root


def build_model(path: str, seed_rows: list[dict], **overrides) -> str:
    """The benchmark Llama and its tokenizer (trained on ``seed_rows``' text) at ``path``."""
    from engram_ray.models.tiny import save_tiny_llama

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    texts = [r["prompt"] for r in seed_rows] + [r["answer"] for r in seed_rows]
    kw = {**MODEL, **overrides}
    return save_tiny_llama(path, corpus=texts, **kw)


def config_dict(model_dir: str, data_dir: str, runs: str, **sections) -> dict:
    """The extract config: data columns and paths, everything else at its default unless
    ``sections`` (e.g. ``parallel={...}``) says otherwise."""
    cfg = {
        "model": {"path": model_dir},
        "data": {"paths": [data_dir], "concept_column": "author", "prompt_column": "prompt",
                 "answer_column": "answer", "max_length": 128, "batch_size": 8},
        "store": {"uri": runs},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def build(root: str, rows: int = 1200, concepts: int = 50, shards: int = 8) -> dict:
    """Model, shards and ``extract.yaml`` under ``root``; returns their paths."""
    data = qa_rows(concepts, rows)
    model_dir = build_model(os.path.join(root, "model"), data)
    data_dir = write_shards(data, os.path.join(root, f"data-{rows}-{concepts}"), shards)
    cfg_path = os.path.join(root, f"extract-{rows}-{concepts}.yaml")
    with open(cfg_path, "w") as f:
        json.dump(config_dict(model_dir, data_dir, os.path.join(root, "runs")), f, indent=1)
    return {"model": model_dir, "data": data_dir, "config": cfg_path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--concepts", type=int, default=50)
    ap.add_argument("--shards", type=int, default=8)
    a = ap.parse_args()
    print(json.dumps(build(a.root, a.rows, a.concepts, a.shards)))


if __name__ == "__main__":
    main()
