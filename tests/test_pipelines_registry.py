"""The pipelines registry: names resolve lazily to entry points, unknown names say what is known,
and ``engram-ray demo --pipeline`` goes through it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engram_ray.cli import main
from pipelines import PIPELINES, get_pipeline


def test_unknown_pipeline_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown pipeline 'nope'") as e:
        get_pipeline("nope")
    for name in PIPELINES:
        assert name in str(e.value)


def test_digits_resolves_to_its_entry_point_without_running_it():
    fn = get_pipeline("digits")
    assert callable(fn)
    assert (fn.__module__, fn.__name__) == ("pipelines.digits", "run_demo")


def test_importing_the_registry_imports_no_pipeline():
    code = ("import sys, pipelines; "
            "assert 'torch' not in sys.modules and 'pipelines.digits' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_with_unknown_pipeline_exits_2_naming_known_ones(capsys, tmp_path):
    rc = main(["demo", "--pipeline", "nope", "--out", str(tmp_path / "demo")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        f"engram-ray demo: error: unknown pipeline 'nope' (known: {', '.join(sorted(PIPELINES))})"]
    assert not (tmp_path / "demo").exists()
