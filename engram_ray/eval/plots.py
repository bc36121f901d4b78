"""PNG figures a reader understands without the code: titles, axis labels, colour bars, units.

- :func:`ablation_heatmap`: rows = the class whose engram was subtracted, columns = the class
  evaluated, colour = test accuracy. A dark diagonal over an intact (bright) off-diagonal is
  selective forgetting (the AI Engram paper's Fig. 4/11).
- :func:`alpha_curves`: forget and retain accuracy against α, with the retrained model's levels
  as dashed references.
- :func:`norm_heatmap`: ``‖W⁺_c‖ / ‖W‖`` per concept and layer — where each concept's trace lives.
- :func:`tofu_tradeoff`: TOFU forget quality (log scale) against model utility, one panel per
  forget split, one point per α, the unedited and the retain model as reference points (the
  AI Engram paper's Table 6 read as a plot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["ablation_heatmap", "alpha_curves", "metric_curves", "norm_heatmap", "tofu_tradeoff"]


def _annotate(ax, m: np.ndarray, fmt: str = "{:.2f}", threshold: float = 0.5) -> None:
    if m.shape[0] * m.shape[1] > 400:
        return  # too many cells to read numbers in
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if v < threshold else "black")


def ablation_heatmap(acc: np.ndarray, labels: Sequence[str], path: str, title: str,
                     baseline: np.ndarray | None = None) -> str:
    """``acc[i, j]``: test accuracy on class j after forgetting class i."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("evaluated class (test accuracy)")
    ax.set_ylabel("forgotten class (engram subtracted, α = 1)")
    sub = ""
    if baseline is not None:
        sub = f"\nunedited model: mean per-class accuracy {np.nanmean(baseline):.3f}"
    ax.set_title(title + sub)
    _annotate(ax, acc)
    fig.colorbar(im, ax=ax, label="test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def alpha_curves(alphas: Sequence[float], forget: np.ndarray, retain: np.ndarray, path: str,
                 title: str, gold_forget: float | None = None,
                 gold_retain: float | None = None) -> str:
    """``forget`` / ``retain``: (n_classes, n_alphas) accuracies; plotted as mean ± range."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for data, name, color in ((forget, "forgotten class", "tab:red"),
                              (retain, "other classes", "tab:blue")):
        mean = data.mean(0)
        ax.plot(alphas, mean, "o-", color=color, label=f"{name} (mean over classes)")
        ax.fill_between(alphas, data.min(0), data.max(0), color=color, alpha=0.15,
                        label=f"{name} (min–max over classes)")
    if gold_forget is not None:
        ax.axhline(gold_forget, ls="--", color="tab:red", lw=1,
                   label="retrained without the class: forgotten class")
    if gold_retain is not None:
        ax.axhline(gold_retain, ls="--", color="tab:blue", lw=1,
                   label="retrained without the class: other classes")
    ax.set_xlabel("α (edit strength: W′ = W − α·W⁺_c)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def norm_heatmap(ratios: Mapping[str, Mapping[str, float]], path: str, title: str) -> str:
    """``ratios[concept][module] = ‖W⁺‖/‖W‖``."""
    concepts = list(ratios)
    modules = list(next(iter(ratios.values())))
    m = np.array([[ratios[c][mod] for mod in modules] for c in concepts])
    fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 3, 0.45 * len(concepts) + 2))
    im = ax.imshow(m, cmap="magma", vmin=0, aspect="auto")
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    ax.set_yticks(range(len(concepts)), concepts)
    ax.set_xlabel("layer (module)")
    ax.set_ylabel("concept")
    ax.set_title(title)
    _annotate(ax, m, threshold=float(np.nanmax(m)) / 2)
    fig.colorbar(im, ax=ax, label="‖W⁺_c‖ / ‖W‖ (Frobenius)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metric_curves(results: Sequence[Mapping[str, float]], keys: Sequence[str], path: str,
                  title: str) -> str:
    """One line per metric against α (``results[i]["alpha"]``); missing metrics are skipped."""
    alphas = [r["alpha"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in keys:
        if all(k in r for r in results):
            ax.plot(alphas, [r[k] for r in results], "o-", label=k)
    ax.set_xlabel("α (edit strength)")
    ax.set_ylabel("metric value (higher is better for the aggregates)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tofu_tradeoff(rows: Sequence[Mapping], retain: Mapping[str, Mapping], path: str) -> str:
    """Forget quality (y, log scale; 1 = indistinguishable from the retain model) against model
    utility (x) per split. ``rows``: ``{"split", "alpha" (None = unedited), "forget_quality"
    (optional), "model_utility"}``; ``retain[split]``: the retain model's ``model_utility``.
    Without forget quality (no retain log) the y axis shows the forget-set answer probability
    ``forget_Q_A_Prob`` (lower = more forgotten) instead, and says so."""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5.2 * max(1, len(splits)), 4.4),
                             squeeze=False)
    for ax, split in zip(axes[0], splits):
        mine = [r for r in rows if r["split"] == split]
        fq = all(r.get("forget_quality") is not None for r in mine)
        key = "forget_quality" if fq else "forget_Q_A_Prob"
        edits = sorted((r for r in mine if r["alpha"] is not None), key=lambda r: r["alpha"])
        if edits:
            ax.plot([r["model_utility"] for r in edits], [max(r[key], 1e-300) for r in edits],
                    "o-", color="tab:blue", label="engram edit")
            for r in edits:
                ax.annotate(f"α={r['alpha']:g}", (r["model_utility"], max(r[key], 1e-300)),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        for r in mine:
            if r["alpha"] is None:
                ax.plot([r["model_utility"]], [max(r[key], 1e-300)], "s", color="tab:red",
                        markersize=8, label="unedited")
        ref = retain.get(split)
        if fq and ref and ref.get("model_utility") is not None:
            ax.plot([ref["model_utility"]], [1.0], "*", color="tab:green", markersize=13,
                    label="retain model")
        if fq:
            ax.set_yscale("log")
        ax.set_xlabel("model utility (harmonic mean; higher keeps more)")
        ax.set_ylabel("forget quality (KS p-value vs retain model)" if fq
                      else "forget-set answer probability (no retain log)")
        ax.set_title(f"TOFU {split}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
