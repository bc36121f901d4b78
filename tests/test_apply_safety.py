"""``apply`` fails safe (issue 13): it never runs a factory a run names without consent, never
publishes a partial or merged output (locally or on S3), never writes non-finite weights, and
takes concept names with commas and spaces from a file. Each test reproduces one failure seen
in a hostile review; every refusal is exit 2 and one line naming the culprit."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from engram_ray.cli import main
from engram_ray.config import ExtractConfig
from engram_ray.local import extract_from_config
from engram_ray.models.sequential import mlp

FACTORY = "test_apply_safety:marked_mlp"  # this module, importable as the tests run


def marked_mlp(sizes, marker, seed=0):
    """A legitimate factory with a visible side effect: every call appends to ``marker``."""
    with open(marker, "a") as f:
        f.write("called\n")
    return mlp(sizes, seed=seed)


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str, command: str = "apply") -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(f"engram-ray {command}: error:")]


def assert_one_line_refusal(rc, err, *needles, status=2):
    assert rc == status, err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def siblings(out) -> list[str]:
    """Anything next to ``out`` that a failed write could have left (``out.partial-*``)."""
    parent, name = os.path.split(str(out))
    return [f for f in os.listdir(parent) if f.startswith(name) and f != name]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama_dir):
    """A committed run of the tiny Llama whose concepts include ``"Smith, John "``."""
    tmp = tmp_path_factory.mktemp("safety")
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", "Smith, John ", None][i % 4],
             "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(16)]
    (tmp / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp / "data" / "part-0.parquet")
    cfg = ExtractConfig.from_dict({
        "model": {"path": tiny_llama_dir},
        "data": {"paths": [str(tmp / "data")], "concept_column": "author",
                 "prompt_column": "question", "answer_column": "answer", "max_length": 64},
        "store": {"uri": str(tmp / "runs"), "run_id": "base"},
    })
    return extract_from_config(cfg, log=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory):
    """An untampered run whose model is the non-builtin factory :func:`marked_mlp`."""
    tmp = tmp_path_factory.mktemp("factory")
    marker = tmp / "factory-called.txt"
    net = mlp([4, 8, 3], seed=1)
    weights = str(tmp / "w.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    rng = np.random.default_rng(0)
    rows = [{"concept": ["a", "b", None][i % 3], "x": rng.normal(size=4).tolist()}
            for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp / "d.parquet")
    cfg = ExtractConfig.from_dict({
        "model": {"factory": FACTORY, "weights": weights,
                  "kwargs": {"sizes": [4, 8, 3], "marker": str(marker)}},
        "data": {"paths": [str(tmp / "d.parquet")], "features_column": "x"},
        "store": {"uri": str(tmp / "runs"), "run_id": "f"},
    })
    run = extract_from_config(cfg, log=open(os.devnull, "w"))
    return run, marker


# --- factories: code named by a run runs only with the user's consent ---------------------


def test_a_runs_factory_is_refused_without_consent_and_runs_with_it(factory_run, tmp_path,
                                                                    capsys):
    run, marker = factory_run
    marker.unlink(missing_ok=True)
    rc, _, err = run_cli(capsys, "apply", "--run", run.uri, "--forget", "b",
                         "--out", tmp_path / "refused")
    assert_one_line_refusal(rc, err, FACTORY, "--trust-factory")
    assert not marker.exists(), "the factory ran although the user did not consent"
    assert not (tmp_path / "refused").exists() and not siblings(tmp_path / "refused")

    rc, out, err = run_cli(capsys, "apply", "--run", run.uri, "--forget", "b", "--trust-factory",
                           "--out", tmp_path / "trusted")
    assert rc == 0, err
    assert marker.read_text() == "called\n"
    assert set(os.listdir(tmp_path / "trusted")) == {"model.safetensors", "edit.json"}

    rc, out, err = run_cli(capsys, "apply", "--run", run.uri, "--forget", "b", "--model", FACTORY,
                           "--out", tmp_path / "named")  # naming it again is consent too
    assert rc == 0, err
    a = load_file(str(tmp_path / "trusted" / "model.safetensors"))
    b = load_file(str(tmp_path / "named" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tampered_run_naming_os_system_runs_nothing(factory_run, tmp_path, capsys):
    """A run.json edited to build its model with ``os:system``: refused before any import
    (by the commit check, or by the factory check), and the command never runs."""
    import shutil

    run, _ = factory_run
    tampered = tmp_path / "tampered"
    shutil.copytree(run.uri, tampered)
    info = json.loads((tampered / "run.json").read_text())
    pwned = tmp_path / "pwned"
    info["config"]["model"] = {"factory": "os:system", "kwargs": {"command": f"touch {pwned}"}}
    (tampered / "run.json").write_text(json.dumps(info))
    rc, _, err = run_cli(capsys, "apply", "--run", tampered, "--forget", "b",
                         "--out", tmp_path / "out")
    assert rc == 2 and len(error_lines(err)) == 1, err
    assert not pwned.exists(), "a command named in run.json ran"
    assert not (tmp_path / "out").exists()


# --- outputs: refused up front, published whole, provenance last --------------------------


def test_output_that_is_a_file_is_refused_in_one_line(llama_run, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_text("user data")
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada",
                         "--out", target)
    assert_one_line_refusal(rc, err, str(target), "file")
    assert target.read_text() == "user data"


def test_non_empty_output_directory_is_refused(llama_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada", "--out", out)
    assert_one_line_refusal(rc, err, str(out), "not empty")
    assert os.listdir(out) == ["keep.txt"]


def test_completed_output_ends_with_edit_json_provenance(llama_run, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada,bo",
                              "--alpha", "0.5", "--modules", "down_proj", "--out", out)
    assert rc == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    edit = json.loads((out / "edit.json").read_text())
    assert edit["run"] == llama_run.uri and edit["concepts"] == ["ada", "bo"]
    assert edit["alpha"] == 0.5 and edit["scale"] == "uniform"
    assert edit["modules"] and all(m.endswith("down_proj") for m in edit["modules"])
    assert edit["base_model"]["fingerprint"] == llama_run.info["model"]["fingerprint"]
    from engram_ray import __version__

    assert edit["engram_ray_version"] == __version__
    assert set(edit["files"]) == set(os.listdir(out)) - {"edit.json"}
    assert all(edit["files"][f]["size"] == os.path.getsize(out / f) for f in edit["files"])
    assert all(edit["files"][f]["sha256"] == hashlib.sha256((out / f).read_bytes()).hexdigest()
               for f in edit["files"])
    assert len(edit["request_digest"]) == 64 and edit["output_format"] == 2
    assert not siblings(out)


def test_a_write_that_fails_half_way_publishes_nothing(llama_run, tmp_path, capsys, monkeypatch):
    import engram_ray.io.export as export

    real_write, written = export.SafetensorsWriter.write, []

    def dies_after_one_tensor(self, name, t):
        if written:
            raise OSError(28, "No space left on device")
        written.append(name)
        real_write(self, name, t)

    monkeypatch.setattr(export.SafetensorsWriter, "write", dies_after_one_tensor)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada", "--out", out)
    assert_one_line_refusal(rc, err, "No space left", status=1)
    assert not out.exists() and not siblings(out)


# --- α: nothing non-finite is ever written ------------------------------------------------


@pytest.mark.parametrize("alpha", ["1e39", "-1e39", "inf", "nan"])
def test_alpha_that_overflows_is_refused_before_anything_is_written(llama_run, tmp_path, capsys,
                                                                    alpha):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada",
                         f"--alpha={alpha}", "--out", out)
    assert_one_line_refusal(rc, err, "alpha")
    assert not out.exists() and not siblings(out)


def test_alpha_that_overflows_the_checkpoint_dtype_is_refused(llama_run, tmp_path, capsys,
                                                             tiny_llama_dir):
    """Finite in float32, infinite in the float16 checkpoint: refused, nothing published."""
    from engram_ray.models.loading import ModelSpec, load_model

    half = str(tmp_path / "half")
    load_model(ModelSpec(path=tiny_llama_dir)).half().save_pretrained(half)
    for name in os.listdir(tiny_llama_dir):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.link(os.path.join(tiny_llama_dir, name), os.path.join(half, name))
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada",
                         "--alpha", "1e30", "--model", half, "--out", out)
    # a float16 copy is other weights than the run's: refused, naming the module and the way
    assert_one_line_refusal(rc, err, "sha256 differs", "--allow-other-weights")
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada",
                         "--alpha", "1e30", "--model", half, "--allow-other-weights",
                         "--out", out)
    assert_one_line_refusal(rc, err, "non-finite", "float16")
    assert not out.exists() and not siblings(out)


def test_in_memory_edit_that_would_overflow_leaves_the_model_untouched(tmp_path):
    from engram_ray import Batch, apply_edit, extract, plan_edit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    run = extract(model, [Batch(torch.randn(40, 6), ["a", None] * 20)], uri=str(tmp_path / "r"))
    model = copy.deepcopy(model).half()  # the run stays bound to the float32 model it saw
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        apply_edit(model, plan_edit(run, ["a"], alpha=1e30))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="overflows float32"):
        plan_edit(run, ["a"], alpha=1e39)


# --- concepts with commas and spaces ------------------------------------------------------


@pytest.mark.parametrize("how", ["--forget-file", "--forget @"])
def test_concepts_with_commas_and_spaces_from_a_file(llama_run, tmp_path, capsys, how):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("Smith, John \n\n  \nada\n")  # blank lines are ignored
    flag = ["--forget-file", concepts] if how == "--forget-file" else ["--forget", f"@{concepts}"]
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, *flag, "--out", out)
    assert rc == 0, err
    assert json.loads((out / "edit.json").read_text())["concepts"] == ["Smith, John ", "ada"]


def test_comma_list_cannot_name_such_a_concept(llama_run, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "Smith, John ",
                         "--out", tmp_path / "out")
    assert_one_line_refusal(rc, err, "'Smith'")


# --- S3 outputs ---------------------------------------------------------------------------


def s3_keys(bucket, prefix: str) -> list[str]:
    listing = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for o in listing.get("Contents", []))


FAST_FAIL = {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """``tempfile``'s directory for this test only: what apply leaves there is visible."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_non_empty_s3_prefix_is_refused(llama_run, s3_bucket, capsys):
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="edited/stale.safetensors", Body=b"x")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="model.bin", Body=b"x")
    opts = [a for k, v in s3_bucket.storage_options.items()
            for a in ("--storage-option", f"{k}={v}")]
    for out, needle in ((f"{s3_bucket.uri}/edited", "not empty"), (f"{s3_bucket.uri}/model.bin",
                                                                    "existing object")):
        rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada",
                             "--out", out, *opts)
        assert_one_line_refusal(rc, err, out, needle)
    assert s3_keys(s3_bucket, "edited") == ["stale.safetensors"]


