"""Feeding replicas: a ``streaming_split`` iterator pushed through a chain of stage actors.

One feeder task per replica pulls encoded rows from its split, collates micro-batches (the same
``data.collate`` the single-process path uses), and submits each to stage 0, then hands the
resulting ref to stage 1, and so on: stages of one replica work on different micro-batches at
once. At most ``max_in_flight`` micro-batches are in flight, which bounds memory (and object
store use) while keeping every stage busy.

The progress tracker is a small actor the feeders and stages report to (fire-and-forget); the
driver polls it to print rows/s and tokens/s, stage by stage.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque

import ray

from engram_ray.io.data import collate

__all__ = ["ProgressTracker", "feed_replica"]


@ray.remote(num_cpus=0)
class ProgressTracker:
    def __init__(self) -> None:
        self.start = time.time()
        self.rows = 0
        self.tokens = 0
        self.stages: dict[int, list[float]] = defaultdict(lambda: [0, 0, 0.0])

    def fed(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens

    def stage(self, index: int, replica: int, rows: int, tokens: int, seconds: float) -> None:
        s = self.stages[index]
        s[0] += rows
        s[1] += tokens
        s[2] += seconds

    def snapshot(self) -> dict:
        return {"elapsed": time.time() - self.start, "rows": self.rows, "tokens": self.tokens,
                "stages": {i: list(v) for i, v in sorted(self.stages.items())}}


def _payload(batch) -> dict:
    if isinstance(batch.inputs, dict):
        return dict(batch.inputs)
    return {"x": batch.inputs}


@ray.remote(num_cpus=0.25)
def feed_replica(split, chain: list, batch_size: int, pad_id: int, max_in_flight: int,
                 tracker=None) -> dict:
    """Push every row of ``split`` through ``chain``; returns rows and tokens fed."""
    pending: deque = deque()
    rows = tokens = 0
    for cols in split.iter_batches(batch_size=batch_size, batch_format="numpy"):
        batch = collate(cols, pad_id)
        mask = batch.token_mask()
        ref = _payload(batch)
        for actor in chain:
            ref = actor.forward.remote(ref, list(batch.concepts), mask)
        pending.append(ref)
        n_tok = int(mask.sum()) if mask is not None else batch.batch_size
        rows, tokens = rows + batch.batch_size, tokens + n_tok
        if tracker is not None:
            tracker.fed.remote(batch.batch_size, n_tok)
        while len(pending) >= max_in_flight:
            ray.get(pending.popleft())  # surfaces a stage error here, with its traceback
    while pending:
        ray.get(pending.popleft())
    return {"rows": rows, "tokens": tokens}
