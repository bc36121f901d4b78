"""benchmarks/gpu_check.py --cpu-smoke: the device script end to end on the CPU, tiny.

The script is run once, on a GPU machine that has no Ray, so this is its only rehearsal: every
part must finish, write its table, and never import Ray (``ray`` is made unimportable in the
subprocess, so any import of it on the path fails the part that made it), nor s3fs or boto,
which that machine does not have either. When the ai-engram
wheel the device run carries is here (``.whl/``, ignored by git), part (c) runs it too.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = """
import runpy, sys
# `import ray` raises ImportError from here on; so do the packages the device machine lacks
for name in ("ray", "s3fs", "boto3", "botocore", "aiobotocore", "moto"):
    sys.modules[name] = None
sys.argv = ["gpu_check.py", "--cpu-smoke", "--out", sys.argv[1], "--tmp", sys.argv[2]]
try:
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
assert not any(m == "ray" or m.startswith("ray.") for m, v in sys.modules.items()
               if v is not None), "ray was imported"
sys.exit(code)
"""


def test_cpu_smoke_writes_the_table_without_ray(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ)
    wheels = glob.glob(os.path.join(ROOT, ".whl", "ai_engram-*.whl"))
    if wheels:  # a pure-Python wheel imports straight from the zip
        env["PYTHONPATH"] = os.pathsep.join([wheels[0], env.get("PYTHONPATH", "")]).strip(
            os.pathsep)
    proc = subprocess.run([sys.executable, "-c", RUN, str(out), str(scratch)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    for part in ("a", "b-model", "b-core", "b-all", "b-peer-count", "b-extra", "compare"):
        assert doc["parts"][part] == "ok", (part, doc["parts"], doc["errors"])
    assert doc["parts"]["c"] == "ok" if wheels else doc["parts"]["c"].startswith("skipped")
    checks = {c["what"]: c for c in doc["checks"]}
    # (a) on one device against itself: the comparison machinery, exact
    assert checks["engrams on cpu equal CPU engrams"]["met"] is True
    assert checks["edit applied on cpu equals the CPU edit"]["met"] is True
    assert checks["engrams on cpu equal CPU engrams (float64 model: the engine alone)"]["met"]
    whats = [r["what"] for r in doc["rows"]]
    for expected in ("plain bf16 forward of every row (no hooks)",
                     "statistics pass, Gram sums in float64 (2 concepts labelled)",
                     "statistics pass, Gram sums in float32 (2 concepts labelled)",
                     "extraction end to end, 2 concepts, every module",
                     "all 4 authors × 2 layers end to end (2 chunk runs)",
                     "edit in memory on the cpu model: forget 2 authors (plan + apply)",
                     "apply_run: forget 2 authors, edited checkpoint written"):
        assert expected in whats, (expected, whats)
    assert any(w.startswith("solve by group width") for w in whats)
    done = next(r for r in doc["rows"] if r["what"].startswith("extraction end to end, 2"))
    assert done["bytes"] > 0 and done["solve_s"] is not None
    assert "extraction end to end, 1 concepts, every module" in whats
    if wheels:
        assert "ai-engram end to end, 2 concepts" in whats
        assert "ai-engram end to end, 1 concepts" in whats
        assert checks["2 concepts: ours vs ai-engram on the same device"]["met"] is not None
    assert "| target | measured | met |" in md
    assert not os.listdir(scratch)  # scratch (models, runs) removed
