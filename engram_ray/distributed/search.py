"""The α search of ``engram-ray eval``: each α scored as its own Ray task.

The unedited model (the *base*) and the retain-only *gold* model are scored once on the driver;
each α then runs as its own Ray task that edits a fresh copy of the model from the run and
scores it against those anchors. The objective is the paper's Overall (harmonic mean of
Memorization, Utility and Privacy); every α's full metric dict is kept. Reading the splits and
writing the report is :mod:`engram_ray.eval.search_report`'s job, not this module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

__all__ = ["alpha_search"]


@ray.remote
def _score_alpha(model_dir, run_uri, forget, alpha, scale, splits, gold, base, template):
    """One α: edit a fresh copy of the model and score it against the shared anchors."""
    import torch

    from engram_ray.core.edit import apply_edit, plan_edit
    from engram_ray.eval.lm_scores import TofuEvaluator
    from engram_ray.models.loading import ModelSpec, load_model, load_tokenizer
    from engram_ray.runs import open_run

    torch.set_num_threads(1)
    spec = ModelSpec(path=model_dir)
    model, tok = load_model(spec), load_tokenizer(spec)
    run = open_run(run_uri, model=model_dir)  # engrams from the unedited checkpoint's weights
    apply_edit(model, plan_edit(run, forget, alpha=alpha, scale=scale))
    evaluator = TofuEvaluator(tok, *splits, gold=gold, base=base, template=template)
    return {"alpha": alpha, **evaluator(model)}


def alpha_search(model_dir: str, gold_dir: str, run_uri: str, forget: Sequence[str],
                 splits: tuple[Any, Any, Any], alphas: Sequence[float], *,
                 scale: str = "uniform", template=None, num_cpus: float = 1.0) -> dict:
    """Score every α in parallel (joining or starting Ray if not connected).

    ``splits`` are the (forget, retain, holdout) QA tables; returns ``{"objective": "overall",
    "results": [one metric dict per α, by α], "best": the result with the highest Overall}``.
    """
    from engram_ray.distributed.cluster import ensure_ray
    from engram_ray.eval.lm_scores import DEFAULT_TEMPLATE, TofuEvaluator
    from engram_ray.models.loading import ModelSpec, load_model, load_tokenizer

    ensure_ray(None)
    template = template or DEFAULT_TEMPLATE
    base_spec, gold_spec = ModelSpec(path=model_dir), ModelSpec(path=gold_dir)
    anchors = TofuEvaluator(load_tokenizer(base_spec), *splits, gold=load_model(gold_spec),
                            base=load_model(base_spec), template=template)
    gold, base = ray.put(anchors.gold), ray.put(anchors.base)
    forget = list(forget)
    tasks = [_score_alpha.options(num_cpus=num_cpus).remote(
        model_dir, run_uri, forget, a, scale, splits, gold, base, template) for a in alphas]
    results = sorted(ray.get(tasks), key=lambda r: r["alpha"])
    best = max(results, key=lambda r: r.get("overall", float("-inf")))
    return {"objective": "overall", "results": results, "best": best}
