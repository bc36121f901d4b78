"""``ray job submit`` entrypoint for a demo pipeline (a smoke test of a fresh cluster): the
digits demo unless ``--pipeline NAME`` picks another from the :mod:`pipelines` registry."""

import sys

from engram_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
