"""Keeping a held lease alive: a heartbeat that renews it while its holder works.

A lease (``io/lease.py``) expires ``timeout_s`` after it was taken unless renewed, so that a
holder lost with its host frees it soon (a holder that died on the taker's own host is seen at
once: :func:`engram_ray.io.lease.holder_gone`). Short timeouts need a renewal that never
misses: :class:`Heartbeat` renews from a daemon thread every quarter of the timeout, so three
beats in a row can be late before a live holder's lease expires.

Renewing rewrites the lease's body with a later ``expires`` if the body still carries the
holder's token (locally a private file renamed over it, on object stores one PUT, both
atomic). A renewal that finds the lease gone or someone else's marks the heartbeat
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

from engram_ray.io.lease import Lease, LeaseHeld

__all__ = ["Heartbeat", "renew"]


def _our_body(lease: Lease) -> dict | None:
    """The lease's body if it carries our token (it is still ours), else None."""
    try:
        body = json.loads(lease.storage.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(body, dict) or lease.token is None or body.get("token") != lease.token:
        return None
    return body


def renew(lease: Lease) -> bool:
    """Push ``lease``'s expiry to ``timeout_s`` from now if it is still ours; False if it is
    gone or held by another (then nothing is written)."""
    local = not lease.storage.remote
    body = _our_body(lease)
    if body is None:
        return False
    body["expires"] = time.time() + lease.timeout_s
    data = json.dumps(body).encode()
    if not local:
        lease.storage.write_bytes("", data)
        return True
    tmp = f"{lease.storage.root}.renew-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(data)
    # The lease must still be ours right before the rename: a writer that broke it and took
    # its own meanwhile would otherwise be overwritten by this renewal, and two writers would
    # both hold the run. Reading it again here shrinks that window from the whole
    # read-and-write to the rename itself.
    if _our_body(lease) is None:
        os.remove(tmp)
        return False
    os.replace(tmp, lease.storage.root)
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
