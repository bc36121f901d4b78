"""Start-up of the default CLI path, two source trees side by side: a base commit against the
working tree.

Each repeat runs ``engram-ray extract`` (Ray, every parallel default, a fresh local Ray) once
from a temporary ``git worktree`` of ``--base`` and once from this checkout, in alternating
order, on the same data (``workload.py``); the tree is chosen by running from it (``python -m``
puts the working directory first on ``sys.path``) with ``PYTHONPATH`` naming it too, which the
driver and its Ray workers both see. From each ``run.json``: Ray init, stage actors ready,
first row, the stage's own load (``stage_load_s``) and the run's total; beside them the time
one fresh interpreter takes to import what a Ray Data read/encode worker imports
(``engram_ray.distributed.ingest``). Medians per tree; on this shared 2-core machine compare
the two columns of one run, not runs of different days.

    python benchmarks/startup_ab.py --base e09a1cf --repeat 3 [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ray_rows import cli_run  # noqa: E402
from benchmarks.workload import build  # noqa: E402

__all__ = ["main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("ray_init_s", "stage_load_s", "actors_ready_s", "first_row_s")


def ingest_import_s(tree: str) -> float:
    """Seconds a fresh interpreter spends importing the ingest module from ``tree``."""
    code = ("import time; t = time.perf_counter(); import engram_ray.distributed.ingest as m; "
            "print(time.perf_counter() - t, m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": tree}, cwd=tree)
    seconds, where = out.stdout.strip().splitlines()[-1].split(" ", 1)
    if not os.path.realpath(where).startswith(os.path.realpath(tree)):
        raise RuntimeError(f"imported {where}, not from {tree}")
    return float(seconds)


def one(config: str, tree: str, run_id: str) -> dict:
    os.environ["PYTHONPATH"] = tree  # cli_run passes os.environ on
    try:
        r = cli_run(config, [], run_id, cwd=tree)
    finally:
        os.environ.pop("PYTHONPATH", None)
    row = {k: r["startup"].get(k, float("nan")) for k in FIELDS}
    row.update(total_s=r["timings"]["total_s"], wall_s=r["wall"], import_s=ingest_import_s(tree))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--out", default=None, help="append a markdown table here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="engram-ab-") as tmp:
        base = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", base, args.base],
                       check=True)
        try:
            config = os.path.abspath(
                build(os.path.join(tmp, "data"), rows=args.rows, concepts=50)["config"])
            trees = {f"base {args.base}": base, "working tree": ROOT}
            got: dict[str, list[dict]] = {k: [] for k in trees}
            for rep in range(args.repeat):
                order = list(trees) if rep % 2 == 0 else list(trees)[::-1]
                for name in order:
                    got[name].append(one(config, trees[name], f"ab{rep}{len(got[name])}"
                                         f"{'b' if name.startswith('base') else 'w'}"))
                    print(name, {k: round(v, 2) for k, v in got[name][-1].items()},
                          file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base])
    cols = (*FIELDS, "total_s", "wall_s", "import_s")
    lines = [f"Command: `python benchmarks/startup_ab.py --base {args.base} --repeat "
             f"{args.repeat} --rows {args.rows}` (medians of {args.repeat}, trees alternating)",
             "", "| tree | Ray init s | stage load s | actors ready s | first row s | total s "
             "| wall s | ingest import s |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in got.items():
        med = [statistics.median(r[c] for r in rows) for c in cols]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in med) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
