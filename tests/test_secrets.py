"""Storage credentials never leave the process in clear (issue 13): not in run.json, not in
error messages, not in a config's repr, not in the resume digest, not in any byte an extraction
writes (every object of the bucket, stdout/stderr, Ray's session logs). A sentinel secret is
used as ``storage_options.secret`` (moto accepts any key/secret) and searched for everywhere.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engram_ray.config import ConfigError, DataConfig, ExtractConfig, StoreConfig
from engram_ray.io.sigma_checkpoint import config_digest
from engram_ray.io.storage import Storage, redact, resolve_storage_options

SENTINEL = "SENTINEL-s3cr3t-9d41e7"


def test_redact_replaces_every_credential_at_any_depth():
    opts = {"key": "AKIA", "secret": SENTINEL, "token": SENTINEL, "endpoint_url": "http://x",
            "password": SENTINEL, "username": "AKIA",
            "client_kwargs": {"aws_secret_access_key": SENTINEL, "aws_access_key_id": "AKIA",
                              "aws_session_token": SENTINEL, "region_name": "eu-west-1"},
            "s3_additional_kwargs": {"SSECustomerKey": SENTINEL, "ServerSideEncryption": "x"}}
    out = redact(opts)
    assert SENTINEL not in json.dumps(out) and "AKIA" not in json.dumps(out)
    assert out["endpoint_url"] == "http://x" and out["secret"] == "***"
    assert out["client_kwargs"]["region_name"] == "eu-west-1"
    assert opts["secret"] == SENTINEL  # a copy
    assert redact(None) is None and redact(SENTINEL) == "***"


@pytest.mark.parametrize("options", [
    SENTINEL,  # a pasted secret where a mapping belongs
    {"secret": 12345, "key": [SENTINEL]},
    {"client_kwargs": SENTINEL},
    {"config_kwargs": [SENTINEL]},
    {"secret": ["x", SENTINEL]},
    {"secrett": SENTINEL},  # a typo of a key: the name is echoed, the value never
    {"secret": "***"},  # the redaction placeholder copied from a run.json
])
def test_option_errors_never_echo_a_value(options):
    for build in (lambda: StoreConfig(uri="s3://b/runs", storage_options=options),
                  lambda: DataConfig(paths=["s3://b/d"], text_column="t",
                                     storage_options=options)):
        with pytest.raises(ConfigError, match="storage_options") as e:
            build()
        assert SENTINEL not in str(e.value)
    with pytest.raises(ValueError) as e:
        Storage("s3://b/x", options)
    assert SENTINEL not in str(e.value)
    raw = {"model": {"path": "m"}, "data": {"paths": ["d"], "text_column": "t"},
           "store": SENTINEL}
    with pytest.raises(ConfigError) as e:
        ExtractConfig.from_dict(raw)
    assert SENTINEL not in str(e.value)


def _cfg(secret="s1", endpoint="http://127.0.0.1:1", **store):
    opts = {"endpoint_url": endpoint, "key": "k", "secret": secret}
    return ExtractConfig.from_dict({
        "model": {"path": "s3://b/model"},
        "data": {"paths": ["s3://b/data"], "text_column": "t", "storage_options": opts},
        "store": {"uri": "s3://b/runs", "run_id": "r", "storage_options": opts, **store}})


def test_config_dump_and_repr_hold_no_secret():
    cfg = _cfg(SENTINEL)
    assert SENTINEL not in json.dumps(cfg.to_dict()) and SENTINEL not in repr(cfg)
    assert cfg.to_dict()["store"]["storage_options"]["secret"] == "***"
    assert cfg.store.storage_options["secret"] == SENTINEL  # the object keeps what it needs
    assert resolve_storage_options(cfg.data.storage_options)["secret"] == SENTINEL


def test_rotating_a_key_does_not_block_a_resume():
    assert config_digest(_cfg("old-secret")) == config_digest(_cfg("new-secret"))
    assert config_digest(_cfg()) != config_digest(_cfg(endpoint="http://elsewhere:9"))


def _sentinel_hits(where: dict[str, bytes]) -> list[str]:
    return [name for name, data in where.items() if SENTINEL.encode() in data]


def _bucket_bytes(bucket) -> dict[str, bytes]:
    fs = Storage(bucket.uri, bucket.storage_options).fs
    return {p: fs.cat_file(p) for p in fs.find(bucket.name)}


@pytest.fixture
def s3_workspace(s3_bucket, tmp_path):
    """Shards on the bucket and a config whose data and store options carry the sentinel."""
    rng = np.random.default_rng(0)
    words = "who wrote the sea book river town born award".split()
    rows = [{"author": ["ada", "bo", None][i % 3], "question": " ".join(rng.choice(words, 4)),
             "answer": " ".join(rng.choice(words, 4))} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    s3_bucket.client.upload_file(str(tmp_path / "part-0.parquet"), s3_bucket.name,
                                 "data/part-0.parquet")
    opts = {**s3_bucket.storage_options, "secret": SENTINEL}

    def config(model_dir, run_id):
        return {
            "model": {"path": model_dir},
            "data": {"paths": [f"{s3_bucket.uri}/data"], "concept_column": "author",
                     "prompt_column": "question", "answer_column": "answer", "max_length": 32,
                     "batch_size": 4, "storage_options": opts},
            "parallel": {"stages": 2, "replicas": 1, "num_cpus": 0.25, "encode_num_cpus": 0.25,
                         "solver_num_cpus": 0.25},
            "store": {"uri": f"{s3_bucket.uri}/runs", "run_id": run_id, "storage_options": opts,
                      "keep_statistics": True},
        }

    return config


def test_local_extract_to_s3_writes_no_secret(s3_bucket, s3_workspace, tiny_llama_dir, tmp_path,
                                              capfd):
    from engram_ray.cli import main
    from engram_ray.runs import open_run

    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(s3_workspace(tiny_llama_dir, "local")))
    assert main(["extract", str(path), "--local"]) == 0
    out, err = capfd.readouterr()
    run = open_run(out.strip().splitlines()[-1], {**s3_bucket.storage_options,
                                                  "secret": SENTINEL})
    assert run.info["config"]["store"]["storage_options"]["secret"] == "***"
    assert run.info["config"]["data"]["storage_options"]["secret"] == "***"
    written = {**_bucket_bytes(s3_bucket), "stdout": out.encode(), "stderr": err.encode()}
    assert any("runs/local/run.json" in p for p in written)
    assert _sentinel_hits(written) == []


@pytest.mark.ray
def test_ray_extract_to_s3_writes_no_secret(ray_cluster, s3_bucket, s3_workspace, tiny_llama_dir,
                                            capfd):
    from engram_ray.distributed.runner import run_extract
    from engram_ray.runs import open_run

    uri = run_extract(ExtractConfig.from_dict(s3_workspace(tiny_llama_dir, "ray")))
    out, err = capfd.readouterr()
    run = open_run(uri, {**s3_bucket.storage_options, "secret": SENTINEL})
    assert run.info["mode"] == "distributed"
    written = {**_bucket_bytes(s3_bucket), "stdout": out.encode(), "stderr": err.encode()}
    sessions = {n.get_session_dir_path() for n in [ray_cluster.head_node,
                                                   *ray_cluster.worker_nodes]}
    for session in sessions:
        for d, _, files in os.walk(session):
            for f in files:
                p = os.path.join(d, f)
                if os.path.isfile(p) and not os.path.islink(p):
                    with open(p, "rb") as fh:
                        written[p] = fh.read()
    assert len(written) > 10
    assert _sentinel_hits(written) == []
