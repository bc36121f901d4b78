"""Run format 3 (statistics) against a base commit's format, side by side: the CLI as users run it.

    python benchmarks/format_ab.py --base 5fa2193 [--head REV] [--repeat 3] [--rows 1200] [--out F]

On the workload of ``workload.py`` (a Llama of hidden 384, 6 layers, 50 authors as concepts,
1,200 QA rows), each repeat runs, from a temporary ``git worktree`` of ``--base`` and from this
checkout in alternating order (``python -m engram_ray.cli`` from each tree's directory, which
puts that tree first on ``sys.path``):

- ``extract --local`` (the single-process engine): the run's bytes on disk, and its solve +
  commit phase (the CLI's "committed … in T s" minus ``run.json``'s ``statistics_s``);
- on that tree's own run: ``apply`` of one author (full checkpoint), ``apply --format peft``
  of the same, and ``batch --local`` of 20 requests (request i forgets 1–3 of the authors).

Medians per tree; the ratios are the point (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workload import build  # noqa: E402

__all__ = ["main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("run_mb", "solve_commit_s", "apply_s", "peft_s", "batch20_s")


def cli(tree: str, *argv: str) -> tuple[float, str, str]:
    """``engram-ray ARGV`` from ``tree``: (wall seconds, stdout, stderr); fails loudly."""
    env = {**os.environ, "PYTHONPATH": tree, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "engram_ray.cli", *argv], capture_output=True,
                         text=True, env=env, cwd=tree)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} from {tree} failed: {out.stderr.strip()[-500:]}")
    return wall, out.stdout, out.stderr


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def requests(run: str, authors: list[str], out: str, n: int = 20) -> str:
    """``n`` requests on ``run``: request i forgets 1–3 consecutive authors."""
    path = os.path.join(out, "requests.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            concepts = [authors[(i + k) % len(authors)] for k in range(1 + i % 3)]
            f.write(json.dumps({"request_id": f"r{i}", "run": run, "concepts": concepts,
                                "out": os.path.join(out, f"r{i}")}) + "\n")
    return path


def one(config: str, tree: str, work: str) -> dict:
    """Every measurement of one repeat from ``tree``; its outputs are removed after."""
    os.makedirs(work)
    _, out, err = cli(tree, "extract", config, "--local", "--set", f"store.uri={work}/runs",
                      "--set", "parallel.progress_interval_s=null")
    run = out.strip().splitlines()[-1]
    info = json.load(open(os.path.join(run, "run.json")))
    total = float(re.findall(r"committed .* in ([0-9.]+)s", err)[-1])
    authors = sorted(info["concepts"])
    row = {"run_mb": tree_bytes(run) / 1e6,
           "solve_commit_s": total - info["timings"]["statistics_s"]}
    row["apply_s"] = cli(tree, "apply", "--run", run, "--forget", authors[0],
                         "--out", f"{work}/full")[0]
    row["peft_s"] = cli(tree, "apply", "--run", run, "--forget", authors[0], "--format", "peft",
                        "--out", f"{work}/peft")[0]
    os.makedirs(f"{work}/batch")
    row["batch20_s"] = cli(tree, "batch", requests(run, authors, f"{work}/batch"), "--local")[0]
    shutil.rmtree(work)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--head", default=None,
                    help="a git revision for the new arm too (default: the working tree)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--out", default=None, help="append a markdown table here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="engram-format-ab-") as tmp:
        base, head = os.path.join(tmp, "base"), os.path.join(tmp, "head")
        for where, rev in ((base, args.base), (head, args.head)):
            if rev is not None:
                subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", where,
                                rev], check=True)
        try:
            config = os.path.abspath(
                build(os.path.join(tmp, "data"), rows=args.rows, concepts=50)["config"])
            trees = {f"base {args.base}": base,
                     f"head {args.head}" if args.head else "working tree":
                         head if args.head else ROOT}
            got: dict[str, list[dict]] = {k: [] for k in trees}
            for rep in range(args.repeat):
                for name in (list(trees) if rep % 2 == 0 else list(trees)[::-1]):
                    got[name].append(one(config, trees[name], f"{tmp}/w{rep}{len(got[name])}"
                                         f"{name.split()[0]}"))
                    print(name, {k: round(v, 2) for k, v in got[name][-1].items()},
                          file=sys.stderr, flush=True)
        finally:
            for where in (base, head):
                if os.path.exists(where):
                    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", where])
    text = table(got, args)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


def table(got: dict[str, list[dict]], args) -> str:
    med = {name: {c: statistics.median(r[c] for r in rows) for c in COLUMNS}
           for name, rows in got.items()}
    (bname, b), (wname, w) = med.items()
    head = f" --head {args.head}" if args.head else ""
    lines = [f"Command: `python benchmarks/format_ab.py --base {args.base}{head} --repeat "
             f"{args.repeat} --rows {args.rows}` (medians of {args.repeat}, trees alternating)",
             "", "| tree | run MB | extract --local solve + commit s | apply s | "
             "apply --format peft s | batch of 20 --local s |", "|---|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.2f}" for c in COLUMNS) + " |")
    lines.append(f"| base ÷ {wname.split()[0]} | " + " | ".join(
        f"{b[c] / w[c]:.2f}×" if w[c] > 0 else "–" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
