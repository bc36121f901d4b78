"""``ray job submit`` entrypoint for an extraction (the cluster's Ray is joined, not started).

On a cluster running the project's image (Dockerfile; docs/cluster.md), where the repository
lives at /home/ray/engram-ray::

    ray job submit --address http://HEAD:8265 -- \
        python /home/ray/engram-ray/jobs/extract.py \
        /home/ray/engram-ray/pipelines/configs/tofu_forget10.yaml --set model.path=s3://…

Shipping a config (and small data) with the job: DIR holds extract.yaml, and the job runs in
a copy of DIR (this script's path is then the image's, or the console script does the same)::

    ray job submit --address http://HEAD:8265 --working-dir DIR -- \
        engram-ray extract extract.yaml --set store.uri=s3://bucket/engram-runs

The head needs the job server (``pip install 'engram-ray[cluster]'``, i.e. ``ray[default]``),
and the cluster must already have the package: nothing is installed at submit time. Give
``store.uri`` as an absolute path or a URI: a relative one resolves inside the job's copy of
the working dir. The run URI is the last line of the job's stdout.
"""

import sys

from engram_ray.cli import run

if __name__ == "__main__":
    run(["extract", *sys.argv[1:]])
