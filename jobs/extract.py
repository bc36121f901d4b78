"""``ray job submit`` / RayJob entrypoint for an extraction (the cluster's Ray is joined).

On a cluster running the project's image (Dockerfile; docs/cluster.md), where the repository
lives at /home/ray/engram-ray::

    ray job submit --address http://HEAD:8265 --submission-id tofu-1 -- \
        python /home/ray/engram-ray/jobs/extract.py \
        /home/ray/engram-ray/pipelines/configs/tofu_forget10.yaml --set model.path=s3://…

Arguments are those of ``engram-ray extract``, plus ``--result-file URI``. The run goes to
``<store.uri>/<run id>``: the config's ``store.run_id`` if it names one, else
``ENGRAM_RAY_RUN_ID``'s value, else the job's submission id (``tofu-1`` above; a RayJob's
``spec.jobId``), else a time-stamped id (see ``jobs/jobresult.py``). The job's log ends with the run URI
and then one JSON line ``{"run": URI, "run_id": …, "job": …}``; ``--result-file`` writes that
JSON to a file or ``s3://`` object too.

Shipping a config (and small data) with the job: DIR holds extract.yaml, and the job runs in
a copy of DIR::

    ray job submit --address http://HEAD:8265 --working-dir DIR -- \
        python /home/ray/engram-ray/jobs/extract.py extract.yaml --set store.uri=s3://bucket/runs

The head needs the job server (``pip install 'engram-ray[cluster]'``, i.e. ``ray[default]``),
and the cluster must already have the package: nothing is installed at submit time. Give
``store.uri`` as an absolute path or a URI: a relative one resolves inside the job's copy of
the working dir (and is refused there).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # jobresult, beside this file

import jobresult  # noqa: E402

from engram_ray import cli  # noqa: E402


def run_id_override(argv: list[str], job_id: str | None) -> list[str]:
    """``--set store.run_id=JOB_ID`` when the config and its overrides name no run id."""
    if not job_id:
        return []
    try:
        from engram_ray.config import load_config

        ns = cli.build_parser().parse_args(["extract", *argv])
        if load_config(ns.config, ns.set or []).store.run_id:
            return []
    except (Exception, SystemExit):  # noqa: BLE001 - the CLI reports a bad config itself
        return []
    return ["--set", f"store.run_id={job_id}"]


def main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--result-file", default=None)
    own, rest = p.parse_known_args(argv)
    job_id = jobresult.job_run_id()
    rc, uri = jobresult.run_cli(["extract", *rest, *run_id_override(rest, job_id)])
    if rc != 0:
        return rc
    return jobresult.emit({"run": uri, "run_id": uri.rstrip("/").rsplit("/", 1)[-1],
                           "job": job_id}, own.result_file)


if __name__ == "__main__":
    cli.run(sys.argv[1:], entry=main)
