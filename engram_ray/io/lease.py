"""Exclusive leases on storage: one writer at a time, on every backend that has an exclusive
create, and a crashed writer's lease broken as soon as it is provably gone.

A lease is one small JSON object created *exclusively*: locally with ``link`` of a private
file (fails if the name exists, atomically; ``O_CREAT | O_EXCL`` where there are no hard
links), on S3 with a conditional PUT (``If-None-Match: *``, s3fs ``pipe_file(mode="create")``;
S3 has honoured it since 2024, and MinIO and moto's server do too), on GCS with
``ifGenerationMatch=0`` (gcsfs ``mode="create"``), on Azure with ``If-None-Match: *`` (adlfs
``overwrite=False``), and on ``memory://`` (one process's store) under an in-process lock.
Other schemes (``hf://``, ``http(s)://``, ``sftp://``…) have no create-if-absent that
engram-ray can rely on, so a lease there is refused, naming the scheme and why
(:data:`engram_ray.uris.EXCLUSIVE_CREATE` is the list).

The body names the holder (host, pid, and the process's identity: boot id, PID namespace and
start time) and when it expires, so a second writer fails at once with a message naming who
holds it. The body is in place the moment the lease exists: locally it is written to a private
temporary file first and hard-linked to the lease's name, because a file created with
``O_EXCL`` and written afterwards is empty for a moment, and a second taker reading it then
would take a live holder's lease for a crashed one's and break it (two writers of one run;
seen under load). An unreadable lease is a crashed holder's half-written one only once it is
:data:`UNREADABLE_GRACE_S` old.

A holder that dies leaves its lease behind. It is broken

- at once when the holder ran on this host (same host name, boot id and PID namespace, so the
  PID means the same process) and that process is gone: no such PID, a zombie, or a PID reused
  by a process that started at another time. A ``kill -9``'d job rerun on its node resumes
  immediately;
- else once it expired: ``timeout_s`` (:data:`DEFAULT_TIMEOUT_S`, 60 s) after it was taken or
  last renewed; a live holder renews it every quarter of that (``io/store.py``'s heartbeat),
  so a live lease never expires and a dead one on another host frees within a minute;
- or by an explicit :meth:`Lease.break_` (CLI: the documented ``--break-lease``).

Breaking re-reads the body and removes it only if it is still the one judged gone (a renewal
in between keeps it); two breakers racing on the same lease then both try the exclusive create,
and exactly one wins. Releasing removes the lease only if it still carries the holder's token
(one broken and retaken by another stays).

Locally, every change of an existing lease (a break, a release, a renewal by
``io/heartbeat.py``) happens while holding an exclusive ``flock`` on the file the lease's name
names at that moment, and only after checking that the name still names that file
(:func:`locked_local`). A create needs no lock: it only succeeds where no lease is. So between
a renewal's check "the lease is still ours" and its ``rename``, no breaker can remove the lease
and no other writer can take it (the renewal is a compare-and-swap), and a breaker's "still the
one judged gone" holds until its ``unlink``. Why the lease file itself and not a sidecar
``<lease>.lock``: a sidecar would outlive every lease (it cannot be removed safely while
another process may be waiting on it) and litter ``_leases/``. A holder that dies while holding
the lock releases it with its last file descriptor (the kernel does), so a crash never wedges a
lease. Where ``flock`` is missing (Windows) or refused by the filesystem (``ENOLCK``: some NFS
setups), the same steps run unlocked: the previous check-then-act, with its small window.

On S3 (s3/s3a) a break or a release reads the lease's body and its ETag with one GET, judges
the body, and deletes with ``DeleteObject`` ``If-Match: <that ETag>`` (:func:`_remove_s3`), so
the judged body and the deleted one are the same version. Without the condition, a renewal, or
a retake by another writer, landing between the read and the delete was deleted: a holder then
lost a live lease (it saw so at its next renewal or check, so there were never two holders, but
its work stopped), and a release deleted another writer's lease. A 412 (the lease changed since
the read) makes it read and judge again: a lease retaken by another is then not ours to release,
a renewed one is no longer the one judged gone (the break gives up, and the taker reports
:class:`LeaseHeld` as for any live lease); a 404 means it is gone already. The residual window:
a server that refuses ``If-Match`` on ``DeleteObject`` (``NotImplemented``/501: some
S3-compatible stores), or a botocore too old to send it (s3fs would drop the parameter
silently), gets the previous unconditional delete after the check, and a server that ignores the
header deletes unconditionally without saying so. ``gs://``, ``az://`` and ``memory://`` keep
read, check, then delete (GCS's ``ifGenerationMatch`` and Azure's ``If-Match`` would close it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator

from engram_ray.io.storage import Storage, StorageError
from engram_ray.uris import EXCLUSIVE_CREATE, UnsupportedScheme

__all__ = ["DEFAULT_TIMEOUT_S", "UNREADABLE_GRACE_S", "Lease", "LeaseHeld", "holder_gone",
           "locked_local", "parse_body", "process_identity"]

# An unreadable lease younger than this may still be being written (a filesystem without hard
# links, or a lease from a version that wrote after creating): it is live until then. Far
# longer than any write of ~150 bytes, far shorter than a lease's own timeout.
UNREADABLE_GRACE_S = 30.0
# A lease's life without renewal: short, so that a holder lost with its host frees the lease
# within a minute; the holder's heartbeat renews it every timeout/4 (15 s).
DEFAULT_TIMEOUT_S = 60.0
_MEMORY_LOCK = threading.Lock()  # memory:// lives in this process: a lock makes create exclusive
_S3 = ("s3", "s3a")
# Reads and conditional deletes of one S3 lease before a break or release gives up: each retry
# follows a 412, i.e. a change of the lease since its read, and a live lease changes once per
# renewal (every timeout/4), so more than one retry in a row means something is wrong.
_S3_REMOVE_TRIES = 3

try:
    import fcntl
except ImportError:  # Windows: local leases are changed unlocked (module docstring)
    fcntl = None  # type: ignore[assignment]


class LeaseHeld(RuntimeError):
    """Someone else holds the lease; the message names the holder and the way out."""


class Lease:
    """The lease object at ``storage`` (its URI is the lease's name)."""

    def __init__(self, storage: Storage, timeout_s: float = DEFAULT_TIMEOUT_S,
                 what: str = "") -> None:
        self.storage, self.timeout_s, self.what = storage, float(timeout_s), what
        self.token: str | None = None

    @property
    def uri(self) -> str:
        return self.storage.uri

    def acquire(self) -> Lease:
        """Take the lease, breaking an expired one or one whose holder is provably gone; raise
        :class:`LeaseHeld` if it is live."""
        _check_exclusive(self.storage)
        # Three rounds: a lease renewed between our judging it and our removing it is judged
        # again (live now: refused; still expired: broken at the next round).
        for _ in range(3):
            if self._create():
                return self
            body = self._read()
            if body is None:
                continue  # released between our create and our read: try again
            if not body and self._age() < UNREADABLE_GRACE_S:
                raise LeaseHeld(f"{self.what or self.uri} is being locked by another writer "
                                f"(lease {self.uri} is being written); try again")
            gone = holder_gone(body)
            if body and body.get("expires", 0) > time.time() and not gone:
                raise LeaseHeld(
                    f"{self.what or self.uri} is locked by {body.get('holder', '?')} since "
                    f"{_when(body.get('created'))} (lease {self.uri}, expires "
                    f"{_when(body.get('expires'))} unless renewed); wait, or break the lease "
                    "if that holder is gone")
            if gone:
                print(f"[engram-ray] lease {self.uri}: its holder {body.get('holder', '?')} "
                      "is gone (its process on this host has ended): taking it over",
                      file=sys.stderr)
            self._remove_if(lambda now, judged=body: now == judged)  # expired or holder gone
        raise LeaseHeld(f"{self.uri}: another writer took the lease while it was broken")

    def release(self) -> None:
        """Give the lease back (only ours: a lease broken and retaken by another stays)."""
        if self.token is not None:
            self._remove_if(lambda now, token=self.token: now.get("token") == token)
            self.token = None

    def break_(self) -> None:
        """Remove the lease whoever holds it (the documented way out after a crash)."""
        self._remove_if(lambda now: True)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        token = secrets.token_hex(8)
        now = time.time()
        host, pid = socket.gethostname(), os.getpid()
        body = json.dumps({"holder": f"{host} pid {pid}", "host": host, "pid": pid,
                           **process_identity(pid), "created": now,
                           "expires": now + self.timeout_s, "token": token}).encode()
        try:
            _create_object(self.storage, body, token)
        except FileExistsError:
            return False
        except Exception as e:  # a backend's "precondition failed" / "already exists"
            if not _is_conflict(e):
                raise
            return False
        self.token = token
        return True

    def _read(self) -> dict | None:
        try:
            return parse_body(self.storage.read_bytes())
        except FileNotFoundError:
            return None

    def _age(self) -> float:
        """Seconds since the lease object was last written (0 when unknown: treated as new)."""
        try:
            info = self.storage.fs.info(self.storage.path())
        except FileNotFoundError:
            return float("inf")
        when = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated",
                                       "created") if info.get(k)), None)
        if isinstance(when, str):
            from datetime import datetime

            try:
                when = datetime.fromisoformat(when.replace("Z", "+00:00"))
            except ValueError:
                return 0.0
        if hasattr(when, "timestamp"):
            when = when.timestamp()
        return time.time() - float(when) if when else 0.0

    def _remove_if(self, same) -> None:
        """Remove the lease if ``same(its body now)``; locally under the lease's lock, on S3
        with a delete conditional on the ETag of the body judged, so that nothing changes it
        between that read and the removal (module docstring)."""
        if self.storage.scheme in _S3:
            _remove_s3(self.storage, same)
            return
        if self.storage.remote:  # gs, az, memory: read, check, then delete (module docstring)
            body = self._read()
            if body is not None and same(body):
                self.storage.rm()
            return
        with locked_local(self.storage.root) as data:
            if data is not None and same(parse_body(data)):
                with self.storage.errors("removing"), contextlib.suppress(FileNotFoundError):
                    os.unlink(self.storage.root)


