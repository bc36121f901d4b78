"""Every fsspec scheme, or a clear refusal (issue 21.5).

- A scheme whose implementation is not installed (``gs://`` without gcsfs) fails at once,
  naming the package, and nothing is written to a local folder named after the scheme (before:
  ``apply --out gs://b/x`` wrote ``./gs:/b/x`` and printed success).
- ``file://`` is its local path; ``memory://`` (any installed scheme) holds data, runs and
  outputs end to end, equal to the same work on local disk.
- Leases use each backend's exclusive create (``mode="create"`` for S3/GCS, ``overwrite=False``
  for Azure, a lock for ``memory://``) and are refused where there is none (``hf://``).
"""

from __future__ import annotations

import io
import os
import sys

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from engram_ray import uris
from engram_ray.config import ConfigError, ExtractConfig
from engram_ray.io.lease import Lease, LeaseHeld
from engram_ray.io.storage import Storage
from engram_ray.uris import UnsupportedScheme


@pytest.fixture
def no_gcsfs(monkeypatch):
    """gcsfs made unimportable (it is not installed here; this keeps the test true where it
    is), with the scheme cache cleared around the test."""
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    uris._filesystem_class.cache_clear()
    uris.backend_option_names.cache_clear()
    yield
    uris._filesystem_class.cache_clear()
    uris.backend_option_names.cache_clear()


def _scheme_folders(root) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if n.endswith(":")]


