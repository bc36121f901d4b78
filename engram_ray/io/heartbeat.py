"""Keeping a held lease alive: a heartbeat that renews it while its holder works.

A lease (``io/lease.py``) expires ``timeout_s`` after it was taken unless renewed, so that a
holder lost with its host frees it soon (a holder that died on the taker's own host is seen at
once: :func:`engram_ray.io.lease.holder_gone`). Short timeouts need a renewal that never
misses: :class:`Heartbeat` renews from a daemon thread every quarter of the timeout, so three
beats in a row can be late before a live holder's lease expires.

Renewing rewrites the lease's body with a later ``expires`` if the body still carries the
holder's token, as a compare-and-swap: the check and the write are one step with respect to
anyone who breaks the lease and takes it. Without that, a renewal that checked "still ours",
then lost the race to a writer that broke the (expired) lease and took its own, wrote its
body over the other's lease, and both writers held the run.

- Locally, the check and the ``rename`` of a private file over the lease run under the
  lease's lock (:func:`engram_ray.io.lease.locked_local`), which every break and release of a
  local lease also takes: a breaker waits for the renewal to finish, then sees the renewed
  lease (and leaves a live one alone), and a renewal that comes after a break sees the lease
  gone or another's.
- On S3 (and S3-compatible stores: MinIO, moto's server) the body and its ETag are read with
  one GET and the new body is PUT with ``If-Match: <that ETag>``: a lease changed since the
  read (broken, retaken) answers 412 Precondition Failed, or 404 if it is gone, and nothing is
  written. A 412 that answers a retried PUT whose first try landed (its reply lost) is told
  apart by reading the lease again: it then holds exactly our new body.
- Other schemes (``gs://``, ``az://``, ``memory://``) keep the read, check, then one PUT: the
  window between the check and the write stays there (GCS's ``ifGenerationMatch`` and Azure's
  ``If-Match`` would close it, not done yet).

Breaking and releasing on S3 are the matching conditional delete (``DeleteObject`` with
``If-Match``, :func:`engram_ray.io.lease._remove_s3`), so a renewal landing between a breaker's
read and its delete is not deleted with the lease it replaced.

A renewal that finds the lease gone or someone else's marks the heartbeat
:attr:`~Heartbeat.lost`: the holder calls :meth:`Heartbeat.check` (which also reads the
lease then) before it publishes anything that needs the lease (a tick before it moves
``state.json`` on), so a holder that was stalled past its expiry and broken by another never
overwrites the other's work.

This is the same renewal as the run writer's (``io/store.py``), in a module of its own so
that anything holding a lease (a scheduled tick, an output writer) can use it.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

from engram_ray.io.lease import (
    _S3,
    Lease,
    LeaseHeld,
    _get_with_etag,  # shared with the S3 break and release (lease.py)
    _precondition_failed,
    _s3_knows,
    locked_local,
    parse_body,
)
from engram_ray.io.storage import StorageError

__all__ = ["Heartbeat", "renew"]


def _ours(body: dict | None, lease: Lease) -> dict | None:
    """``body`` if it carries our token (the lease is still ours), else None."""
    if not isinstance(body, dict) or lease.token is None or body.get("token") != lease.token:
        return None
    return body


def _our_body(lease: Lease) -> dict | None:
    """The lease's body if it carries our token (it is still ours), else None."""
    try:
        return _ours(json.loads(lease.storage.read_bytes()), lease)
    except (FileNotFoundError, ValueError):
        return None


def renew(lease: Lease) -> bool:
    """Push ``lease``'s expiry to ``timeout_s`` from now if it is still ours; False if it is
    gone or held by another (then nothing is written). The check and the write are one step
    locally and on S3 (module docstring)."""
    if not lease.storage.remote:
        return _renew_local(lease)
    if lease.storage.scheme in _S3:
        return _renew_s3(lease)
    body = _our_body(lease)  # gs, az, memory: read, check, then write (module docstring)
    if body is None:
        return False
    body["expires"] = time.time() + lease.timeout_s
    lease.storage.write_bytes("", json.dumps(body).encode())
    return True


def _renew_local(lease: Lease) -> bool:
    path = lease.storage.root
    with locked_local(path) as data:
        body = _ours(parse_body(data), lease) if data is not None else None
        if body is None:
            return False
        body["expires"] = time.time() + lease.timeout_s
        tmp = f"{path}.renew-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(json.dumps(body).encode())
        os.replace(tmp, path)  # still under the lock: nobody changed the lease since the check
        return True


def _renew_s3(lease: Lease) -> bool:
    storage = lease.storage
    fs = storage.fs
    bucket, key, _ = fs.split_path(storage.path())
    try:
        with storage.errors("renewing the lease"):
            data, etag = _get_with_etag(fs, bucket, key)
    except FileNotFoundError:
        return False
    body = _ours(parse_body(data), lease)
    if body is None:
        return False
    body["expires"] = time.time() + lease.timeout_s
    new = json.dumps(body).encode()
    if not _s3_knows("PutObject", "IfMatch"):
        # botocore predates conditional writes (Nov 2024) and s3fs would drop IfMatch without a
        # word: an unconditional write, with the read-check-write window this function closes
        # on newer clients.
        storage.write_bytes("", new)
        return True
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=new, IfMatch=etag)
    except FileNotFoundError:
        return False  # removed since our read (If-Match on a missing key answers 404)
    except Exception as e:
        if not _precondition_failed(e):
            raise StorageError(f"renewing the lease {storage.uri} failed: {e}") from e
        try:  # changed since our read, or our own retried PUT answered after the first landed
            return storage.read_bytes() == new
        except FileNotFoundError:
            return False
    fs.invalidate_cache(storage.path())
    return True


class Heartbeat:
    """Renews ``lease`` every ``interval_s`` (default: a quarter of its timeout) from a daemon
    thread until :meth:`stop`; a context manager. A renewal that fails on storage is retried
    at the next beat; one that finds the lease no longer ours sets :attr:`lost`."""

    def __init__(self, lease: Lease, interval_s: float | None = None) -> None:
        self.lease = lease
        self.interval_s = lease.timeout_s / 4 if interval_s is None else float(interval_s)
        self.lost = threading.Event()
        self.beats = 0  # renewals written (for tests and logs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"engram-heartbeat {lease.uri}")

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if renew(self.lease):
                    self.beats += 1
                elif not self._stop.is_set():
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - storage briefly unreachable: next beat
                pass

    def check(self) -> None:
        """Raise :class:`LeaseHeld` if the lease was lost (broken and maybe retaken): seen by
        a renewal, or now, reading the lease (one small read, at the holder's publish points)."""
        if self.lost.is_set() or _our_body(self.lease) is None:
            self.lost.set()
            raise LeaseHeld(f"lost the lease {self.lease.uri} while working (it expired or was "
                            "broken, and may be held by another): nothing more is published")

    def stop(self) -> None:
        """Stop renewing; waits for a renewal in flight, which would otherwise land after the
        holder's release and bring the lease back."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(30.0, self.interval_s))

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
