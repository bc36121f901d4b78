"""The embedded demo: class-wise unlearning on scikit-learn's real 8×8 digits, end to end.

    engram-ray demo --out demo-out        (what `make demo` runs)

1. Train an MLP (64→128→128→10) on 70 % of digits (seconds on a CPU); write the training split
   as a features Parquet shard with concept = class label.
2. Extract every class's engram in one distributed run (Ray, 2 stages).
3. Forget each class from that one run (α sweep as parallel Ray tasks), compare with a model
   retrained from scratch without the class (Tug-of-War), forget three classes at once, and do
   the same for a small CNN (Conv2d layers) through the same pipeline.
4. Write report.md, metrics.json and PNG figures into the output directory.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from engram_ray.core.edit import apply_edit, plan_edit
from engram_ray.eval.classify import (
    SplitAccuracy,
    class_accuracy,
    forget_retain,
    predict,
    split_accuracy,
    tug_of_war,
)
from engram_ray.models.sequential import mlp

__all__ = ["cnn", "load_digits_split", "run_demo", "train_classifier"]

CLASSES = [str(c) for c in range(10)]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
COMPOSED = [1, 4, 7]  # forgotten together from the same run
MLP_SIZES = [64, 128, 128, 10]


def cnn(seed: int = 0) -> nn.Sequential:
    """A small CNN over the 8×8 images (64 features in, reshaped): two Conv2d, one Linear."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),  # (16, 8, 8)
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # (32, 4, 4)
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )


def load_digits_split(seed: int = 0):
    """Digits scaled to [0, 1], stratified 70/30 split: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # pixel intensities are 0..16
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, random_state=seed,
                                          stratify=d.target)
    return torch.from_numpy(xtr), ytr, torch.from_numpy(xte), yte


def train_classifier(model: nn.Module, x: torch.Tensor, y: np.ndarray, *, epochs: int = 40,
                     seed: int = 0, lr: float = 2e-3) -> nn.Module:
    """Adam on cross-entropy, mini-batches of 64, seeded: the same model every run."""
    g = torch.Generator().manual_seed(seed)
    yt = torch.from_numpy(np.asarray(y)).long()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def _retrain_without(args) -> dict:
    """Gold model for one forget set: the same recipe on the data without those classes."""
    kind, forget, seed, epochs = args
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split(seed)
    keep = ~np.isin(ytr, forget)
    model = _build(kind, seed)
    train_classifier(model, xtr[keep], ytr[keep], epochs=epochs, seed=seed)
    f, r = forget_retain(predict(model, xte), yte, forget)
    return {"splits": split_accuracy(model, xtr, ytr, xte, yte, forget).to_dict(),
            "test_forget": f, "test_retain": r}


def _build(kind: str, seed: int) -> nn.Module:
    return mlp(MLP_SIZES, activation="relu", seed=seed) if kind == "mlp" else cnn(seed)


def _sweep_alpha(args) -> dict:
    """For one α: forget each class alone, return test accuracy on every class (+ splits)."""
    kind, weights, run_uri, alpha, seed = args
    from safetensors.torch import load_file

    from engram_ray.runs import open_run

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split(seed)
    state = load_file(weights)
    trained = _build(kind, seed)
    trained.load_state_dict(state)
    run = open_run(run_uri, model=trained)  # engrams formed with the trained weights
    acc, splits = [], []
    for c in range(10):
        model = _build(kind, seed)
        model.load_state_dict(state)
        apply_edit(model, plan_edit(run, [str(c)], alpha=alpha))
        acc.append(class_accuracy(predict(model, xte), yte, 10).tolist())
        splits.append(split_accuracy(model, xtr, ytr, xte, yte, [c]).to_dict())
    return {"alpha": alpha, "acc": acc, "splits": splits}


def _write_shard(path: str, x: torch.Tensor, y: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({"concept": [str(int(c)) for c in y],
                      "x": pa.array(x.numpy().tolist(), type=pa.list_(pa.float32()))})
    pq.write_table(table, path)
    return path


def _extract(out: str, kind: str, factory: str, kwargs: dict, weights: str, shard: str,
             stages: int) -> str:
    from engram_ray.config import ExtractConfig
    from engram_ray.distributed.runner import run_extract

    cfg = ExtractConfig.from_dict({
        "model": {"factory": factory, "kwargs": kwargs, "weights": weights},
        "data": {"paths": [shard], "features_column": "x", "batch_size": 128},
        "parallel": {"stages": stages, "replicas": 1, "num_cpus": 0.5, "encode_num_cpus": 0.5,
                     "encode_concurrency": 1,
                     "solver_num_cpus": 0.5},
        "store": {"uri": os.path.join(out, "runs"), "run_id": f"digits-{kind}", "overwrite": True},
    })
    return run_extract(cfg)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _model_section(out, kind, stages, alphas, gold_classes, seed, epochs, xtr, ytr, xte, yte):
    """Train, extract, sweep α, compare with gold: everything for one model kind."""
    from safetensors.torch import save_file

    from engram_ray.distributed.sweep import parallel_map
    from engram_ray.runs import open_run

    t0 = time.time()
    torch.manual_seed(seed)
    model = train_classifier(_build(kind, seed), xtr, ytr, epochs=epochs, seed=seed)
    base_acc = class_accuracy(predict(model, xte), yte, 10)
    weights = os.path.join(out, "models", f"{kind}.safetensors")
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    _say(f"{kind}: trained in {time.time() - t0:.1f}s, test accuracy {np.mean(base_acc):.3f}")
    factory, kwargs = (("engram_ray.models.sequential:mlp",
                        {"sizes": MLP_SIZES, "activation": "relu", "seed": seed})
                       if kind == "mlp" else ("pipelines.digits:cnn", {"seed": seed}))
    shard = os.path.join(out, "data", "digits_train.parquet")
    run_uri = _extract(out, kind, factory, kwargs, weights, shard, stages)
    run = open_run(run_uri, model=copy.deepcopy(model))  # engrams formed with these weights
    _say(f"{kind}: engrams for {len(run.concepts)} classes × {len(run.modules)} layers at {run_uri}")
    sweep = parallel_map(_sweep_alpha, [(kind, weights, run_uri, a, seed) for a in alphas],
                         num_cpus=0.5)
    gold = {}
    if gold_classes:
        jobs = [(kind, [c], seed, epochs) for c in gold_classes] + [(kind, COMPOSED, seed, epochs)]
        results = parallel_map(_retrain_without, jobs, num_cpus=0.5)
        gold = {str(c): r for c, r in zip(gold_classes, results)}
        gold["+".join(map(str, COMPOSED))] = results[-1]
    return {"model": model, "weights": weights, "run": run, "run_uri": run_uri,
            "base_acc": base_acc, "sweep": sweep, "gold": gold, "seconds": time.time() - t0}


def _class_metrics(sec, alphas) -> dict:
    """metrics.json's per-class block: forget/retain per α, ToW per α, best α."""
    out = {}
    for c in range(10):
        rows = []
        for s in sec["sweep"]:
            acc = np.array(s["acc"][c])
            f, r = acc[c], float(np.nanmean(np.delete(acc, c)))
            row = {"alpha": s["alpha"], "forget_acc": float(f), "retain_acc": r,
                   "train_splits": s["splits"][c]}
            if str(c) in sec["gold"]:
                edited = SplitAccuracy(**s["splits"][c])
                row["tow"] = tug_of_war(edited, SplitAccuracy(**sec["gold"][str(c)]["splits"]))
            rows.append(row)
        best = max(rows, key=lambda r: r.get("tow", -r["forget_acc"] + r["retain_acc"]))
        out[str(c)] = {"per_alpha": rows, "best_alpha": best["alpha"],
                       "best_alpha_by": "tow" if "tow" in best else "retain_acc - forget_acc",
                       "gold": sec["gold"].get(str(c))}
    return out


