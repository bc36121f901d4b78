"""Progress lines (issue 10, everyday use): rows, rates and an ETA, at a configurable interval,
the same on the single-process path as on Ray."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engram_ray.cli import main
from engram_ray.config import ConfigError, ParallelConfig
from engram_ray.progress import Progress, format_eta


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(log: io.StringIO) -> list[str]:
    return [x for x in log.getvalue().splitlines() if x]


def test_eta_counts_from_first_row_not_from_start():
    """Start-up (here 100 s before the first row) must not enter the rate: 200 rows in the
    20 s after the first 100 is 10 rows/s, so the last 700 rows need 70 s."""
    clock, log = Clock(), io.StringIO()
    p = Progress(1000, 5.0, log, clock=clock)
    clock.now += 100  # actors loading: nothing done yet
    p.update(0, 0)
    p.update(100, 1000)  # the first rows arrive: the rate's origin
    clock.now += 20
    p.update(300, 3000, "stage 0: busy")
    last = lines(log)[-1]
    assert "rows 300/1,000 (30%)" in last
    assert "10.0 rows/s" in last and "100 tok/s" in last
    assert "ETA 1:10" in last
    assert last.endswith("| stage 0: busy")


def test_interval_limits_lines_and_force_prints():
    clock, log = Clock(), io.StringIO()
    p = Progress(50, 30.0, log, clock=clock)
    for i in range(1, 11):  # 10 updates over 9 s: one line (the first), none due after it
        p.update(i, i)
        clock.now += 1
    assert len(lines(log)) == 1
    clock.now += 30
    p.update(11, 11)
    assert len(lines(log)) == 2
    p.update(12, 12, force=True)  # the end of a stream always reports
    assert len(lines(log)) == 3


def test_none_interval_prints_nothing():
    log = io.StringIO()
    p = Progress(10, None, log)
    p.update(5, 5)
    p.update(10, 10, force=True)
    assert log.getvalue() == "" and not p.due()


def test_unknown_total_has_no_eta():
    clock, log = Clock(), io.StringIO()
    p = Progress(None, 1.0, log, clock=clock)
    p.update(1, 1)
    clock.now += 2
    p.update(5, 5)
    assert "rows 5," in lines(log)[-1] and "ETA" not in log.getvalue()


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.6, "1:00"), (3725, "1:02:05")])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_bad_interval_refused_with_key(value):
    with pytest.raises(ConfigError, match="parallel.progress_interval_s"):
        ParallelConfig(progress_interval_s=value)


def test_local_cli_prints_progress_with_eta(tmp_path, capsys, tiny_llama_dir):
    """``extract --local`` prints the same progress line as Ray (it printed none before)."""
    cfg = _workspace_config(tmp_path, tiny_llama_dir)
    rc = main(["extract", str(cfg), "--local", "--set", "parallel.progress_interval_s=0.001"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert re.search(r"rows \d+/12 \(\d+%\), [\d.]+ rows/s, [\d,]+ tok/s", err), err
    assert "ETA" in err


def _workspace_config(tmp_path, model):
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"author": ["ada", "bo"][i % 2], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), data / "part-0.parquet")
    cfg = {"model": {"path": model},
           "data": {"paths": [str(data)], "concept_column": "author",
                    "prompt_column": "question", "answer_column": "answer", "max_length": 64,
                    "batch_size": 2},
           "store": {"uri": str(tmp_path / "runs"), "run_id": "progress"}}
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
