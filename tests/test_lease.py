"""Exclusive leases, on local disk and on the loopback S3 server: one holder at a time, a
second taker is refused naming the holder, an expired lease is broken, release is ours only."""

from __future__ import annotations

import json
import threading

import pytest

from engram_ray.io.lease import Lease, LeaseHeld
from engram_ray.io.storage import Storage


@pytest.fixture(params=["local", "s3", "memory"])
def where(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "q" / "_lease"))
    if request.param == "memory":
        return Storage(f"memory://{tmp_path.name}/q/_lease")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"{bucket.uri}/q/_lease", bucket.storage_options)


def test_one_holder_at_a_time_and_release(where):
    a = Lease(where, timeout_s=60).acquire()
    with pytest.raises(LeaseHeld, match=r"locked by .* pid \d+ since .*break the lease"):
        Lease(where, timeout_s=60).acquire()
    a.release()
    assert not where.exists()
    with Lease(where, timeout_s=60):
        assert json.loads(where.read_bytes())["holder"]


def test_expired_lease_of_a_crashed_holder_is_broken_and_release_is_ours_only(where):
    crashed = Lease(where, timeout_s=0.0).acquire()  # expires at once: a crashed holder
    b = Lease(where, timeout_s=60).acquire()
    crashed.release()  # a late release of a broken lease leaves the new holder's alone
    assert json.loads(where.read_bytes())["token"] == b.token
    Lease(where).break_()  # the explicit way out
    assert not where.exists()


def test_concurrent_takers_exactly_one_wins(where):
    wins, losses = [], []

    def take():
        try:
            wins.append(Lease(where, timeout_s=60).acquire())
        except LeaseHeld:
            losses.append(1)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5


def _plant(where, body: bytes) -> None:
    if not where.remote:
        where.fs.makedirs(where.fs._parent(where.path()), exist_ok=True)
    where.fs.pipe_file(where.path(), body)


def test_a_lease_being_written_is_not_broken(where):
    """A lease whose body is not there yet is live: a second taker reading it in that moment
    once took it for a crashed holder's and broke it (two writers of one run; seen as a
    concurrent-writers test failing under load). Only an old unreadable lease is broken."""
    _plant(where, b"")  # created, not yet written: the racy moment
    with pytest.raises(LeaseHeld, match="being locked by another writer"):
        Lease(where, timeout_s=60).acquire()
    assert where.read_bytes() == b""  # left alone


def test_an_old_unreadable_lease_is_broken(where, monkeypatch):
    from engram_ray.io import lease as lease_mod

    _plant(where, b"{half")  # a crashed holder's half-written lease
    monkeypatch.setattr(lease_mod, "UNREADABLE_GRACE_S", 0.0)
    b = Lease(where, timeout_s=60).acquire()
    assert json.loads(where.read_bytes())["token"] == b.token


def test_local_lease_appears_with_its_body(tmp_path, monkeypatch):
    """Locally the lease name never exists without its body: it is a hard link to a file
    written first, and the temporary file is gone afterwards."""
    import os as os_mod

    from engram_ray.io import lease as lease_mod

    seen = []
    real_link = os_mod.link

    def link(src, dst):
        seen.append(open(src, "rb").read())
        return real_link(src, dst)

    monkeypatch.setattr(lease_mod.os, "link", link)
    where = Storage(str(tmp_path / "q" / "_lease"))
    a = Lease(where, timeout_s=60).acquire()
    assert json.loads(seen[0])["token"] == a.token
    assert sorted(os_mod.listdir(tmp_path / "q")) == ["_lease"]
