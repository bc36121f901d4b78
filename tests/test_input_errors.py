"""Bad input on the CLI's edges (issue 20): one line naming the culprit, a non-zero exit, no
traceback, nothing written. A bad ``--modules`` regex and a malformed ``--set`` value raised
raw ``re.error`` / ``yaml`` tracebacks; ``batch`` wrote its default summary over files it did
not write."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from torch import nn

from engram_ray.cli import main
from engram_ray.config import ConfigError, SelectConfig, apply_overrides
from engram_ray.core.select import match_modules, select_modules


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    """A committed run of the tiny Llama (single process), and its config file."""
    from engram_ray.config import ExtractConfig
    from engram_ray.local import extract_from_config

    tmp = tmp_path_factory.mktemp("errors")
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp / "part-0.parquet")
    raw = {"model": {"path": tiny_llama_dir},
           "data": {"paths": [str(tmp / "part-0.parquet")], "concept_column": "author",
                    "prompt_column": "question", "answer_column": "answer", "max_length": 32},
           "select": {"target_modules": ["down_proj"]},
           "store": {"uri": str(tmp / "runs"), "run_id": "r1"},
           "parallel": {"progress_interval_s": None}}
    (tmp / "extract.yaml").write_text(yaml.safe_dump(raw))
    run = extract_from_config(ExtractConfig.from_dict(raw), log=io.StringIO())
    return tmp, run.uri


def one_line_error(capsys, argv, rc=2) -> str:
    assert main(argv) == rc
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("bad", ["(q_proj", "down_proj[", "*proj"])
def test_bad_modules_regex_names_it(tiny_run, capsys, bad):
    tmp, run = tiny_run
    with pytest.raises(ValueError, match="not a valid regular expression"):
        match_modules(["model.layers.0.mlp.down_proj"], bad)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_modules(nn.Sequential(nn.Linear(2, 2)), bad)
    with pytest.raises(ConfigError, match="select.target_modules"):
        SelectConfig(target_modules=bad)
    line = one_line_error(capsys, ["apply", "--run", run, "--forget", "ada", "--modules", bad,
                                   "--out", str(tmp / "edited")])
    assert repr(bad) in line and ("regex" in line or "regular expression" in line)
    assert not os.path.exists(tmp / "edited")
    line = one_line_error(capsys, ["extract", str(tmp / "extract.yaml"), "--local",
                                   "--set", f"select.target_modules={bad!r}"])
    assert "select.target_modules" in line


@pytest.mark.parametrize("value", ["[a, b", "{stages: 2", "'unclosed"])
def test_malformed_set_value_names_the_key(tiny_run, capsys, value):
    tmp, _ = tiny_run
    with pytest.raises(ConfigError, match="--set data.paths"):
        apply_overrides({}, [f"data.paths={value}"])
    line = one_line_error(capsys, ["extract", str(tmp / "extract.yaml"), "--local",
                                   "--set", f"data.paths={value}"])
    assert "--set data.paths" in line and "not valid YAML" in line
    assert [d for d in os.listdir(tmp / "runs") if not d.startswith("_")] == ["r1"]


def _requests(path, run, out) -> str:
    path.write_text(json.dumps({"request_id": "q1", "run": run, "concepts": ["ada"],
                                "out": str(out)}) + "\n")
    return str(path)


def test_batch_default_summary_never_overwrites_a_file_it_did_not_write(tiny_run, capsys):
    """A requests file without an extension in a folder with a dot (``batch.d/requests``) put
    its summary at ``batch.summary.parquet`` in the parent folder, over what was there."""
    tmp, run = tiny_run
    folder = tmp / "batch.d"
    folder.mkdir()
    precious = tmp / "batch.summary.parquet"
    precious.write_bytes(b"not ours")
    reqs = _requests(folder / "requests", run, tmp / "out-1")
    assert main(["batch", reqs, "--local"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == str(folder / "requests.summary.parquet") and os.path.exists(summary)
    assert precious.read_bytes() == b"not ours"
    assert main(["batch", reqs, "--local"]) == 0  # a re-run replaces its own summary
    assert capsys.readouterr().out.strip().splitlines()[-1] == summary
    # A file of someone else's at the default name: refused before any request runs.
    other = _requests(tmp / "other.jsonl", run, tmp / "out-2")
    (tmp / "other.summary.parquet").write_bytes(b"not ours either")
    line = one_line_error(capsys, ["batch", other, "--local"])
    assert str(tmp / "other.summary.parquet") in line and "--summary" in line
    assert not os.path.exists(tmp / "out-2")
    assert (tmp / "other.summary.parquet").read_bytes() == b"not ours either"


def test_a_concepts_file_that_is_not_utf8_names_file_and_line(tiny_run, capsys):
    tmp, run = tiny_run
    concepts = tmp / "forget.txt"
    concepts.write_bytes(b"ada\nb\xf6\n")  # latin-1, not UTF-8
    line = one_line_error(capsys, ["apply", "--run", run, "--forget-file", str(concepts),
                                   "--out", str(tmp / "edited-2")])
    assert f"concepts file {concepts}, line 2: not UTF-8" in line
    assert not os.path.exists(tmp / "edited-2")
