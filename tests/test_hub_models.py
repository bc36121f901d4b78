"""Hugging Face Hub model ids as ``model.path`` (issue 21.8), offline from a pre-populated cache.

Before: ``model.path: org/name`` was refused as a missing folder. Now ``org/name`` and
``hf://org/name@revision`` resolve through huggingface_hub's cache (``HF_HOME``), the tokenizer
the same way, with ``HF_HUB_OFFLINE=1`` and no network. The cache is built in the library's own
layout (``models--org--name/{blobs,refs,snapshots}``, snapshot files symlinked to blobs) and
checked with ``huggingface_hub.scan_cache_dir``. A path that is no folder, no URI and no cached
id fails naming all three; a checkpoint with its own code gets a correct one-line refusal.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from engram_ray.config import ModelSpec
from engram_ray.models.loading import (
    check_model_path,
    load_model,
    load_model_config,
    load_tokenizer,
    model_dir,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SENTINEL = "hf_SENTINELt0ken9d41e7aa"


def populate_cache(hub_cache: str, repo: str, src: str, commit: str = COMMIT) -> str:
    """``src``'s files as the Hub cache holds a download of ``repo`` at ``commit`` (branch
    ``main``): content-addressed blobs, a snapshot of symlinks, and the ref."""
    root = os.path.join(hub_cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(root, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return snap


@pytest.fixture
def hf_home(tmp_path, monkeypatch, tiny_llama_dir):
    home = tmp_path / "hf-home"
    populate_cache(str(home / "hub"), "tiny-org/tiny-llama", tiny_llama_dir)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    return home


def test_the_cache_is_the_librarys_own_layout(hf_home):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(str(hf_home / "hub"))
    (repo,) = info.repos
    assert repo.repo_id == "tiny-org/tiny-llama" and not info.warnings
    assert {r.commit_hash for r in repo.revisions} == {COMMIT}


def test_hub_ids_resolve_offline_from_the_cache(hf_home, tiny_llama_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder named tiny-org/tiny-llama
    bare, pinned = ModelSpec(path="tiny-org/tiny-llama"), \
        ModelSpec(path=f"hf://tiny-org/tiny-llama@{COMMIT}")
    assert bare.path == "hf://tiny-org/tiny-llama"  # recorded as a URI
    snap = str(hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT)
    assert model_dir(bare.path) == model_dir(pinned.path) == model_dir("hf://tiny-org/tiny-llama@main") \
        == snap
    want = load_model(ModelSpec(path=tiny_llama_dir)).state_dict()
    got = load_model(bare).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert load_tokenizer(pinned)("who wrote it").input_ids == \
        load_tokenizer(ModelSpec(path=tiny_llama_dir))("who wrote it").input_ids
    assert load_model_config(bare).model_type == "llama"
    check_model_path(bare.path)
    from engram_ray.io.storage import Storage

    assert Storage(bare.path).exists()  # what the extraction checks first, offline


def test_a_path_that_is_nothing_names_all_three(hf_home, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for path in ("no-such-org/no-such-model", "./missing-folder", "hf://tiny-org/tiny-llama@v9"):
        with pytest.raises(FileNotFoundError) as e:
            model_dir(ModelSpec(path=path).path)
        msg = str(e.value)
        assert "folder" in msg and "URI" in msg and "Hub" in msg and str(hf_home) in msg, msg
        assert SENTINEL not in msg and len(msg.splitlines()) == 1
        with pytest.raises(FileNotFoundError):
            check_model_path(ModelSpec(path=path).path)


def test_extract_with_a_hub_id_offline_equals_the_folder(hf_home, tiny_llama_dir, tmp_path,
                                                         monkeypatch, capfd):
    """The CLI (--local), offline: the run records hf://…, its engrams equal the run of the
    same model given as a folder, and HF_TOKEN is written nowhere."""
    from engram_ray import open_run
    from engram_ray.cli import main

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    words = "the author wrote a book about the sea river town".split()
    rows = [{"concept": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 3))} for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    uris = {}
    for run_id, model in (("hub", "tiny-org/tiny-llama"), ("dir", tiny_llama_dir)):
        cfg = tmp_path / f"{run_id}.yaml"
        cfg.write_text(yaml.safe_dump({
            "model": {"path": model},
            "data": {"paths": [str(tmp_path / "part-0.parquet")], "prompt_column": "question",
                     "answer_column": "answer", "max_length": 32, "batch_size": 4},
            "store": {"uri": str(tmp_path / "runs"), "run_id": run_id}}))
        assert main(["extract", str(cfg), "--local"]) == 0
        uris[run_id] = str(tmp_path / "runs" / run_id)
    out, err = capfd.readouterr()
    hub_run, dir_run = open_run(uris["hub"]), open_run(uris["dir"])
    assert hub_run.info["config"]["model"]["path"] == "hf://tiny-org/tiny-llama"
    for c in dir_run.concepts:
        for m in dir_run.modules:
            assert torch.equal(hub_run.engram(c, m), dir_run.engram(c, m))
    written = [open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tmp_path / "runs")
               for f in fs]
    assert all(SENTINEL.encode() not in b for b in written) and SENTINEL not in out + err


def test_a_checkpoint_with_its_own_code_is_refused_in_one_correct_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my_custom", "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                     "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    with pytest.raises(ValueError) as e:
        load_model_config(ModelSpec(path=str(tmp_path)))
    msg = str(e.value)
    assert "my_custom" in msg and "never runs a checkpoint's code" in msg
    assert "trust_remote_code" not in msg and len(msg.splitlines()) == 1