def test_apply_out_gs_without_gcsfs_fails_naming_it_and_writes_nothing(
        no_gcsfs, tmp_path, monkeypatch, capsys):
    from engram_ray.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["apply", "--run", str(tmp_path / "runs" / "r"), "--forget", "ada",
               "--out", "gs://bucket/edited"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "gcsfs" in err and "gs://bucket/edited" in err and len(err.strip().splitlines()) == 1
    assert _scheme_folders(tmp_path) == [] and not os.path.exists(tmp_path / "gs:")


def test_configs_and_storage_refuse_a_missing_implementation(no_gcsfs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"model": {"path": str(tmp_path)}, "data": {"paths": ["d.parquet"], "text_column": "t"}}
    with pytest.raises(ConfigError, match=r"store.uri: gs://b/runs: gs:// needs the gcsfs"):
        ExtractConfig.from_dict({**base, "store": {"uri": "gs://b/runs"}})
    with pytest.raises(ConfigError, match="pip install gcsfs"):
        ExtractConfig.from_dict({**base, "data": {"paths": ["gs://b/d.parquet"],
                                                  "text_column": "t", "storage_options": {}}})
    with pytest.raises(UnsupportedScheme, match="gs://b/x: gs:// needs the gcsfs package"):
        Storage("gs://b/x")
    with pytest.raises(UnsupportedScheme, match="unknown storage scheme nosuch://"):
        Storage("nosuch://b/x")
    with pytest.raises(UnsupportedScheme, match="chained"):
        Storage("simplecache::s3://b/x")
    assert _scheme_folders(tmp_path) == []


def test_file_urls_are_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = Storage(f"file://{tmp_path}/a/")
    assert (st.uri, st.root, st.remote, st.scheme) == (f"{tmp_path}/a", f"{tmp_path}/a", False,
                                                      "file")
    st.makedirs()
    st.write_bytes("x.txt", b"hi")
    assert (tmp_path / "a" / "x.txt").read_bytes() == b"hi"
    from engram_ray.config import StoreConfig

    assert StoreConfig(uri=f"file://{tmp_path}/runs").uri == f"{tmp_path}/runs"
    assert _scheme_folders(tmp_path) == []


def test_options_are_checked_per_scheme_and_s3_ones_not_passed_on():
    st = Storage("memory://opts/x", {"endpoint_url": "http://127.0.0.1:9", "key": "k",
                                     "config_kwargs": {"retries": {"max_attempts": 2}}})
    assert isinstance(st.fs, MemoryFileSystem) and st.root == "/opts/x"
    with pytest.raises(ValueError, match=r"unknown storage option\(s\) \['bogus'\]"):
        Storage("memory://opts/x", {"bogus": 1})
    hf = Storage("hf://org/name", {"token": "hf_x", "endpoint_url": "http://127.0.0.1:9"})
    assert hf.fs.token == "hf_x"  # the Hub's own keyword reaches it; S3's stay behind


class _FakeObjectStore(MemoryFileSystem):
    """A memory store answering conditional creates as gcsfs/adlfs do (412 / exists error)."""

    calls: list = []

    def pipe_file(self, path, value, mode="overwrite", overwrite=True, **kwargs):
        type(self).calls.append({"mode": mode, "overwrite": overwrite})
        if (mode == "create" or not overwrite) and self.exists(path):
            raise OSError("412 Precondition Failed: ifGenerationMatch")
        super().pipe_file(path, value)


@pytest.mark.parametrize("scheme,expected", [("gs", {"mode": "create", "overwrite": True}),
                                             ("az", {"mode": "overwrite", "overwrite": False})])
def test_leases_use_each_backends_conditional_create(scheme, expected, monkeypatch):
    monkeypatch.setattr(_FakeObjectStore, "protocol", (scheme,))
    fsspec.register_implementation(scheme, _FakeObjectStore, clobber=True)
    uris._filesystem_class.cache_clear()
    uris.backend_option_names.cache_clear()
    try:
        where = Storage(f"{scheme}://bucket/{os.urandom(4).hex()}/_lease")
        _FakeObjectStore.calls = []
        first = Lease(where, timeout_s=60).acquire()
        with pytest.raises(LeaseHeld, match="locked by"):
            Lease(where, timeout_s=60).acquire()
        assert _FakeObjectStore.calls[0] == expected
        first.release()
    finally:
        sys.modules["fsspec.registry"]._registry.pop(scheme, None)  # behind the read-only view
        uris._filesystem_class.cache_clear()
        uris.backend_option_names.cache_clear()


def test_a_lease_where_there_is_no_exclusive_create_is_refused_saying_why():
    with pytest.raises(UnsupportedScheme, match=r"hf:// has no exclusive create .* refused"):
        Lease(Storage("hf://org/name/_leases/r")).acquire()


def _shards_to_memory(prefix: str) -> str:
    rng = np.random.default_rng(3)
    words = "the author wrote a book about the sea river town".split()
    fs = fsspec.filesystem("memory")
    for shard in range(2):
        rows = [{"concept": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
                 "answer": " ".join(rng.choice(words, 3))} for i in range(9)]
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        fs.pipe_file(f"/{prefix}/data/part-{shard}.parquet", sink.getvalue())
    return f"memory://{prefix}/data"


def _config(model, data, store, run_id):
    return ExtractConfig.from_dict({
        "model": {"path": model},
        "data": {"paths": [data], "prompt_column": "question", "answer_column": "answer",
                 "max_length": 32, "batch_size": 4},
        "store": {"uri": store, "run_id": run_id}})


def test_memory_scheme_holds_data_runs_and_outputs_end_to_end(tiny_llama_dir, tmp_path):
    """Data, the run and the edited model on memory:// equal the same work on local disk (the
    edited weights, which every engram of the run went into, tensor for tensor)."""
    from safetensors.torch import load

    from engram_ray.apply import apply_run
    from engram_ray.local import extract_from_config
    from engram_ray.runs import open_run

    prefix = f"e2e-{os.urandom(4).hex()}"
    data = _shards_to_memory(prefix)
    fs = fsspec.filesystem("memory")
    try:
        remote = extract_from_config(_config(tiny_llama_dir, data, f"memory://{prefix}/runs", "r"))
        local_data = tmp_path / "data"
        fs.get(f"/{prefix}/data", str(local_data), recursive=True)
        local = extract_from_config(_config(tiny_llama_dir, str(local_data), str(tmp_path / "runs"),
                                            "r"))
        assert remote.uri == f"memory://{prefix}/runs/r"
        again = open_run(remote.uri)
        assert again.concepts == local.concepts == ["ada", "bo"]
        assert again.modules == local.modules
        out = apply_run(remote.uri, ["ada"], out=f"memory://{prefix}/edited")
        apply_run(local.uri, ["ada"], out=str(tmp_path / "edited"))
        got = load(fs.cat_file(f"{out.split('://', 1)[1]}/model.safetensors"))
        want = load((tmp_path / "edited" / "model.safetensors").read_bytes())
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert fs.exists(f"/{prefix}/edited/edit.json")
        assert not fs.exists(f"/{prefix}/runs/_leases/r")  # released
    finally:
        fs.rm(f"/{prefix}", recursive=True)
    assert _scheme_folders(tmp_path) == [] and _scheme_folders(os.getcwd()) == []


@pytest.mark.parametrize("argv", [["show", "gs://b/runs/r"], ["list", "gs://b/runs"],
                                  ["tick", "gs://b/queue", "--local"]])
def test_every_command_refuses_a_missing_implementation(no_gcsfs, argv, tmp_path, monkeypatch,
                                                        capsys):
    from engram_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "pip install gcsfs" in capsys.readouterr().err
    assert _scheme_folders(tmp_path) == []


def test_file_url_arguments_are_local_paths(tmp_path, monkeypatch, capsys):
    from engram_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["show", f"file://{tmp_path}/runs/r"]) == 2
    assert f"{tmp_path}/runs/r" in capsys.readouterr().err
    assert _scheme_folders(tmp_path) == []


def test_config_and_the_neutral_modules_import_nothing_from_io():
    """config.py validates locations with engram_ray.uris; the arrow never runs back up."""
    import ast
    import pathlib

    pkg = pathlib.Path(__file__).resolve().parents[1] / "engram_ray"
    for name in ("config.py", "uris.py", "redaction.py", "hub.py"):
        tree = ast.parse((pkg / name).read_text())
        mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        bad = [m for m in mods if m.startswith(("engram_ray.io", "engram_ray.models",
                                                 "engram_ray.distributed"))]
        assert not bad, (name, bad)


def test_listings_of_memory_name_their_files_as_given():
    st = Storage(f"memory://listing-{os.urandom(4).hex()}")
    st.write_bytes("a/x.parquet", b"1")
    try:
        assert st.to_uri(st.fs.find(st.root)[0]) == f"{st.uri}/a/x.parquet"
    finally:
        st.rm()
