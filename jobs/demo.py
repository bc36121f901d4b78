"""``ray job submit`` entrypoint for a demo pipeline (a smoke test of a fresh cluster): the
digits demo unless ``--pipeline NAME`` picks another from the :mod:`pipelines` registry."""

import sys

from engram_ray.cli import run

if __name__ == "__main__":
    run(["demo", *sys.argv[1:]])