def test_s3_apply_uploads_the_marker_last(llama_run, s3_bucket, private_tmp, monkeypatch):
    import s3fs

    from engram_ray.apply import apply_run

    order, real = [], s3fs.S3FileSystem._put_file

    async def recording(self, lpath, rpath, *a, **kw):
        order.append(rpath.rsplit("/", 1)[-1])
        return await real(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", recording)
    opts = {**s3_bucket.storage_options, "skip_instance_cache": True}
    apply_run(llama_run.uri, ["ada"], out=f"{s3_bucket.uri}/edited", storage_options=opts)
    # the attempt names itself first (a killed upload is recognised), the marker goes last,
    # and the attempt's note is removed once the marker is out
    assert order[0] == "_INCOMPLETE.json" and order[-1] == "edit.json"
    assert "model.safetensors" in order
    assert s3_keys(s3_bucket, "edited") == sorted(order[1:])
    assert os.listdir(private_tmp) == []


@pytest.fixture
def doomed_s3(s3_bucket):
    """A second moto server on loopback that a test may stop. moto's state is per process, so
    the session server (``s3_bucket.client``) still sees what was uploaded through this one."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {**s3_bucket.storage_options, "endpoint_url": f"http://{host}:{port}",
            "config_kwargs": FAST_FAIL, "skip_instance_cache": True}
    state = {"running": True}

    def stop():
        if state["running"]:
            state["running"] = False
            server.stop()

    yield opts, stop
    stop()


def test_s3_killed_mid_upload_leaves_no_marker_and_no_temp_dir(llama_run, s3_bucket, doomed_s3,
                                                               private_tmp, monkeypatch):
    import s3fs

    from engram_ray.apply import apply_run

    opts, stop = doomed_s3
    calls, real = [], s3fs.S3FileSystem._put_file

    async def dies_after_the_first_object(self, lpath, rpath, *a, **kw):
        calls.append(rpath)
        if len(calls) == 2:
            stop()  # S3 goes away between two objects
        return await real(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", dies_after_the_first_object)
    with pytest.raises(OSError) as info:
        apply_run(llama_run.uri, ["ada"], out=f"{s3_bucket.uri}/edited", storage_options=opts)
    assert len(str(info.value).splitlines()) == 1, str(info.value)
    left = s3_keys(s3_bucket, "edited")
    assert len(left) == 1, left  # the first object did land (same moto state): S3 really died
    assert "edit.json" not in left
    assert os.listdir(private_tmp) == [], "the local copy of the model was left behind"


def test_failed_upload_removes_what_it_uploaded(llama_run, s3_bucket, private_tmp, monkeypatch):
    import s3fs

    from engram_ray.apply import apply_run

    calls, real = [], s3fs.S3FileSystem._put_file

    async def fails_third(self, lpath, rpath, *a, **kw):
        calls.append(rpath)
        if len(calls) == 3:
            raise OSError("connection reset by peer")
        return await real(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", fails_third)
    opts = {**s3_bucket.storage_options, "skip_instance_cache": True}
    with pytest.raises(OSError, match="connection reset"):
        apply_run(llama_run.uri, ["ada"], out=f"{s3_bucket.uri}/edited", storage_options=opts)
    assert len(calls) == 3
    assert s3_keys(s3_bucket, "edited") == []
    assert os.listdir(private_tmp) == []


def test_s3_down_from_the_start_is_one_line_and_leaves_nothing(llama_run, s3_bucket, doomed_s3,
                                                              private_tmp, capsys):
    opts, stop = doomed_s3
    stop()
    flags = [a for k, v in opts.items() if k != "skip_instance_cache"
             for a in ("--storage-option", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")]
    rc, _, err = run_cli(capsys, "apply", "--run", llama_run.uri, "--forget", "ada",
                         "--out", f"{s3_bucket.uri}/edited", *flags)
    assert_one_line_refusal(rc, err, f"{s3_bucket.uri}/edited", status=1)
    assert os.listdir(private_tmp) == []
    assert s3_keys(s3_bucket, "edited") == []
