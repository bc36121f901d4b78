"""Progress lines for the statistics pass: rows done, rates and an ETA, every N seconds.

Both drivers report through :class:`Progress` (the single-process engine after each batch, the
Ray executor from its polling loop), so a user reads the same line whichever path ran:

    [engram-ray] rows 600/1,200 (50%), 41.3 rows/s, 1,204 tok/s, ETA 0:15 | stage 0: …

The rate is taken from the first row on, not from the start of the run: start-up (Ray init,
actor and model loading) is a fixed cost that would otherwise make the ETA of a long stream
pessimistic for its whole first part. The ETA assumes the remaining rows go at the mean rate
so far (rows of one dataset are alike; a moving window would only add noise on short runs).
``interval_s`` (config ``parallel.progress_interval_s``) is how often a line is printed; None
prints none.
"""

from __future__ import annotations

import time
from typing import TextIO

from engram_ray.extraction import say

__all__ = ["Progress", "format_eta"]


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``: a duration as people read it on a progress line."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Rows of ``expected`` done so far, printed at most every ``interval_s`` seconds."""

    def __init__(self, expected: int | None, interval_s: float | None, log: TextIO | None,
                 clock=time.time) -> None:
        self.expected, self.interval_s, self.log, self.clock = expected, interval_s, log, clock
        self.t_first: float | None = None  # when rows were first seen: the rate's origin
        self.first = (0, 0)  # (rows, tokens) seen then: done before the clock started for them
        self.last = float("-inf")

    def due(self) -> bool:
        """Whether a line is wanted now (cheap: lets the caller skip gathering counters)."""
        return self.interval_s is not None and self.clock() - self.last >= self.interval_s

    def update(self, rows: int, tokens: int, detail: str = "", force: bool = False) -> None:
        """Record ``rows``/``tokens`` done (cumulative); print a line if one is due."""
        now = self.clock()
        if self.t_first is None and rows > 0:
            self.t_first, self.first = now, (rows, tokens)
        if self.interval_s is None or not (force or now - self.last >= self.interval_s):
            return
        self.last = now
        say(self.log, self.line(rows, tokens, now) + (f" | {detail}" if detail else ""))

    def line(self, rows: int, tokens: int, now: float) -> str:
        """The text of one progress line at time ``now``."""
        el = now - self.t_first if self.t_first is not None else 0.0
        rate = (rows - self.first[0]) / el if el > 0 else 0.0
        tok_rate = (tokens - self.first[1]) / el if el > 0 else 0.0
        if self.expected:
            done = f"rows {rows:,}/{self.expected:,} ({100 * rows / self.expected:.0f}%)"
        else:
            done = f"rows {rows:,}"
        text = f"{done}, {rate:,.1f} rows/s, {tok_rate:,.0f} tok/s"
        if self.expected and rate > 0:
            text += f", ETA {format_eta((self.expected - rows) / rate)}"
        return text
