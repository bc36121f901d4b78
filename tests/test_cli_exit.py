"""How the CLI process ends: no native teardown may turn a finished command into a crash.

About 1 in 15 ``engram-ray apply`` processes aborted after finishing (output written, result
printed) with ``terminate called without an active exception``, exit 134: a C++ destructor
registered with ``atexit``/``__cxa_atexit`` by a native extension ran while its thread was
still joinable. The test plants such a destructor deterministically — libc's ``abort``
registered with ``__cxa_atexit`` (how C++ registers static destructors; ``exit()`` runs them
after the interpreter is finalized) — and checks that the CLI still exits with its own
status, with Python's ``atexit`` handlers run, its output flushed into a pipe, and no hang on
a thread pool some library left alive.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SITE = """
import atexit, ctypes, os
libc = ctypes.CDLL(None)
libc.__cxa_atexit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
# A native exit-time destructor that aborts, registered the way C++ registers its static
# destructors, like one finding a joinable thread (std::terminate -> abort).
libc.__cxa_atexit(ctypes.cast(libc.abort, ctypes.c_void_p), None, None)
atexit.register(lambda: open(os.environ["ATEXIT_MARK"], "w").write("ran"))
# A thread pool a library keeps alive: its idle non-daemon worker must not hang the exit.
from concurrent.futures import ThreadPoolExecutor
_pool = ThreadPoolExecutor(1)
_pool.submit(int).result()
"""


def _cli(tmp_path, *args, env=None, script=None):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    mark = tmp_path / "atexit-ran"
    mark.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ATEXIT_MARK": str(mark), **(env or {})}
    cmd = [sys.executable, *([script] if script else ["-m", "engram_ray.cli"]), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    return out, mark.exists()


def test_a_native_abort_at_exit_does_not_change_the_exit_status(tmp_path):
    out, ran = _cli(tmp_path, "--version")
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    assert out.stdout.startswith("engram-ray ")  # flushed into the pipe before the exit
    assert ran  # Python's atexit handlers (Ray's shutdown, logging's flush) still run


@pytest.mark.parametrize("env,code,text", [
    ({}, 2, "is not a committed engram run"),  # bad input: one line, exit 2
    ({"ENGRAM_RAY_TRACEBACK": "1"}, 1, "Traceback (most recent call last)"),  # re-raised
])
def test_error_statuses_survive_the_exit_path(tmp_path, env, code, text):
    out, ran = _cli(tmp_path, "show", str(tmp_path / "no-run"), env=env)
    assert out.returncode == code, (out.returncode, out.stderr[-500:])
    assert text in out.stderr and ran


@pytest.mark.parametrize("script", ["jobs/extract.py", "jobs/apply.py", "jobs/scheduled_edit.py",
                                    "jobs/demo.py"])
def test_job_scripts_exit_the_same_way(tmp_path, script):
    """The scripts Ray jobs run: a 134 there fails the RayJob (and its Kubernetes Job)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, ran = _cli(tmp_path, "--help", script=os.path.join(root, script))
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    assert "usage:" in out.stdout and ran
