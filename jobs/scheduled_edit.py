"""RayCronJob / CronJob / ``ray job submit`` entrypoint for scheduled edits: one tick of a
queue, then retention of the runs the tick superseded.

    python jobs/scheduled_edit.py s3://bucket/queue --gc-keep 3 [--result-file URI]

Arguments are those of ``engram-ray tick`` (``engram_ray/schedule.py`` has the queue layout),
plus ``--gc-keep N``: after a tick that worked, ``engram-ray gc STORE --keep N --delete
--queue QUEUE`` on the store of the queue's current run (the runs of that store that newer
runs extend, beyond the newest N, except the run the queue extends next: see
``engram_ray/retention.py``). Safe on a timer: a tick that finds another at work exits 0 and
says so, and then no gc runs. The log ends with one JSON line ``{"run": the queue's current
run, "queue": …, "gc": {…} or null}`` (``--result-file`` writes it too): see
``jobs/jobresult.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # jobresult, beside this file

import jobresult  # noqa: E402

from engram_ray import cli  # noqa: E402


def main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--gc-keep", type=int, default=None, metavar="N")
    p.add_argument("--result-file", default=None)
    own, rest = p.parse_known_args(argv)
    tick = cli.build_parser().parse_args(["tick", *rest])  # usage errors: argparse's exit 2
    rc, run = jobresult.run_cli(["tick", *rest])
    if rc != 0:
        return rc
    summary = None
    if own.gc_keep is not None and run:
        store = run.rstrip("/").rsplit("/", 1)[0]
        opts = [a for o in tick.storage_option or [] for a in ("--storage-option", o)]
        rc, line = jobresult.run_cli(["gc", store, "--keep", str(own.gc_keep), "--delete",
                                      "--queue", tick.queue, *opts])
        if rc != 0:
            return rc
        summary = json.loads(line)
    return jobresult.emit({"run": run or None, "queue": tick.queue, "gc": summary},
                          own.result_file)


if __name__ == "__main__":
    cli.run(sys.argv[1:], entry=main)
