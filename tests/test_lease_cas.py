"""A lease's renewal is a compare-and-swap: a writer that breaks the lease and takes its own
between the renewal's check ("still ours") and its write is never overwritten, so two writers
never both hold a run. Locally and on the loopback S3 server (moto's, with ``If-Match``).

Deterministic: the other writer is run at the moment the renewal writes (a wrapped
``os.replace`` locally, the renewal's ``time.time`` on S3), not raced against a clock.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest

from engram_ray.io import heartbeat
from engram_ray.io.heartbeat import renew
from engram_ray.io.lease import Lease, LeaseHeld
from engram_ray.io.storage import Storage


class Interloper:
    """Another writer that breaks the lease (``how``: ``"break"``, the explicit way out, or
    ``"expired"``, an ordinary taker that finds it expired) and takes its own, run in a thread
    by :meth:`during`. :meth:`during` returns once that writer is done or is waiting on the
    lease's lock (where the renewal holds it), so the renewal then goes on."""

    def __init__(self, where: Storage, how: str) -> None:
        self.where, self.how = where, how
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.went = threading.Event()
        self.thread: threading.Thread | None = None

    def _take(self) -> None:
        try:
            lease = Lease(self.where, timeout_s=60)
            if self.how == "break":
                lease.break_()
            self.lease = lease.acquire()
        except BaseException as e:  # noqa: BLE001 - looked at by the test
            self.error = e
        finally:
            self.went.set()

    def during(self) -> None:
        if self.thread is None:  # once
            self.thread = threading.Thread(target=self._take, name="interloper")
            self.thread.start()
            assert self.went.wait(60), "the other writer neither finished nor waited on the lock"

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def waits_on_lock(monkeypatch):
    """``fcntl.flock`` marks the interloper as waiting on the lock when it asks for it."""
    real = fcntl.flock
    who: list[Interloper] = []

    def flock(fd, op):
        for it in who:
            if threading.current_thread() is it.thread:
                it.went.set()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    return who.append


def _token(where: Storage) -> str:
    return json.loads(where.read_bytes())["token"]


# ---------------------------------------------------------------- local

def _at_rename(monkeypatch, interloper: Interloper) -> None:
    """Run ``interloper`` when the renewal (this thread) renames its new body over the lease:
    after its check, right before its write."""
    real, me = os.replace, threading.current_thread()

    def replace(src, dst, *a, **k):
        if threading.current_thread() is me:
            interloper.during()
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("how", ["break", "expired"])
def test_local_renewal_never_overwrites_a_lease_taken_meanwhile(tmp_path, monkeypatch,
                                                                waits_on_lock, how):
    """The renewal checked the lease is ours; before its rename, another writer breaks it and
    takes its own. Before: the rename overwrote the other's lease and both held it. Now the
    breaker waits for the renewal, then breaks the renewed lease and holds it alone."""
    where = Storage(str(tmp_path / "_leases" / "r"))
    # "expired": a holder whose lease expired (timeout 0) and whose renewal came late
    ours = Lease(where, timeout_s=60 if how == "break" else 0.0).acquire()
    other = Interloper(where, how)
    waits_on_lock(other)
    _at_rename(monkeypatch, other)
    renew(ours)
    other.join()
    assert other.error is None and other.lease is not None
    assert _token(where) == other.lease.token  # the other's lease is intact: it alone holds it
    assert renew(ours) is False  # and our heartbeat now sees the lease lost
    assert _token(where) == other.lease.token
    assert sorted(os.listdir(tmp_path / "_leases")) == ["r"]  # no lock file, no temporary


def test_local_late_renewal_of_an_expired_lease_keeps_it(tmp_path, monkeypatch, waits_on_lock):
    """A taker judged the lease expired; the holder's renewal lands before the taker removes
    it. The taker must then see the renewed, live lease and be refused (before: it broke and
    took the lease in the renewal's window, and the renewal overwrote it: two holders)."""
    where = Storage(str(tmp_path / "_leases" / "r"))
    ours = Lease(where, timeout_s=0.0).acquire()  # expired: the holder stalled
    ours.timeout_s = 60.0  # its renewal makes it live again
    other = Interloper(where, "expired")
    waits_on_lock(other)
    _at_rename(monkeypatch, other)
    assert renew(ours) is True
    other.join()
    assert isinstance(other.error, LeaseHeld) and other.lease is None
    assert _token(where) == ours.token
    assert renew(ours) is True