def _remove_s3(storage: Storage, same) -> None:
    """Delete the S3 lease at ``storage`` if ``same(its body)``, with ``If-Match`` on the ETag
    of that very body: a lease renewed or retaken since the read is not deleted (412) but read
    and judged again. Gone already (404, on the read or the delete): nothing to do."""
    fs = storage.fs
    bucket, key, _ = fs.split_path(storage.path())
    try:
        for _ in range(_S3_REMOVE_TRIES):
            try:
                with storage.errors("reading the lease"):
                    data, etag = _get_with_etag(fs, bucket, key)
            except FileNotFoundError:
                return
            if not same(parse_body(data)):
                return  # not ours (release), or no longer the body judged gone (break)
            if not _s3_knows("DeleteObject", "IfMatch"):
                # botocore predates conditional deletes, and s3fs would drop IfMatch without a
                # word: the unconditional delete after the check (module docstring: the window).
                with contextlib.suppress(FileNotFoundError):  # gone meanwhile: fine
                    storage.rm()
                return
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
                return
            except FileNotFoundError:
                return  # removed since our read (or our own retried delete's first try landed)
            except Exception as e:
                if _precondition_failed(e):
                    continue  # changed since our read: judge the lease as it is now
                if not _not_implemented(e):
                    raise StorageError(f"removing the lease {storage.uri} failed: {e}") from e
                # This server refuses If-Match on DeleteObject (some S3-compatible stores): the
                # unconditional delete, right after the check. The residual window is between
                # the GET above and this delete (module docstring).
                with contextlib.suppress(FileNotFoundError):  # gone meanwhile: fine
                    storage.rm()
                return
    finally:
        fs.invalidate_cache(storage.path())


