"""Faults under the Ray pipeline (issue 13): a stage actor that fails its setup, dies mid-stream,
or loses its node. The guarantee: the run fails with one line on stderr (never Ray's wrapped
traceback) and nothing is committed — or, if the executor recovers, the committed run counted
every row exactly once. A bad input reads the same with ``--local`` and with Ray.

The faults are real: the actor's worker process is SIGKILLed (found in the GCS actor table;
once the driver's progress line counts fed rows), and the node is a fresh one added to the session cluster for this test (the
stage actors reserve more CPUs than the session's own nodes have, so they can only land there)
and removed mid-run with ``Cluster.remove_node``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engram_ray.cli import main

pytestmark = pytest.mark.ray

WORDS = "who wrote the sea book river town born award".split()


def write_config(tmp_path, model_dir, rows: int, **parallel) -> tuple[str, str]:
    """A text extraction of ``rows`` rows (tiny Llama, 2 stages, 1 replica); returns
    (config path, store root)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    table = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(WORDS, 4)),
              "answer": " ".join(rng.choice(WORDS, 3))} for i in range(rows)]
    schema = pa.schema([("author", pa.string()), ("question", pa.string()),
                        ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist(table, schema=schema), data / "part-0.parquet")
    cfg = {
        "model": {"path": model_dir},
        "data": {"paths": [str(data)], "concept_column": "author", "prompt_column": "question",
                 "answer_column": "answer", "max_length": 32, "batch_size": 2},
        "parallel": {"stages": 2, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                     "solver_num_cpus": 0.25, "max_in_flight": 1, "encode_concurrency": 1,
                     **parallel},
        "store": {"uri": str(tmp_path / "runs"), "run_id": "fault"},
    }
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), str(tmp_path / "runs")


def committed(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return [d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "_COMMITTED"))]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("engram-ray extract: error:")]


