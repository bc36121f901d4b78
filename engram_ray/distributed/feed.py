"""Feeding a replica: its ``streaming_split`` iterator, packed into micro-batches by tokens.

Stage 0 of each replica pulls its own split (:meth:`StageActor.consume`), so no feeder process
sits between Ray Data and the model: Ray Data's prefetch threads fetch the next encoded blocks
(read and tokenized by Ray Data tasks elsewhere) while the stage computes, and the stage only
waits when no encoded row exists yet. Each block is cut into micro-batches of at most
``batch_tokens`` padded tokens, rows sorted by length first so little of a batch is padding;
the batch is collated exactly as the single-process path collates (``io.data.collate``), run,
and its hidden states are handed to stage 1, and so on: stages of one replica work on
different micro-batches at once, with at most ``max_in_flight`` of them queued behind stage 0
(which bounds memory and object-store use).

Σ does not depend on how rows are batched or ordered (float64 sums of exact products; see
``core/moments.py``), so packing by tokens changes the speed, not the result.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import ray

from engram_ray.core.batch import Batch
from engram_ray.distributed.wire import to_wire
from engram_ray.io.data import collate

__all__ = ["BLOCK_ROWS", "DEFAULT_BATCH_TOKENS", "FeedCounters", "feed", "micro_batches", "pack"]

# Padded tokens per micro-batch when the config names none: large enough that per-batch costs
# (Python hooks, one Ray call per stage hop) are small against the matmuls, small enough that
# activations stay a few hundred MB for 8k-wide layers.
DEFAULT_BATCH_TOKENS = 4096
# Rows pulled from the split at a time (then packed): one sort window.
BLOCK_ROWS = 256


def pack(block: Mapping[str, Any], batch_tokens: int) -> list[np.ndarray]:
    """Row indices of ``block`` grouped into micro-batches of at most ``batch_tokens`` padded
    tokens (rows × the longest row), rows sorted by length; a row longer than the budget goes
    alone. Feature rows count one token each. Every row is in exactly one group."""
    if "input_ids" not in block:
        n = len(block["concept"])
        return [np.arange(i, min(i + batch_tokens, n)) for i in range(0, n, batch_tokens)]
    lengths = np.fromiter((len(x) for x in block["input_ids"]), dtype=np.int64,
                          count=len(block["input_ids"]))
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or (i + 1 - start) * lengths[order[i]] > batch_tokens:
            groups.append(order[start:i])
            start = i
    return groups


def micro_batches(blocks: Iterable[Mapping[str, Any]], batch_tokens: int,
                  pad_id: int | Callable[[], int]) -> Iterator[Batch]:
    """The blocks' rows as collated :class:`Batch` es of at most ``batch_tokens`` tokens.
    ``pad_id`` may be a callable giving it, called once, when the first block has arrived."""
    for block in blocks:
        if callable(pad_id):
            pad_id = pad_id()
        for rows in pack(block, batch_tokens):
            yield collate({k: v[rows] for k, v in block.items()}, pad_id)


class FeedCounters:
    """What stage 0 measured while feeding: rows, tokens, micro-batches, seconds spent waiting
    for rows, and when (epoch seconds) it started pulling, got its first block of rows, began
    computing the first row (the block there and the stage loaded) and finished."""

    def __init__(self) -> None:
        self.rows = self.tokens = self.batches = 0
        self.wait_s = 0.0
        self.started_at = self.first_block_at = self.first_row_at = self.done_at = None

    def as_dict(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "batches": self.batches,
                "wait_s": self.wait_s, "started_at": self.started_at,
                "first_block_at": self.first_block_at, "first_row_at": self.first_row_at,
                "done_at": self.done_at}


def _timed(items: Iterable, counters: FeedCounters) -> Iterator:
    """``items``, adding the time spent waiting for each to ``counters.wait_s``."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        counters.wait_s += time.perf_counter() - t0
        if item is None:
            return
        if counters.first_block_at is None:
            counters.first_block_at = time.time()
        yield item


def feed(split, first: Callable[[Batch], Any], rest: list, *, batch_tokens: int,
         pad_id: int | Callable[[], int],
         max_in_flight: int, prefetch: int, counters: FeedCounters,
         ready: Callable[[], None] = lambda: None) -> dict:
    """Push every row of ``split`` through ``first`` (stage 0, in this process) and the stage
    actors ``rest``; returns ``counters.as_dict()``.

    ``first(batch)`` returns the next stage's payload (or the row count when it is the last
    stage); each later stage gets it as numpy (:func:`~engram_ray.distributed.wire.to_wire`).
    A stage's error surfaces here, when its micro-batch is collected. ``pad_id`` may be a
    callable (resolved when the first block is there: :func:`micro_batches`). Rows are pulled before
    stage 0 is ready (it may still be loading its slice): ``ready()`` blocks until it is, and
    is called before the first micro-batch is computed. ``counters`` keep the
    actor's totals across calls (checkpoint slices); the rows, tokens and micro-batches
    returned are this call's, which the driver checks against this slice's row count.
    """
    before = counters.as_dict()
    pending: deque = deque()
    counters.started_at = time.time()
    blocks = split.iter_batches(batch_size=BLOCK_ROWS, batch_format="numpy",
                                prefetch_batches=prefetch)
    for batch in micro_batches(_timed(blocks, counters), batch_tokens, pad_id):
        if counters.first_row_at is None:
            ready()
            counters.first_row_at = time.time()
        mask = batch.token_mask()
        out = first(batch)
        if rest:
            concepts = list(batch.concepts)
            wire_mask = mask.numpy() if mask is not None else None
            ref = to_wire(out)
            for actor in rest:
                ref = actor.forward.remote(ref, concepts, wire_mask)
            pending.append(ref)
        counters.rows += batch.batch_size
        counters.tokens += int(mask.sum()) if mask is not None else batch.batch_size
        counters.batches += 1
        while len(pending) >= max_in_flight:
            ray.get(pending.popleft())
    while pending:
        ray.get(pending.popleft())
    counters.done_at = time.time()
    out = counters.as_dict()
    for key in ("rows", "tokens", "batches"):
        out[key] -= before[key]
    return out