def _get_with_etag(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """The object's bytes and the ETag of that very version: one GET (a HEAD then a GET could
    pair one version's ETag with another's body)."""
    from fsspec.asyn import sync

    async def get():
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def _error_codes(e: BaseException) -> Iterator[tuple[str | None, int | None]]:
    """(S3 error code, HTTP status) of ``e`` and of its cause: s3fs raises a ClientError as a
    plain OSError whose cause holds the response."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None) or {}
        yield (response.get("Error", {}).get("Code"),
               response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _precondition_failed(e: BaseException) -> bool:
    """True for S3's 412 PreconditionFailed (s3fs raises it as a plain OSError, EINVAL, whose
    cause is botocore's ClientError with the code)."""
    return (any(code == "PreconditionFailed" or status == 412 for code, status in _error_codes(e))
            or any("PreconditionFailed" in str(err or "") for err in (e, e.__cause__)))


def _not_implemented(e: BaseException) -> bool:
    """True for a server's "conditional delete not supported": ``NotImplemented`` or a 501 (s3fs
    raises an OSError, ENOSYS)."""
    return any(code == "NotImplemented" or status == 501 for code, status in _error_codes(e))


@functools.cache
def _s3_knows(operation: str, parameter: str) -> bool:
    """True if the installed botocore sends ``parameter`` with ``operation`` (s3fs filters out
    parameters the service model lacks, silently)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    return parameter in model.operation_model(operation).input_shape.members


def parse_body(data: bytes) -> dict:
    """A lease's body; ``{}`` when unreadable (a half-written lease of a crashed holder)."""
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


@contextlib.contextmanager
def locked_local(path: str) -> Iterator[bytes | None]:
    """Hold an exclusive ``flock`` on the local lease file ``path`` names, and yield its bytes
    (``None``, and no lock, when there is no lease). While the block runs, nobody else who goes
    through here changes or removes the lease, so the block may check the bytes and then
    replace (``os.replace``) or remove the lease as one step (module docstring: why).

    The lock is on the file, and a lease is replaced by renaming a new file over it or removed
    and taken anew: a waiter may be granted the lock on a file the name no longer names. It then
    locks the file the name names now (or finds no lease). The lock goes with the descriptor: at
    the block's end, or when the process dies holding it."""
    while True:
        try:
            # Read-write where allowed: NFS emulates flock with POSIX locks, whose exclusive
            # lock needs a descriptor open for writing. Nothing is written through it.
            fd = os.open(path, os.O_RDWR)
        except PermissionError:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                yield None
                return
        except FileNotFoundError:
            yield None
            return
        try:
            if _flock(fd) and not _names(path, fd):
                continue  # replaced or removed while we waited: lock what is there now
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            yield b"".join(chunks)
            return
        finally:
            os.close(fd)  # releases the lock


def _flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` (blocking); False where there is none to take."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # ENOLCK, EBADF...: a filesystem without flock: unlocked, as before
        return False
    return True


def _names(path: str, fd: int) -> bool:
    """True if ``path`` names the file open as ``fd``."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _check_exclusive(storage: Storage) -> None:
    """Refuse a lease on a backend without an exclusive create, saying why."""
    if storage.scheme not in EXCLUSIVE_CREATE:
        raise UnsupportedScheme(
            f"{storage.uri}: {storage.scheme}:// has no exclusive create (create-if-absent) "
            "that engram-ray can rely on, so a lease there could not keep a second writer out "
            "and writing there is refused; write runs and outputs to a local path or to "
            f"{', '.join(s + '://' for s in sorted(EXCLUSIVE_CREATE) if s != 'file')}")


def _create_object(storage: Storage, body: bytes, token: str) -> None:
    """Create the lease object holding ``body`` in one exclusive step, or raise
    ``FileExistsError`` (or the backend's precondition error) if it exists."""
    scheme, path = storage.scheme, storage.path()
    if scheme == "file":
        _create_local(storage.root, body, token)
    elif scheme in ("az", "abfs", "abfss"):
        storage.fs.pipe_file(path, body, overwrite=False)  # the SDK's If-None-Match: *
    elif scheme == "memory":
        with _MEMORY_LOCK:
            if storage.fs.exists(path):
                raise FileExistsError(path)
            storage.fs.pipe_file(path, body)
    else:  # s3 (If-None-Match: *), gs (ifGenerationMatch=0)
        storage.fs.pipe_file(path, body, mode="create")


def _is_conflict(e: BaseException) -> bool:
    """True for a backend's answer "the object already exists" to a conditional create: S3's
    412 Precondition Failed (s3fs raises an OSError), GCS's 412, Azure's 409/412
    (``ResourceExistsError``, ``ResourceModifiedError``)."""
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in ("Precondition", "412", "ResourceExistsError",
                                   "ResourceModifiedError", "BlobAlreadyExists",
                                   "ConditionNotMet"))


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


def _read_first(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from ``/proc``, or None."""
    raw = _read_first(f"/proc/{pid}/stat")
    if raw is None:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces
    return (fields[0], fields[19]) if len(fields) > 19 else None


def process_identity(pid: int) -> dict[str, str]:
    """What makes ``pid`` one process on this host, where the OS tells (Linux ``/proc``):
    the boot id, the PID namespace and the process's start time (absent keys: unknown)."""
    out = {"boot": _read_first("/proc/sys/kernel/random/boot_id")}
    try:
        out["pidns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    stat = _proc_stat(pid)
    out["start"] = stat[1] if stat else None
    return {k: v for k, v in out.items() if v}


def holder_gone(body: dict) -> bool:
    """True only when the lease's holder provably no longer runs: it ran on this host (same
    host name, boot id and PID namespace where recorded, so its PID names the same process
    table) and its PID is gone, a zombie, or now another process (another start time)."""
    pid = body.get("pid")
    if body.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    here = process_identity(pid)
    if any(body.get(k) and here.get(k) and body[k] != here[k] for k in ("boot", "pidns")):
        return False  # another kernel or PID namespace under the same host name: can't tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return False
    return stat[0] in ("Z", "X") or bool(body.get("start") and body["start"] != stat[1])


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "?"
