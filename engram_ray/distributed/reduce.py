"""Tree reduction of partial Σ: pairwise merges in ⌈log₂ R⌉ rounds, never all on one process.

``Moments.merge`` is exact and associative, and refuses partials that cover a common source,
so the reduced Σ counts every replica's rows exactly once whatever the merge order. Merges of
one round run in parallel as Ray tasks; the rounds of different input groups interleave.
"""

from __future__ import annotations

import math

import ray

from engram_ray.core.moments import Moments

__all__ = ["merge_moments", "tree_depth", "tree_reduce"]


@ray.remote
def merge_moments(a: Moments, b: Moments) -> Moments:
    return a.merge(b)


def tree_depth(n: int) -> int:
    """Rounds needed to reduce ``n`` partials pairwise."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def tree_reduce(refs: list, num_cpus: float = 0.25) -> tuple[object, int]:
    """Reduce a list of ``Moments`` refs pairwise; returns (the final ref, rounds used)."""
    if not refs:
        raise ValueError("nothing to reduce")
    rounds = 0
    while len(refs) > 1:
        nxt = [merge_moments.options(num_cpus=num_cpus).remote(refs[i], refs[i + 1])
               for i in range(0, len(refs) - 1, 2)]
        if len(refs) % 2:
            nxt.append(refs[-1])  # the odd one waits for the next round
        refs, rounds = nxt, rounds + 1
    return refs[0], rounds
