"""Storage locations: option pass-through to s3fs and Arrow, refusals, and path joins."""

from __future__ import annotations

import os
import pickle

import pytest

from engram_ray.io.storage import Storage, resolve_storage_options, s3_option_names

ENDPOINT = "http://127.0.0.1:9"  # never contacted: these tests only build filesystems


@pytest.fixture
def no_aws_env(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_s3fs_options_pass_through(no_aws_env):
    opts = {"endpoint_url": ENDPOINT, "requester_pays": True, "default_block_size": 1 << 20,
            "config_kwargs": {"max_pool_connections": 7}, "profile": "someone",
            "s3_additional_kwargs": {"ServerSideEncryption": "AES256"}}
    fs = Storage("s3://bucket/run", opts).fs
    assert fs.requester_pays is True
    assert fs.default_block_size == 1 << 20
    assert fs.config_kwargs == {"max_pool_connections": 7}
    assert fs.s3_additional_kwargs == {"ServerSideEncryption": "AES256"}
    assert fs.kwargs["profile"] == "someone"  # goes to the botocore session
    assert fs.endpoint_url == ENDPOINT


def test_unknown_option_is_refused_by_name(no_aws_env):
    with pytest.raises(ValueError, match=r"unknown storage option\(s\) \['endpoint'\]") as e:
        Storage("s3://bucket", {"endpoint": ENDPOINT})
    assert "requester_pays" in str(e.value) and "endpoint_url" in str(e.value)
    for refused in ("asynchronous", "use_listings_cache"):
        with pytest.raises(ValueError, match=refused):
            resolve_storage_options({refused: True})
    assert {"key", "secret", "token", "anon", "region", "profile", "client_kwargs"} <= set(
        s3_option_names())


def test_region_maps_to_client_kwargs(no_aws_env):
    st = Storage("s3://bucket", {"endpoint_url": ENDPOINT, "region": "eu-west-1",
                                 "client_kwargs": {"verify": False}})
    assert st.fs.client_kwargs == {"verify": False, "region_name": "eu-west-1"}
    assert st.arrow.region == "eu-west-1"
    with pytest.raises(ValueError, match="two regions"):
        Storage("s3://bucket", {"region": "eu-west-1",
                                "client_kwargs": {"region_name": "us-west-2"}})


def test_endpoint_and_region_from_env_but_not_credentials(no_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
    assert resolve_storage_options({}) == {"endpoint_url": ENDPOINT, "region": "ap-south-1"}
    assert resolve_storage_options({"region": "eu-west-1"})["region"] == "eu-west-1"
    # A region given inside client_kwargs is not overridden by the environment's.
    ck = {"client_kwargs": {"region_name": "us-west-2"}}
    assert "region" not in resolve_storage_options(ck)
    fs = Storage("s3://bucket", {}).fs
    assert fs.key is None and fs.secret is None  # botocore's own chain reads them


def test_s3_paths_and_children(no_aws_env):
    st = Storage("s3://bucket/runs/", {"endpoint_url": ENDPOINT})
    assert (st.uri, st.root, st.remote) == ("s3://bucket/runs", "bucket/runs", True)
    assert st.path() == "bucket/runs"
    assert st.path("payload", "m.parquet") == "bucket/runs/payload/m.parquet"
    assert st.uri_of("run.json") == "s3://bucket/runs/run.json"
    child = st.child("r1", "_checkpoints")
    assert (child.uri, child.root) == ("s3://bucket/runs/r1/_checkpoints", "bucket/runs/r1/_checkpoints")
    assert child.fs is st.fs and child.path("state.json") == "bucket/runs/r1/_checkpoints/state.json"
    assert st.to_uri("bucket/runs/x.parquet") == "s3://bucket/runs/x.parquet"
    again = pickle.loads(pickle.dumps(child))
    assert (again.uri, again.root, again.options) == (child.uri, child.root, child.options)


def test_local_root_is_absolute_and_children_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = Storage("runs/r1", {"anything": "ignored locally"})
    assert not st.remote and st.arrow is None
    assert st.root == os.path.join(str(tmp_path), "runs", "r1") and os.path.isabs(st.root)
    assert st.uri == "runs/r1"
    assert st.path("payload", "m.parquet") == os.path.join(st.root, "payload", "m.parquet")
    child = st.child("payload")
    assert (child.uri, child.root) == (os.path.join("runs/r1", "payload"),
                                       os.path.join(st.root, "payload"))
    assert Storage("~/x").root == os.path.join(os.path.expanduser("~"), "x")


def test_local_read_write_list_remove(tmp_path):
    st = Storage(str(tmp_path / "loc"))
    st.makedirs("gen-a")
    st.write_bytes("gen-a/g.bin", b"abc")
    st.write_bytes("state.json", b"{}")
    assert st.exists("gen-a/g.bin") and st.read_bytes("gen-a/g.bin") == b"abc"
    assert sorted(st.ls()) == ["gen-a", "state.json"]
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/loc/missing.bin does not exist"):
        st.read_bytes("missing.bin")
    st.rm("gen-a")
    assert st.ls() == ["state.json"]
    st.rm()
    assert not st.exists()


def test_s3_round_trip_with_credentials_from_env(s3_bucket):
    """Only the endpoint is explicit: botocore finds the keys in the environment itself, and
    the Arrow filesystem reads what s3fs wrote."""
    st = Storage(f"{s3_bucket.uri}/loc", {"endpoint_url": s3_bucket.server.endpoint_url})
    st.write_bytes("a/b.bin", b"payload")
    assert st.child("a").read_bytes("b.bin") == b"payload"
    assert st.ls() == ["a"]
    with st.arrow.open_input_stream(st.path("a", "b.bin")) as f:
        assert f.read() == b"payload"
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket.uri}/loc/nope"):
        st.read_bytes("nope")


def test_an_object_replaced_while_read_is_read_whole_on_s3(s3_bucket):
    """A lease renewed by its heartbeat while its holder reads it: the read returns one whole
    version, never s3fs's PreconditionFailed (a buffered reader HEADs, then GETs If-Match)."""
    import threading

    from engram_ray.io.storage import Storage

    where = Storage(f"{s3_bucket.uri}/_leases/r", s3_bucket.storage_options)
    bodies = [b'{"v": %d, "pad": "%s"}' % (i, b"x" * 200) for i in range(2)]
    where.write_bytes("", bodies[0])
    stop = threading.Event()

    def renew():
        i = 0
        while not stop.is_set():
            where.write_bytes("", bodies[i % 2])
            i += 1

    writer = threading.Thread(target=renew)
    writer.start()
    try:
        got = {where.read_bytes() for _ in range(60)}
    finally:
        stop.set()
        writer.join()
    assert got <= set(bodies)
