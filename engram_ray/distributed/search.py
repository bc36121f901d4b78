"""``engram-ray eval``: TOFU-protocol evaluation of an edit, and an α search as parallel tasks.

The unedited model (the *base*) and the retain-only *gold* model are scored once on the driver;
each α then runs as its own Ray task that edits a fresh copy of the model from the run and
scores it against those anchors. The objective is the paper's Overall (harmonic mean of
Memorization, Utility and Privacy); every α's full metric dict is kept.
"""

from __future__ import annotations

import json
import os
import sys

import ray

__all__ = ["alpha_search", "eval_command"]


@ray.remote
def _score_alpha(model_dir, run_uri, forget, alpha, scale, splits, gold, base, template):
    import torch

    from engram_ray.core.edit import apply_edit, plan_edit
    from engram_ray.eval.lm_scores import TofuEvaluator
    from engram_ray.io.store import open_run
    from engram_ray.models.loading import ModelSpec, load_model, load_tokenizer

    torch.set_num_threads(1)
    spec = ModelSpec(path=model_dir)
    model, tok = load_model(spec), load_tokenizer(spec)
    apply_edit(model, plan_edit(open_run(run_uri), forget, alpha=alpha, scale=scale))
    evaluator = TofuEvaluator(tok, *splits, gold=gold, base=base, template=template)
    return {"alpha": alpha, **evaluator(model)}


def alpha_search(model_dir: str, gold_dir: str, run_uri: str, forget: list[str],
                 splits: tuple, alphas: list[float], *, scale: str = "uniform",
                 template=None, num_cpus: float = 1.0) -> dict:
    """Score every α in parallel; returns ``{"results": [...], "best": {...}}``."""
    from engram_ray.eval.lm_scores import DEFAULT_TEMPLATE, TofuEvaluator
    from engram_ray.models.loading import ModelSpec, load_model, load_tokenizer

    template = template or DEFAULT_TEMPLATE
    base_spec, gold_spec = ModelSpec(path=model_dir), ModelSpec(path=gold_dir)
    anchors = TofuEvaluator(load_tokenizer(base_spec), *splits, gold=load_model(gold_spec),
                            base=load_model(base_spec), template=template)
    gold, base = ray.put(anchors.gold), ray.put(anchors.base)
    tasks = [_score_alpha.options(num_cpus=num_cpus).remote(
        model_dir, run_uri, forget, a, scale, splits, gold, base, template) for a in alphas]
    results = sorted(ray.get(tasks), key=lambda r: r["alpha"])
    best = max(results, key=lambda r: r.get("overall", float("-inf")))
    return {"objective": "overall", "results": results, "best": best}


def eval_command(args) -> str:
    """The CLI's ``eval``: writes ``eval.json`` and ``eval.png`` into ``--out``."""
    from engram_ray.apply import run_model_spec
    from engram_ray.distributed.runner import ensure_ray
    from engram_ray.eval.corpus import read_split
    from engram_ray.eval.plots import metric_curves
    from engram_ray.io.store import open_run

    run = open_run(args.run)
    spec = run_model_spec(run, args.model)
    if spec.path is None:
        raise ValueError("eval needs an HF causal LM (model.path), not a factory model")
    splits = tuple(read_split(p) for p in (args.forget_set, args.retain_set, args.holdout_set))
    forget = [s.strip() for s in args.forget.split(",") if s.strip()]
    alphas = [float(a) for a in args.alphas.split(",")]
    ensure_ray(None)
    from engram_ray.models.loading import model_dir

    out = alpha_search(model_dir(spec.path), args.gold, args.run, forget, splits, alphas,
                       scale=args.scale)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(out, f, indent=2)
    metric_curves(out["results"], ["overall", "memorization", "utility", "privacy",
                                   "forget_prob", "retain_prob"],
                  os.path.join(args.out, "eval.png"),
                  f"TOFU metrics against α (forget {', '.join(forget)})")
    b = out["best"]
    print(f"[engram-ray] best α = {b['alpha']} (overall {b.get('overall', float('nan')):.3f})",
          file=sys.stderr)
    return os.path.join(args.out, "eval.json")
