"""A stall watchdog: a run whose rows stop moving fails with a diagnostic, never hangs forever.

The schedulability check (``resources.py``) catches configs that can never run; what it cannot
see (a node that left, resources taken by another job, a read task stuck on storage) shows up
as no progress. The driver feeds :meth:`Watchdog.observe` the number of rows the stages have
seen; when it has not changed for ``timeout_s`` seconds, :meth:`Watchdog.check` raises
:class:`StallError` naming where the run is stuck and what Ray has pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

__all__ = ["StallError", "Watchdog", "pending_work"]


class StallError(RuntimeError):
    """No row moved for the configured time; the message says where and what is pending."""


class Watchdog:
    """Tracks the last time a progress counter changed (``clock`` is injectable for tests)."""

    def __init__(self, timeout_s: float | None, what: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.what, self.clock = timeout_s, what, clock
        self.last_value: object = None
        self.last_change = clock()

    def observe(self, value: object) -> None:
        if value != self.last_value:
            self.last_value, self.last_change = value, self.clock()

    def check(self, diagnose: Callable[[], str] = lambda: "") -> None:
        """Raise :class:`StallError` once nothing moved for ``timeout_s`` (``None``: never)."""
        if self.timeout_s is None:
            return
        idle = self.clock() - self.last_change
        if idle >= self.timeout_s:
            detail = diagnose()
            raise StallError(
                f"no progress for {idle:.0f}s while {self.what} (parallel.stall_timeout_s="
                f"{self.timeout_s:g}); nothing was committed" + (f"; {detail}" if detail else ""))


def pending_work() -> str:
    """What Ray has waiting for resources: actors pending creation and tasks pending
    scheduling, with what they ask for (best effort: the state API may be unavailable)."""
    try:
        from ray.util.state import list_actors, list_tasks

        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], limit=20,
                             raise_on_missing_output=False)
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], limit=20,
                           raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - a diagnostic must never mask the stall itself
        return f"(pending work unknown: {type(e).__name__})"
    parts = [f"{len(actors)} actor(s) pending creation"
             + (f" (e.g. {actors[0].class_name})" if actors else ""),
             f"{len(tasks)} task(s) waiting for a node"
             + (f" (e.g. {tasks[0].name})" if tasks else "")]
    resources = ray.available_resources()
    parts.append("available now: " + ", ".join(
        f"{k}={v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")))
    return "; ".join(parts)
