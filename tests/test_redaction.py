"""Secrets anywhere in nested options never leave the process, and storage errors a user can
fix name the URI (issue 20.7).

Before: a proxy password in ``storage_options.config_kwargs`` was stored verbatim in
``run.json`` (only keys named like a secret were redacted), and a missing bucket or refused
credentials surfaced as a bare ``Forbidden`` / ``The specified bucket does not exist``.
"""

from __future__ import annotations

import json

import pytest
import requests

from engram_ray.config import ExtractConfig, ModelSpec
from engram_ray.io.storage import Storage, StorageError
from engram_ray.redaction import one_line, redact, redact_text

SENTINEL = "SENTINEL-pr0xy-7f3a91"


def test_every_secret_in_nested_options_is_redacted():
    opts = {
        "endpoint_url": f"http://user:{SENTINEL}@minio:9000",
        "config_kwargs": {
            "proxies": {"https": f"http://proxyuser:{SENTINEL}@proxy:3128",
                        "http": f"http://{SENTINEL}@proxy:3128"},
            "proxies_config": {"proxy_headers": {"Proxy-Authorization": f"Basic {SENTINEL}"}}},
        "client_kwargs": {"headers": [["Authorization", f"Bearer {SENTINEL}"], ["X-Ok", "1"]]},
        "s3_additional_kwargs": {"SSECustomerKey": SENTINEL},
        "account_key": SENTINEL, "connection_string": f"AccountKey={SENTINEL}",
        "sas_url": f"https://acct.blob.core.windows.net/c?sv=2022&sig={SENTINEL}&se=x",
    }
    out = redact(opts)
    assert SENTINEL not in json.dumps(out)
    assert out["config_kwargs"]["proxies"]["https"] == "http://***@proxy:3128"
    assert out["endpoint_url"] == "http://***@minio:9000"
    assert out["client_kwargs"]["headers"][1] == ["X-Ok", "1"]
    assert out["sas_url"].endswith("sig=***&se=x")
    assert redact_text("hf://org/name@main and s3://bucket/key") == \
        "hf://org/name@main and s3://bucket/key"  # revisions and plain URIs are left alone


def test_run_json_and_edit_json_records_hold_no_proxy_password(tmp_path):
    opts = {"config_kwargs": {"proxies": {"https": f"http://u:{SENTINEL}@proxy:3128"}}}
    cfg = ExtractConfig.from_dict({
        "model": {"path": f"s3://u:{SENTINEL}@bucket/model"},
        "data": {"paths": ["s3://b/d"], "text_column": "t", "storage_options": opts},
        "store": {"uri": "s3://b/runs", "storage_options": opts}})
    assert SENTINEL not in json.dumps(cfg.to_dict()) and SENTINEL not in repr(cfg)
    assert cfg.store.storage_options == opts  # the object keeps what it needs
    assert SENTINEL not in json.dumps(ModelSpec(path=f"s3://u:{SENTINEL}@b/m").to_dict())


def test_env_secrets_are_scrubbed_from_messages(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    assert SENTINEL not in one_line(RuntimeError(f"401 for token {SENTINEL}"))


def test_a_storage_error_never_quotes_a_url_password():
    st = Storage("s3://bucket/x", {"endpoint_url": f"http://u:{SENTINEL}@127.0.0.1:9",
                                   "key": "k", "secret": "s", "region": "us-east-1",
                                   "config_kwargs": {"retries": {"max_attempts": 1},
                                                     "connect_timeout": 1}})
    with pytest.raises((StorageError, OSError)) as e:
        st.write_bytes("", b"x")
    assert SENTINEL not in str(e.value) and "s3://bucket/x" in str(e.value)


def test_a_missing_bucket_is_named(s3_bucket):
    st = Storage("s3://no-such-bucket-e2a1/runs/r/run.json", s3_bucket.storage_options)
    for op in (lambda: st.write_bytes("", b"x"), st.ls):
        with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket-e2a1/runs/r/run.json "
                                                    r"failed: the bucket does not exist"):
            op()


@pytest.fixture
def iam_enforced(s3_server):
    """moto's server checking credentials (a user's keys are unknown to it: all refused)."""
    url = f"{s3_server.endpoint_url}/moto-api/reset-auth"
    prev = requests.post(url, data=b"0", timeout=10).json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        yield
    finally:
        requests.post(url, data=str(prev).encode(), timeout=10)


def test_refused_credentials_are_named_with_the_uri(s3_bucket, iam_enforced):
    opts = {**s3_bucket.storage_options, "key": "wrong-key", "secret": SENTINEL}
    st = Storage(f"{s3_bucket.uri}/runs/r/run.json", opts)
    for op in (st.read_bytes, st.exists, lambda: st.write_bytes("", b"x"), st.ls):
        with pytest.raises(PermissionError, match=rf"{s3_bucket.uri}/runs/r/run.json failed: "
                                                  r"access denied \(check the credentials"
                           ) as e:
            op()
        assert SENTINEL not in str(e.value)


def test_the_cli_never_prints_a_url_password(tmp_path, capsys):
    from engram_ray.cli import main

    assert main(["show", f"cache::s3://user:{SENTINEL}@bucket/runs/r"]) == 2  # quotes the URI
    err = capsys.readouterr().err
    assert err.startswith("engram-ray show: error:") and SENTINEL not in err
