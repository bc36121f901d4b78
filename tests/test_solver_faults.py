"""A solver task whose worker process dies (issue 13): Ray retries it, the retry rewrites the
group's payload files whole, and the committed run holds every engram exactly once, equal to
the single-process engine's; a task that dies on every attempt fails the run in one line with
nothing committed.

The fault is real: the solve step is a :class:`GroupSolve` whose call, once its payload files
are written (so a partial run is on disk), SIGKILLs its own worker process — the first time
it runs for a group (an ``O_EXCL`` marker file per group), or every time. The step travels to
the solver tasks by value (cloudpickle), exactly as the executor ships the real one.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle  # Ray's own copy: the one that pickles the step for the task

from engram_ray.config import ExtractConfig
from engram_ray.distributed.errors import unwrap
from engram_ray.extraction import GroupSolve, Plan, prepare, run_extraction
from engram_ray.local import extract_from_config
from engram_ray.runs import open_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


@dataclasses.dataclass(frozen=True)
class DyingSolve(GroupSolve):
    """The real step, then a SIGKILL of the worker process after the payload is written."""

    markers: str = ""
    every_time: bool = False

    def __call__(self, moments, members, weights, device=None):
        rows = super().__call__(moments, members, weights, device)
        marker = os.path.join(self.markers, f"killed-{members[0].group}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            first = True
        except FileExistsError:
            first = False
        if first or self.every_time:
            os.kill(os.getpid(), signal.SIGKILL)
        return rows


@dataclasses.dataclass
class DyingPlan(Plan):
    markers: str = ""
    every_time: bool = False

    def group_solve(self, staging_uri: str) -> GroupSolve:
        real = super().group_solve(staging_uri)
        return DyingSolve(**{f.name: getattr(real, f.name) for f in dataclasses.fields(real)},
                          markers=self.markers, every_time=self.every_time)


def make_config(tmp_path, model_dir, run_id: str) -> ExtractConfig:
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    import pyarrow as pa

    rows = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 3))} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), data / "part-0.parquet")
    return ExtractConfig.from_dict({
        "model": {"path": model_dir},
        "data": {"paths": [str(data)], "concept_column": "author", "prompt_column": "question",
                 "answer_column": "answer", "max_length": 32, "batch_size": 4},
        "parallel": {"stages": 1, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                     "solver_num_cpus": 0.25},
        "store": {"uri": str(tmp_path / "runs"), "run_id": run_id},
    })


def dying_run(cfg: ExtractConfig, markers: str, every_time: bool) -> str:
    from engram_ray.distributed.executor import RayExecutor

    plan = prepare(cfg, io.StringIO())
    plan = DyingPlan(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)},
                     markers=markers, every_time=every_time)
    return run_extraction(plan, RayExecutor(cfg, io.StringIO()), io.StringIO())


def test_killed_solver_task_is_retried_and_its_statistics_written_once(ray_cluster, tiny_llama_dir,
                                                                    tmp_path):
    cfg = make_config(tmp_path, tiny_llama_dir, "retried")
    markers = tmp_path / "markers"
    markers.mkdir()
    uri = dying_run(cfg, str(markers), every_time=False)
    run = open_run(uri)
    groups = {r["group"] for r in run.manifest.to_pylist()}
    # Every group's first solver process was killed after writing its payload files.
    assert sorted(os.listdir(markers)) == sorted(f"killed-{g}" for g in groups)
    # Exactly once: one manifest row per (concept, module), one payload file per input group
    # holding one row per concept (no stale attempt's rows), one spectrum file per group.
    keys = [(r["concept"], r["module"]) for r in run.manifest.to_pylist()]
    assert len(keys) == len(set(keys)) == len(run.concepts) * len(run.modules)
    payload = tmp_path / "runs" / "retried" / "payload"
    files = sorted(os.listdir(payload))
    assert files == sorted(f"{g}.parquet" for g in groups)
    for f in files:
        assert pq.ParquetFile(payload / f).metadata.num_rows == len(run.concepts), f
    spectra = sorted(os.listdir(tmp_path / "runs" / "retried" / "statistics"))
    assert spectra == sorted(f"{g}.safetensors" for g in groups)
    oracle = extract_from_config(dataclasses.replace(
        cfg, store=dataclasses.replace(cfg.store, run_id="oracle")), log=io.StringIO())
    for c in run.concepts:
        for m in run.modules:  # sha256 of every payload verified on read
            np.testing.assert_allclose(run.engram(c, m).numpy(), oracle.engram(c, m).numpy(),
                                       rtol=1e-4, atol=1e-6)


def test_solver_task_dying_every_time_fails_cleanly(ray_cluster, tiny_llama_dir, tmp_path):
    cfg = make_config(tmp_path, tiny_llama_dir, "doomed")
    markers = tmp_path / "markers"
    markers.mkdir()
    with pytest.raises(Exception) as e:
        dying_run(cfg, str(markers), every_time=True)
    inner = unwrap(e.value)
    assert "Traceback" not in str(inner) and len(str(inner).strip().splitlines()) == 1, inner
    assert "died" in str(inner) or "crash" in str(inner).lower(), inner
    runs = tmp_path / "runs"
    assert not (runs / "doomed").exists()
    staging = runs / "_staging"
    assert not staging.exists() or not os.listdir(staging)
