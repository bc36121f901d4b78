"""Exclusive leases on storage: one writer at a time, on local disk and on S3.

A lease is one small JSON object created *exclusively*: locally with ``O_CREAT | O_EXCL`` (the
create fails if the file exists, atomically), on S3 with a conditional PUT
(``If-None-Match: *``, s3fs ``pipe_file(mode="create")``; S3 has honoured it since 2024, and
MinIO and moto's server do too). The body names the holder (host, pid, time) and when it
expires, so a second writer fails at once with a message naming who holds it.

The body is in place the moment the lease exists: locally it is written to a private temporary
file first and hard-linked to the lease's name (the link fails if the name exists), because a
file created with ``O_EXCL`` and written afterwards is empty for a moment, and a second taker
reading it then would take a live holder's lease for a crashed one's and break it (two
writers of one run; seen under load). An unreadable lease is a crashed holder's half-written
one only once it is :data:`UNREADABLE_GRACE_S` old.

A holder that dies leaves its lease behind. It can be broken only after it expired
(``timeout_s`` after it was taken; a live holder renews it) or by an explicit
:meth:`Lease.break_` (CLI: the documented ``--break-lease``). Breaking re-reads the body and
removes it only if it is still the expired one; two breakers racing on the same expired lease
then both try the exclusive create, and exactly one wins.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

from engram_ray.io.storage import Storage

__all__ = ["UNREADABLE_GRACE_S", "Lease", "LeaseHeld"]

# An unreadable lease younger than this may still be being written (a filesystem without hard
# links, or a lease from a version that wrote after creating): it is live until then. Far
# longer than any write of ~150 bytes, far shorter than a lease's own timeout.
UNREADABLE_GRACE_S = 30.0


class LeaseHeld(RuntimeError):
    """Someone else holds the lease; the message names the holder and the way out."""


class Lease:
    """The lease object at ``storage`` (its URI is the lease's name)."""

    def __init__(self, storage: Storage, timeout_s: float = 3600.0, what: str = "") -> None:
        self.storage, self.timeout_s, self.what = storage, float(timeout_s), what
        self.token: str | None = None

    @property
    def uri(self) -> str:
        return self.storage.uri

    def acquire(self) -> Lease:
        """Take the lease, breaking an expired one; raise :class:`LeaseHeld` if it is live."""
        for _ in range(2):
            if self._create():
                return self
            body = self._read()
            if body is None:
                continue  # released between our create and our read: try again
            if not body and self._age() < UNREADABLE_GRACE_S:
                raise LeaseHeld(f"{self.what or self.uri} is being locked by another writer "
                                f"(lease {self.uri} is being written); try again")
            if body.get("expires", 0) > time.time():
                raise LeaseHeld(
                    f"{self.what or self.uri} is locked by {body.get('holder', '?')} since "
                    f"{_when(body.get('created'))} (lease {self.uri}, expires "
                    f"{_when(body.get('expires'))}); wait, or break the lease if that holder "
                    "is gone")
            self._remove_if(body.get("token"))  # expired: a crashed holder's
        raise LeaseHeld(f"{self.uri}: another writer took the lease while it was broken")

    def release(self) -> None:
        """Give the lease back (only ours: a lease broken and retaken by another stays)."""
        if self.token is not None:
            self._remove_if(self.token)
            self.token = None

    def break_(self) -> None:
        """Remove the lease whoever holds it (the documented way out after a crash)."""
        if self.storage.exists():
            self.storage.rm()

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        token = secrets.token_hex(8)
        now = time.time()
        body = json.dumps({"holder": f"{socket.gethostname()} pid {os.getpid()}",
                           "created": now, "expires": now + self.timeout_s,
                           "token": token}).encode()
        try:
            if self.storage.remote:
                self.storage.fs.pipe_file(self.storage.path(), body, mode="create")
            else:
                _create_local(self.storage.root, body, token)
        except FileExistsError:
            return False
        except OSError as e:  # s3fs maps 412 Precondition Failed to an OSError subclass
            if "Precondition" not in str(e) and "412" not in str(e):
                raise
            return False
        self.token = token
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: a half-written lease of a crashed holder: expired

    def _age(self) -> float:
        """Seconds since the lease object was last written (0 when unknown: treated as new)."""
        try:
            info = self.storage.fs.info(self.storage.path())
        except FileNotFoundError:
            return float("inf")
        when = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if hasattr(when, "timestamp"):
            when = when.timestamp()
        return time.time() - float(when) if when else 0.0

    def _remove_if(self, token: str | None) -> None:
        body = self._read()
        if body is not None and body.get("token") == token:
            self.storage.rm()


def _create_local(path: str, body: bytes, token: str) -> None:
    """Create ``path`` holding ``body`` atomically, or raise ``FileExistsError``: the body goes
    to a private file that is then hard-linked to ``path`` (``link`` never replaces a name)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{token}.tmp"
    with open(tmp, "wb") as f:
        f.write(body)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # No hard links here (some FUSE/SMB mounts): exclusive create, then write; a reader
        # meanwhile sees an unreadable lease and waits out UNREADABLE_GRACE_S.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
    finally:
        os.unlink(tmp)


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "?"