def extract(capsys, *argv, timeout: float = 300.0):
    """``engram-ray extract`` in-process, in a thread joined with a deadline (a hung pipeline
    fails the test instead of hanging the session); returns (rc, stdout, stderr)."""
    box: dict = {}

    def target():
        try:
            box["rc"] = main(["extract", *map(str, argv)])
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            box["raised"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    out, err = capsys.readouterr()
    assert not t.is_alive(), f"extract still running after {timeout}s:\n{err[-3000:]}"
    assert "raised" not in box, f"extract raised instead of reporting: {box.get('raised')!r}"
    return box["rc"], out, err


def assert_fails_in_one_line(rc, err, root, *needles):
    assert rc != 0, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert not any(w in err for w in ("RayTaskError", "ActorDiedError", "ray::")), err
    assert len(lines[0]) < 300, lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert committed(root) == []


# --- bad input: one line, the same with --local and with Ray --------------------------------


@pytest.mark.parametrize("case", ["stage setup", "empty dataset", "missing column"])
def test_bad_input_reads_the_same_with_local_and_ray(ray_cluster, tiny_llama_dir, tmp_path,
                                                     capsys, case):
    """A stage actor's setup error (here an unknown ``parallel.dtype``, found when the stage
    loads its slice) used to print Ray's 44-line ``ActorDiedError``."""
    cfg, root = write_config(tmp_path, tiny_llama_dir, 0 if case == "empty dataset" else 6)
    sets = {"stage setup": ["--set", "parallel.dtype=float77"],
            "missing column": ["--set", "data.answer_column=reply"]}.get(case, [])
    lines = {}
    for mode in ("--local", "ray"):
        rc, _, err = extract(capsys, cfg, *sets, *(["--local"] if mode == "--local" else []))
        assert rc == 2, err
        assert len(error_lines(err)) == 1, err
        assert not any(w in err for w in ("RayTaskError", "ActorDiedError", "ray::")), err
        lines[mode] = error_lines(err)[0]
        assert committed(root) == []
    assert lines["--local"] == lines["ray"]
    needle = {"stage setup": "float77", "empty dataset": "no rows", "missing column": "'reply'"}
    assert needle[case] in lines["ray"]


# --- an actor or a node lost mid-stream -------------------------------------------------------


def stage_actors(exclude: set[str]) -> list[dict]:
    """This cluster's live stage actors not in ``exclude``: id, pid and node, read from the GCS
    (``ray._private.state``: the state API goes through the dashboard, which a loaded machine
    makes time out)."""
    from ray._private import state

    return [{"id": a["ActorID"], "pid": a["Pid"], "node_id": a["Address"]["NodeID"]}
            for a in state.actors(actor_state_name="ALIVE").values()
            if a["ActorClassName"] == "StageActor" and a["ActorID"] not in exclude]


def streaming() -> bool:
    """True once the driver's progress line (stderr, captured by ``capsys`` and read without
    consuming it) counts fed rows: rows are flowing through the stage actors. Ray's task
    state API would say so too, but it goes through the dashboard, which a loaded machine
    makes time out."""
    text = getattr(sys.stderr, "getvalue", str)()
    return re.search(r"\] rows [1-9][\d,]*/", text) is not None


class Saboteur(threading.Thread):
    """Waits for this run's stage actors to stream rows, then calls ``strike(actors)``."""

    def __init__(self, strike, n_actors: int = 2, deadline: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.strike, self.n_actors, self.deadline = strike, n_actors, time.time() + deadline
        self.before = {a["id"] for a in stage_actors(set())}
        self.struck_at: float | None = None
        self.error: BaseException | None = None
        self.run_over = threading.Event()  # set by the test when the run has returned

    def run(self) -> None:
        try:
            while time.time() < self.deadline and not self.run_over.is_set():
                actors = stage_actors(self.before)
                if len(actors) == self.n_actors and streaming():
                    self.strike(actors)
                    self.struck_at = time.time()
                    return
                time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            self.error = e


def check_outcome(rc, err, root, saboteur, rows, *needles):
    """Failed in one line with nothing committed, or (if the executor recovered) committed a
    run that counted every row once."""
    assert saboteur.error is None, saboteur.error
    assert saboteur.struck_at is not None, "the fault was never injected: rows never flowed"
    if rc == 0:
        from engram_ray.io.store import open_run

        [run_id] = committed(root)
        assert open_run(os.path.join(root, run_id)).info["data"]["rows"] == rows
        return
    assert_fails_in_one_line(rc, err, root, *needles)


def test_stage_actor_killed_mid_stream(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    rows = 5000
    cfg, root = write_config(tmp_path, tiny_llama_dir, rows)
    saboteur = Saboteur(lambda actors: os.kill(actors[-1]["pid"], signal.SIGKILL))
    saboteur.start()
    rc, _, err = extract(capsys, cfg)
    saboteur.run_over.set()
    saboteur.join(30)
    check_outcome(rc, err, root, saboteur, rows, "died")


def test_node_lost_mid_run(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    """The stage actors ask for 3 CPUs each: only the added 6-CPU node fits them (the session
    nodes have 2), so removing that node takes both stages down mid-stream."""
    node = ray_cluster.add_node(num_cpus=6, resources={"doomed": 1},
                                object_store_memory=100 << 20)

    def remove(actors):
        assert {a["node_id"] for a in actors} == {node.node_id}, "stage actors not on the node"
        ray_cluster.remove_node(node)

    saboteur = Saboteur(remove)
    try:
        rows = 5000
        cfg, root = write_config(tmp_path, tiny_llama_dir, rows, num_cpus=3)
        saboteur.start()
        rc, _, err = extract(capsys, cfg)
        saboteur.run_over.set()
        saboteur.join(30)
        check_outcome(rc, err, root, saboteur, rows, "died")
    finally:
        saboteur.run_over.set()
        saboteur.join(30)
        if node in ray_cluster.worker_nodes:  # the session cluster gets back its 3 nodes
            ray_cluster.remove_node(node)
