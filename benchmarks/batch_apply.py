"""A batch of edits against the same edits as separate ``apply`` runs, side by side in one run.

    .venv/bin/python benchmarks/batch_apply.py [--requests 20] [--repeat 2] [--out docs/benchmarks.md]

One run is extracted (``--local``) from the workload of ``workload.py`` (a Llama of hidden 384,
6 layers; 300 QA rows of 20 fictitious authors). Then ``--requests`` edits of it (edit i
forgets 1, 2 or 3 authors), written three ways, each a subprocess timed by its wall clock as
a user runs it:

- ``engram-ray batch REQUESTS --local``: every request in this process, the full checkpoints
  in one pass over the base (each tensor and each module's engrams read once);
- ``engram-ray batch REQUESTS``: the default, the run's requests in one Ray task (a fresh local
  Ray, ``RAY_ADDRESS=local``);
- ``--requests`` separate ``engram-ray apply`` commands, one after another.

The three alternate within each repeat (drifting load hits them alike); the best repeat of
each is kept. Every output of every way is checked to be complete (``edit.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workload import build  # noqa: E402

HEADER = "## Batch edits: one batch against separate applies"


ABORT = "terminate called without an active exception"
ABORTS: list[str] = []  # commands that aborted with ABORT (their output is checked complete)


def cli(*args: str) -> float:
    """Wall seconds of one ``engram-ray`` command in a fresh process. A failure raises, except
    a C++ abort (``ABORT``), which one ``apply`` in a few dozen hits (see the section's note):
    it is recorded in ``ABORTS`` with the Python stacks ``PYTHONFAULTHANDLER`` prints, its time
    counts, and the caller checks that its output is complete anyway."""
    env = {**os.environ, "RAY_ADDRESS": "local", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONFAULTHANDLER": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "engram_ray.cli", *args], env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        if ABORT not in out.stderr:
            raise RuntimeError(f"engram-ray {' '.join(args[:2])} failed: {out.stderr[-2000:]}")
        ABORTS.append(" ".join(args[:1]))
        print(f"[bench] engram-ray {args[0]} aborted (rc {out.returncode}):\n"
              f"{out.stderr[-4000:]}", file=sys.stderr, flush=True)
    return seconds


def requests(run: str, authors: list[str], n: int, out: str) -> list[dict]:
    return [{"request_id": f"v{i}", "run": run, "out": os.path.join(out, f"v{i}"),
             "concepts": [authors[(i + j) % len(authors)] for j in range(1 + i % 3)]}
            for i in range(n)]


def one_way(way: str, reqs: list[dict], root: str) -> float:
    """Write every request ``way``; returns wall seconds (outputs removed afterwards)."""
    out = os.path.dirname(reqs[0]["out"])
    shutil.rmtree(out, ignore_errors=True)
    path = os.path.join(root, "requests.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reqs)
    if way == "apply":
        seconds = sum(cli("apply", "--run", r["run"], "--forget", ",".join(r["concepts"]),
                          "--out", r["out"]) for r in reqs)
    else:
        seconds = cli("batch", path, *(["--local"] if way == "batch --local" else []))
    missing = [r["request_id"] for r in reqs
               if not os.path.exists(os.path.join(r["out"], "edit.json"))]
    if missing:
        raise RuntimeError(f"{way}: outputs {missing} are incomplete")
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", help="a markdown file whose batch section is (re)written")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="engram-batch-bench-")
    try:
        paths = build(root, rows=300, concepts=20)
        run = os.path.join(root, "runs", "base")
        cli("extract", paths["config"], "--local", "--set", "store.run_id=base")
        from engram_ray.io.store import open_run

        authors = open_run(run).concepts
        reqs = requests(run, authors, args.requests, os.path.join(root, "edited"))
        ways = ["batch --local", "batch", "apply"]
        best: dict[str, float] = {}
        for rep in range(args.repeat):
            for way in ways if rep % 2 == 0 else ways[::-1]:
                t = one_way(way, reqs, root)
                print(f"[bench] {way}: {t:.1f}s", file=sys.stderr, flush=True)
                best[way] = min(t, best.get(way, float("inf")))
        text = section(best, args)
        print(text)
        if args.out:
            write_section(args.out, text)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def section(best: dict[str, float], args) -> str:
    n = args.requests
    cmd = "python benchmarks/batch_apply.py " + " ".join(sys.argv[1:])
    rows = [("`engram-ray batch REQUESTS --local`", best["batch --local"]),
            ("`engram-ray batch REQUESTS` (default: Ray, fresh local Ray)", best["batch"]),
            (f"{n} × `engram-ray apply`", best["apply"])]
    lines = [f"{HEADER}\n", f"Command (one run, the three ways alternating, best of "
             f"{args.repeat}): `{cmd.strip()}`\n",
             f"{n} edits of one run (a Llama of hidden 384, 6 layers, float32; edit i forgets "
             "1–3 of 20 authors), every output a full edited checkpoint with `edit.json`. "
             "Wall clock of the commands as a user runs them.\n",
             "| way | wall s | s per edit | vs separate applies |", "|---|---|---|---|"]
    for name, t in rows:
        lines.append(f"| {name} | {t:.1f} | {t / n:.2f} | {best['apply'] / t:.1f}× |")
    lines.append("\nSeparate applies each pay a Python start with torch and transformers, the "
                 "run's opening and a read of the base checkpoint and of the engrams; the batch "
                 "pays them once and writes the outputs in lockstep.")
    if ABORTS:
        lines.append(f"\n{len(ABORTS)} command(s) ({', '.join(sorted(set(ABORTS)))}) exited "
                     f"with `{ABORT}` (SIGABRT) after publishing complete outputs; their time "
                     "counts (see the note below).")
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    """Replace this benchmark's section of ``path`` where it stands (or append it), keeping
    every other section as it is."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if HEADER in old:
        start = old.index(HEADER)
        nxt = old.find("\n## ", start + len(HEADER))
        new = old[:start] + text + (old[nxt:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)

if __name__ == "__main__":
    main()
