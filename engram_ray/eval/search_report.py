"""The driver side of ``engram-ray eval``: read the TOFU splits, run an α search, write the report.

The search is passed in (the CLI passes :func:`engram_ray.distributed.search.alpha_search`,
which scores each α as a Ray task), so this module stays free of Ray: it reads the splits,
resolves the model directory, and writes ``eval.json`` (every α's metric dict and the best α by
Overall) and ``eval.png`` (the metrics against α).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["CURVES", "AlphaSearch", "run_alpha_eval", "write_eval_report"]

CURVES = ("overall", "memorization", "utility", "privacy", "forget_prob", "retain_prob")
"""The metrics ``eval.png`` draws against α."""


class AlphaSearch(Protocol):
    """What :func:`run_alpha_eval` calls: the signature of ``alpha_search``."""

    def __call__(self, model_dir: str, gold_dir: str, run_uri: str, forget: Sequence[str],
                 splits: tuple[Any, Any, Any], alphas: Sequence[float], *,
                 scale: str = "uniform") -> Mapping[str, Any]: ...


def run_alpha_eval(search: AlphaSearch, *, run_uri: str, model_path: str, gold_dir: str,
                   split_paths: tuple[str, str, str], forget: Sequence[str],
                   alphas: Sequence[float], out: str, scale: str = "uniform") -> str:
    """Score ``run_uri``'s edit of the model at ``model_path`` for every α with ``search``
    against the retain-only model ``gold_dir``, on the (forget, retain, holdout) Parquet splits
    at ``split_paths``; writes the report into ``out`` and returns the path of ``eval.json``."""
    from engram_ray.eval.corpus import read_split
    from engram_ray.models.loading import model_dir

    splits = tuple(read_split(p) for p in split_paths)
    result = search(model_dir(model_path), gold_dir, run_uri, list(forget), splits,
                    list(alphas), scale=scale)
    return write_eval_report(result, out, forget)


def write_eval_report(result: Mapping[str, Any], out: str, forget: Sequence[str]) -> str:
    """Write ``eval.json`` and ``eval.png`` for a search ``result`` into ``out``, log the best α
    on stderr; returns the path of ``eval.json``."""
    from engram_ray.eval.plots import metric_curves

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "eval.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    metric_curves(result["results"], CURVES, os.path.join(out, "eval.png"),
                  f"TOFU metrics against α (forget {', '.join(forget)})")
    b = result["best"]
    print(f"[engram-ray] best α = {b['alpha']} (overall {b.get('overall', float('nan')):.3f})",
          file=sys.stderr)
    return path