def run_demo(out: str = "demo-out", *, stages: int = 2, quick: bool = False, seed: int = 0) -> str:
    """Run everything; returns the path of ``report.md``."""
    from engram_ray.distributed.runner import ensure_ray

    from .digits_report import write_report

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    alphas = [0.0, 0.5, 1.0] if quick else ALPHAS
    gold_classes = [0, 1] if quick else list(range(10))
    epochs = 20 if quick else 40
    xtr, ytr, xte, yte = load_digits_split(seed)
    _write_shard(os.path.join(out, "data", "digits_train.parquet"), xtr, ytr)
    _say(f"digits: {len(xtr)} training rows, {len(xte)} test rows, 10 classes")
    ensure_ray(None, min_cpus=6)  # room for the stage actors, data tasks and the α-sweep tasks
    sections = {}
    # The CNN shows the Conv2d path (heatmap, α sweep); gold retrains are done for the MLP.
    for kind, golds in (("mlp", gold_classes), ("cnn", [])):
        sections[kind] = _model_section(out, kind, stages, alphas, golds, seed, epochs,
                                        xtr, ytr, xte, yte)
    metrics = {"alphas": alphas, "seconds": None, "models": {}}
    for kind, sec in sections.items():
        metrics["models"][kind] = {
            "run": sec["run_uri"],
            "test_accuracy": float(np.mean(sec["base_acc"])),
            "classes": _class_metrics(sec, alphas),
            "composed": _composed(sec, seed),
        }
    metrics["seconds"] = time.time() - t0
    report = write_report(out, sections, metrics, alphas)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    _say(f"done in {metrics['seconds']:.0f}s; open {report}")
    return report


def _composed(sec, seed) -> dict:
    """Forget COMPOSED classes at once (α = 1) from the same run, with its gold if trained."""
    from safetensors.torch import load_file

    xtr, ytr, xte, yte = load_digits_split(seed)
    model = _build("mlp" if "mlp" in sec["weights"] else "cnn", seed)
    model.load_state_dict(load_file(sec["weights"]))
    apply_edit(model, plan_edit(sec["run"], [str(c) for c in COMPOSED], alpha=1.0))
    f, r = forget_retain(predict(model, xte), yte, COMPOSED)
    edited = split_accuracy(model, xtr, ytr, xte, yte, COMPOSED)
    res = {"classes": COMPOSED, "alpha": 1.0, "forget_acc": f, "retain_acc": r,
           "train_splits": edited.to_dict()}
    gold = sec["gold"].get("+".join(map(str, COMPOSED)))
    if gold:
        res["gold"] = gold
        res["tow"] = tug_of_war(edited, SplitAccuracy(**gold["splits"]))
    return res


def forgotten_matrix(sweep: Sequence[dict], alpha: float) -> np.ndarray:
    """(10, 10) test accuracy: row = forgotten class, column = evaluated class, at ``alpha``."""
    s = next(s for s in sweep if s["alpha"] == alpha)
    return np.array(s["acc"])