def test_a_holder_that_dies_holding_the_lock_does_not_wedge_the_lease(tmp_path):
    """The kernel drops a flock with its holder: a process killed inside its renewal's critical
    section leaves the lease renewable and breakable."""
    where = Storage(str(tmp_path / "_leases" / "r"))
    ours = Lease(where, timeout_s=60).acquire()
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, where.root], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
    finally:
        proc.kill()
        proc.wait()
    assert renew(ours) is True
    ours.release()
    assert not where.exists()


# ---------------------------------------------------------------- S3 (moto's server)

@pytest.fixture
def s3_where(s3_bucket):
    return Storage(f"{s3_bucket.uri}/_leases/r", s3_bucket.storage_options)


def _at_new_expiry(monkeypatch, interloper: Interloper) -> None:
    """Run ``interloper`` when the renewal computes its new expiry (``heartbeat``'s
    ``time.time``): after its check, before its PUT."""
    real = time.time

    def now():
        interloper.during()
        return real()

    monkeypatch.setattr(heartbeat, "time", types.SimpleNamespace(time=now))


@pytest.mark.parametrize("how", ["break", "expired"])
def test_s3_renewal_never_overwrites_a_lease_taken_meanwhile(s3_where, monkeypatch, how):
    """Same race on S3: before, the renewal's PUT overwrote the other's lease (both held it);
    now it is a PUT ``If-Match`` the ETag it checked, answered 412: nothing written."""
    ours = Lease(s3_where, timeout_s=60 if how == "break" else 0.0).acquire()
    other = Interloper(s3_where, how)
    _at_new_expiry(monkeypatch, other)
    assert renew(ours) is False
    other.join()
    assert other.error is None and other.lease is not None
    assert _token(s3_where) == other.lease.token


def test_s3_renewal_moves_the_expiry_and_stops_at_release(s3_where):
    ours = Lease(s3_where, timeout_s=60).acquire()
    first = json.loads(s3_where.read_bytes())
    assert renew(ours) and renew(ours)  # each with the ETag of the body it read
    now = json.loads(s3_where.read_bytes())
    assert now["token"] == ours.token and now["expires"] > first["expires"]
    ours.release()
    assert renew(ours) is False
    assert not s3_where.exists()  # a renewal of a released lease writes nothing


def test_s3_renewal_whose_retried_put_meets_its_own_first_try(s3_where, monkeypatch):
    """A PUT that landed but whose reply was lost is retried and answered 412 (the ETag moved,
    to our own new body): the renewal succeeded, and says so."""
    from botocore.exceptions import ClientError

    ours = Lease(s3_where, timeout_s=60).acquire()
    fs = s3_where.fs
    real = fs.call_s3

    def call_s3(method, *a, **kw):
        out = real(method, *a, **kw)
        if method == "put_object":
            err = OSError(22, "At least one of the pre-conditions you specified did not hold")
            err.__cause__ = ClientError({"Error": {"Code": "PreconditionFailed"}}, "PutObject")
            raise err
        return out

    monkeypatch.setattr(fs, "call_s3", call_s3)
    assert renew(ours) is True
    monkeypatch.undo()
    assert _token(s3_where) == ours.token


def test_s3_renewal_with_a_botocore_without_conditional_puts_still_renews(s3_where,
                                                                           monkeypatch):
    """A botocore older than S3's conditional writes would have s3fs drop ``IfMatch`` without a
    word; the renewal then writes plainly (the old window) rather than pass a parameter that is
    silently ignored."""
    sent = []
    monkeypatch.setattr(heartbeat, "_s3_knows", lambda op, param: False)
    real = s3_where.fs.call_s3

    def spy(method, *args, **kwargs):
        sent.append((method, "IfMatch" in kwargs))
        return real(method, *args, **kwargs)

    monkeypatch.setattr(s3_where.fs, "call_s3", spy)
    ours = Lease(s3_where, timeout_s=60).acquire()
    first = json.loads(s3_where.read_bytes())
    assert renew(ours)
    assert json.loads(s3_where.read_bytes())["expires"] > first["expires"]
    assert ("put_object", True) not in sent
    ours.release()
