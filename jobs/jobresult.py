"""What the ``jobs/`` entrypoints share: a run id known before the job starts, and a result a
user can find after it ends, whoever printed last.

Run id. A job writes its run to ``<store.uri>/<run id>``, the run id being, in order: the
config's own ``store.run_id`` (or ``--set store.run_id=…``); ``ENGRAM_RAY_RUN_ID`` (set it in
a pod, e.g. from the downward API); the Ray job's submission id. KubeRay submits a RayJob
under ``spec.jobId`` (our manifests set it to the RayJob's name; unset, KubeRay makes one up
and shows it as ``status.jobId``), and ``ray job submit`` under ``--submission-id`` or the
``raysubmit_…`` id it prints. So the run of RayJob ``engram-extract`` is
``<store.uri>/engram-extract``, and the run of ``ray job submit --submission-id X`` is
``<store.uri>/X``. The submission id comes from the environment Ray's job supervisor gives
the driver (``RAY_JOB_CONFIG_JSON_ENV_VAR``: ``{"metadata": {"job_submission_id": …}}``),
read as JSON: the entrypoints import no Ray.

Result. The CLI prints its result as stdout's last line, but under KubeRay the submitter
prints Ray's own banner after the job's log, so "the last line" is not the run. The job
therefore also prints one JSON line ``{"run": URI, …}`` (find it with ``grep '^{"run"'``) and,
with ``--result-file URI`` (local or ``s3://``), writes the same JSON there.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Mapping

from engram_ray import cli

__all__ = ["RAY_JOB_CONFIG_ENV", "RUN_ID_ENV", "emit", "job_run_id", "run_cli"]

RUN_ID_ENV = "ENGRAM_RAY_RUN_ID"
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # ray._private.runtime_env.constants


def job_run_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """``ENGRAM_RAY_RUN_ID``, else the Ray job's submission id, else ``None``."""
    if environ.get(RUN_ID_ENV):
        return environ[RUN_ID_ENV]
    try:
        meta = json.loads(environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    sid = meta.get("job_submission_id") if isinstance(meta, Mapping) else None
    return sid if isinstance(sid, str) and sid else None


class _Tee(io.TextIOBase):
    """Writes through to ``out`` and keeps the last non-empty line (the CLI's result)."""

    def __init__(self, out) -> None:
        self.out, self.last, self._line = out, None, ""

    def write(self, s: str) -> int:
        self.out.write(s)
        self._line += s
        *done, self._line = self._line.split("\n")
        for ln in done:
            if ln.strip():
                self.last = ln.strip()
        return len(s)

    def flush(self) -> None:
        self.out.flush()


def run_cli(argv: list[str]) -> tuple[int, str | None]:
    """``engram-ray ARGV`` in this process: its exit status and the result it printed last."""
    tee, real = _Tee(sys.stdout), sys.stdout
    sys.stdout = tee
    try:
        rc = cli.main(argv)
    finally:
        sys.stdout = real
    return rc, (tee.last if rc == 0 else None)


def emit(result: Mapping, result_file: str | None = None, storage_options=None) -> int:
    """Print ``result`` (``run`` its first key) as one JSON line, stdout's last, and write it
    to ``result_file``;
    the exit status (1, with one line on stderr, when the file cannot be written)."""
    if next(iter(result), None) != "run":
        raise ValueError("a job result starts with its run")
    line = json.dumps(dict(result))  # "run" first, as given: `grep '^{"run"'` finds it
    print(line, flush=True)
    if not result_file:
        return 0
    from engram_ray.io.storage import Storage

    parent, _, name = result_file.rstrip("/").rpartition("/")
    try:
        where = Storage(parent or ".", storage_options)
        where.makedirs()
        where.write_bytes(name, (line + "\n").encode())
    except Exception as e:  # noqa: BLE001 - the run is committed; say what failed, exit 1
        print(f"engram-ray job: error: writing --result-file {result_file} failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
