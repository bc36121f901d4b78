"""``ray job submit`` entrypoint writing edited models from committed runs: the CLI, as a job.

One edit (the arguments of ``engram-ray apply``)::

    ray job submit --address http://HEAD:8265 -- python jobs/apply.py \
        --run s3://bucket/runs/run-… --forget author-17,author-42 --alpha 1.0 --out s3://bucket/edited

A batch of edits is ``engram-ray batch`` (the arguments after ``--batch``)::

    python jobs/apply.py --batch requests.jsonl --summary s3://bucket/edited/summary.parquet

with one request per line (JSON lines, or a Parquet table; local or ``s3://``)::

    {"request_id": "17-42", "run": "s3://bucket/runs/run-…", "concepts": ["author-17", "author-42"], "out": "s3://bucket/edited/17-42"}
    {"request_id": "3", "run": "s3://bucket/runs/run-…", "concepts": "author-3", "alpha": 0.8, "scale": "weight_norm", "out": "s3://bucket/edited/3"}

Every request is validated before the first one runs (a typo fails the job, naming the row and
column, before any work); the requests of one run are written together (one read of the model
and of the engrams); one that fails is recorded in the summary table and the others go on; the
job then exits 1. A re-run skips the requests whose output is complete. (This entrypoint once
read its own YAML list of edits and stopped at the first failure; the requests file of
``engram-ray batch`` replaced it, so every batch path — CLI, RayJob, scheduled tick — reads
one format.)
"""

from __future__ import annotations

import sys

from engram_ray import cli


def command(argv: list[str]) -> list[str]:
    """``--batch …``: ``engram-ray batch …``; anything else: ``engram-ray apply …``."""
    return ["batch", *argv[1:]] if argv[:1] == ["--batch"] else ["apply", *argv]


def run(argv: list[str]) -> int:
    """The command's exit status, in this process (for tests)."""
    return cli.main(command(argv))


if __name__ == "__main__":
    cli.run(command(sys.argv[1:]))
