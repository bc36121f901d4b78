"""On S3 a lease's break and release delete it only if it is still the version they judged
(``DeleteObject`` with ``If-Match`` on the ETag of the body read), so a renewal or a retake
landing between their read and their delete is never deleted. On the loopback S3 server
(moto's, which honours ``If-Match`` on ``DeleteObject``).

Deterministic: the other party (a renewal, another writer) is run at the moment the delete is
about to be sent, after the remover's read and judgement, not raced against a clock. The hook
catches the delete whichever way it goes: ``delete_object`` through ``call_s3`` (the
conditional delete) or ``fs.rm`` (the unconditional delete it replaces, and its fallback).
"""

from __future__ import annotations

import json

import pytest

from engram_ray.io.heartbeat import renew
from engram_ray.io.lease import Lease, LeaseHeld
from engram_ray.io.storage import Storage, StorageError


@pytest.fixture
def where(s3_bucket):
    return Storage(f"{s3_bucket.uri}/_leases/r", s3_bucket.storage_options)


def _at_delete(monkeypatch, where: Storage, step) -> list:
    """Run ``step`` once, when the first delete of the lease is about to be sent; deletes that
    ``step`` itself sends go through untouched. Returns a list that is non-empty once it ran."""
    fs, ran = where.fs, []
    real_call, real_rm = fs.call_s3, fs.rm

    def once():
        if not ran:
            ran.append(True)
            step()

    def call_s3(method, *a, **kw):
        if method in ("delete_object", "delete_objects"):
            once()
        return real_call(method, *a, **kw)

    def rm(*a, **kw):
        once()
        return real_rm(*a, **kw)

    monkeypatch.setattr(fs, "call_s3", call_s3)
    monkeypatch.setattr(fs, "rm", rm)
    return ran


def _token(where: Storage) -> str:
    return json.loads(where.read_bytes())["token"]


@pytest.mark.parametrize("how", ["break", "expired"])
def test_release_never_deletes_a_lease_retaken_meanwhile(where, monkeypatch, how):
    """Our release read the lease (still ours); before its delete, writer B breaks it (the
    explicit way out, or finding it expired) and takes its own. Before: the unconditional delete
    removed B's lease, and a third writer could take the run while B works. Now the delete is
    answered 412, the lease is read again, is not ours, and stays B's."""
    ours = Lease(where, timeout_s=60 if how == "break" else 0.0).acquire()
    other = Lease(where, timeout_s=60)

    def retake():
        if how == "break":
            other.break_()
        other.acquire()

    ran = _at_delete(monkeypatch, where, retake)
    ours.release()
    assert ran and other.token is not None
    assert _token(where) == other.token  # B's lease is intact
    assert renew(other) is True and ours.token is None


def test_break_of_an_expired_lease_renewed_meanwhile_gives_up(where, monkeypatch):
    """B judged the lease expired (its holder stalled); the holder's renewal lands between B's
    read and B's delete. Before: B deleted the renewed, live lease and took the run (the holder
    learnt it at its next renewal). Now B's delete is answered 412, the lease read again is no
    longer the one judged gone, and B is refused as for any live lease."""
    ours = Lease(where, timeout_s=0.0).acquire()  # expired: the holder stalled
    ours.timeout_s = 60.0  # its renewal makes it live again
    renewed = []
    ran = _at_delete(monkeypatch, where, lambda: renewed.append(renew(ours)))
    other = Lease(where, timeout_s=60)
    with pytest.raises(LeaseHeld, match="is locked by"):
        other.acquire()
    assert ran and renewed == [True]
    assert other.token is None and _token(where) == ours.token
    assert renew(ours) is True  # the holder keeps its lease


def test_release_after_its_own_late_renewal_still_releases(where, monkeypatch):
    """A 412 is judged again, not taken for "not ours": a renewal of our own lease landing
    between the release's read and its delete leaves the lease ours, and it is released (else
    it would hold the run until it expired)."""
    ours = Lease(where, timeout_s=60).acquire()
    renewed = []
    ran = _at_delete(monkeypatch, where, lambda: renewed.append(renew(ours)))
    ours.release()
    assert ran and renewed == [True]
    assert not where.exists()


def test_explicit_break_removes_a_lease_renewed_meanwhile(where, monkeypatch):
    """``break_`` removes the lease whoever holds it: a renewal between its read and its delete
    makes it read and delete again, not give up."""
    ours = Lease(where, timeout_s=60).acquire()
    ran = _at_delete(monkeypatch, where, lambda: renew(ours))
    Lease(where).break_()
    assert ran and not where.exists()
    assert renew(ours) is False


def test_release_of_a_lease_removed_meanwhile_is_quiet(where, monkeypatch, s3_bucket):
    """The lease is gone between the read and the delete (404 to ``If-Match``): nothing to do."""
    ours = Lease(where, timeout_s=60).acquire()
    ran = _at_delete(monkeypatch, where,
                     lambda: s3_bucket.client.delete_object(Bucket=s3_bucket.name,
                                                            Key="_leases/r"))
    ours.release()
    assert ran and not where.exists() and ours.token is None


def test_server_without_conditional_delete_falls_back_to_the_plain_delete(where, monkeypatch):
    """A server answering ``NotImplemented`` (501) to ``If-Match`` on ``DeleteObject`` gets
    the unconditional delete after the check (the documented residual window)."""
    from botocore.exceptions import ClientError

    ours = Lease(where, timeout_s=60).acquire()
    fs = where.fs
    real = fs.call_s3

    def call_s3(method, *a, **kw):
        if method == "delete_object" and "IfMatch" in kw:
            err = OSError(38, "A header you provided implies functionality that is not "
                              "implemented")
            err.__cause__ = ClientError({"Error": {"Code": "NotImplemented"},
                                         "ResponseMetadata": {"HTTPStatusCode": 501}},
                                        "DeleteObject")
            raise err
        return real(method, *a, **kw)

    monkeypatch.setattr(fs, "call_s3", call_s3)
    ours.release()
    assert not where.exists()


def test_other_s3_errors_on_the_delete_are_reported(where, monkeypatch):
    """Anything else (access denied, a server error after s3fs's retries) is a StorageError
    naming the lease, not taken for "changed" or "gone"."""
    from botocore.exceptions import ClientError

    ours = Lease(where, timeout_s=60).acquire()
    fs = where.fs
    real = fs.call_s3

    def call_s3(method, *a, **kw):
        if method == "delete_object":
            err = OSError(5, "We encountered an internal error")
            err.__cause__ = ClientError({"Error": {"Code": "InternalError"},
                                         "ResponseMetadata": {"HTTPStatusCode": 500}},
                                        "DeleteObject")
            raise err
        return real(method, *a, **kw)

    monkeypatch.setattr(fs, "call_s3", call_s3)
    with pytest.raises(StorageError, match="removing the lease"):
        ours.release()
    monkeypatch.undo()
    assert _token(where) == ours.token
