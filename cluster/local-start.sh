#!/usr/bin/env bash
# A local multi-process Ray "cluster" on one machine: a head and N workers, each with a custom
# resource node<i> so stage placement can be inspected. Then:
#   engram-ray extract cfg.yaml --set parallel.address=auto
# or, through the job server (ray[default]: `make install` installs the `cluster` extra):
#   ray job submit --address http://127.0.0.1:8265 --working-dir DIR -- engram-ray extract cfg.yaml
# Stop it with `ray stop` (which stops every Ray on the machine).
set -euo pipefail
N=${1:-2}
VENV=${VENV:-.venv}
"$VENV/bin/ray" start --head --num-cpus=2 --resources='{"node0": 1}' --disable-usage-stats
for i in $(seq 1 "$N"); do
  "$VENV/bin/ray" start --address=127.0.0.1:6379 --num-cpus=2 --resources="{\"node$i\": 1}"
done
"$VENV/bin/ray" status
