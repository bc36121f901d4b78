"""Tree reduction of partial Σ between the stage actors that hold them, in place, zero-copy.

Each replica's stage actor holds its partial Σ for its input groups. Per group, the R partials
meet pairwise in ⌈log₂ R⌉ rounds: in round k, actor ``r`` *absorbs* the partial of actor
``r + 2ᵏ`` (in the tree's order). Nothing else runs: no merge task, so no fresh worker process
importing torch, and no Σ pickled as torch tensors (a pickled tensor is copied into the
message and again out of it). What travels is a :class:`SigmaBlocks`: plain numpy arrays,
which Ray's serializer writes once into the object store and a reader on the same node maps
without copying (read-only). The receiver adds them into its own float64 buffers in place.

Small concepts' raw rows (``Moments.rows``, at most D/2 tokens per replica) are not folded
into Gram blocks on the way: the lists of row blocks are concatenated, and folded once where
the group is solved (:meth:`SigmaBlocks.to_moments`, the same :func:`fold_rows` rule as
``Moments.merge``), so the form still follows the merged count alone. Rows fold early only
once they outweigh the D×D block they would become (more than 2·D rows: a block is then the
cheaper thing to move).

``Moments.merge``'s guard holds here too: partials covering a common source are refused, so
every replica's rows count exactly once. Which replica is the root rotates with the group, so
the R actors of a stage share the reduction (and the serialization for the solver) evenly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from engram_ray.core.moments import Moments, check_mergeable, fold_rows

__all__ = ["SigmaBlocks", "as_tensor", "tree_depth", "tree_plan"]


def tree_depth(n: int) -> int:
    """Rounds needed to reduce ``n`` partials pairwise."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def tree_plan(n: int, root: int = 0) -> list[list[tuple[int, int]]]:
    """Rounds of ``(receiver, sender)`` pairs that reduce partials ``0..n-1`` onto ``root``.

    The indices are taken in the rotated order ``root, root+1, …`` (mod n); in round k the
    partial at position ``i + 2ᵏ`` goes to position ``i`` (``i`` a multiple of ``2ᵏ⁺¹``), so
    every partial is sent exactly once and the root receives last.
    """
    order = [(root + i) % n for i in range(n)]
    rounds, step = [], 1
    while step < n:
        rounds.append([(order[i], order[i + step]) for i in range(0, n - step, 2 * step)])
        step *= 2
    return rounds


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without the copy, also for the read-only arrays Ray maps out of
    the object store (torch warns that writing them would be undefined: nothing here writes
    them; every sum forms a new tensor or goes into a buffer this process owns)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as numpy (no copy; a CUDA tensor is copied to the host)."""
    return t.detach().cpu().numpy()


@dataclass
class SigmaBlocks:
    """One input group's partial Σ as numpy arrays: Σ_total and Gram blocks float64 (D, D),
    small concepts' raw rows float32 as lists of (n, D) blocks, exact token counts, and the
    sources the partial covers (see :class:`~engram_ray.core.moments.Moments`).

    ``owned`` names the arrays this process may add into in place (its own buffers); arrays
    received from the object store are read-only and are replaced by a new sum instead. It is
    not pickled: on arrival nothing is owned.
    """

    dim: int
    total: np.ndarray
    n_total: int = 0
    blocks: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    sources: frozenset[str] = frozenset()
    max_rows: int = 0
    owned: set[str] = field(default_factory=set, repr=False, compare=False)
    # bf16 rows (a bf16 model's activations, kept as captured) travel as their 16-bit patterns:
    # numpy has no bfloat16.
    rows_bf16: bool = False

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["owned"] = set()
        return state

    @classmethod
    def from_moments(cls, m: Moments, *, in_place: bool = False) -> SigmaBlocks:
        """``m``'s arrays without copying them. ``in_place=True`` lets later absorbs add into
        ``m``'s own Σ_total and blocks (the final reduction: ``m`` is not used again);
        otherwise the first absorb into each array allocates a new one (a checkpoint's
        reduction, after which accumulation goes on)."""
        blocks = {c: _numpy(t) for c, t in m.concepts.items()}
        owned = {"Σ", *(f"c:{c}" for c in blocks)} if in_place else set()
        bf16 = any(r.dtype == torch.bfloat16 for r in m.rows.values())
        rows = {c: [_numpy(r.view(torch.int16) if bf16 else r)] for c, r in m.rows.items()}
        return cls(dim=m.dim, total=_numpy(m.total), n_total=m.n_total, blocks=blocks,
                   rows=rows, counts=dict(m.counts), sources=m.sources, max_rows=m.max_rows,
                   owned=owned, rows_bf16=bf16)

    def _rows_tensor(self, parts: list[np.ndarray]) -> torch.Tensor:
        t = as_tensor(_concat(parts))
        return t.view(torch.bfloat16) if self.rows_bf16 else t

    def nbytes(self) -> int:
        """Bytes of array data (what a transfer of this partial moves, headers aside)."""
        return (self.total.nbytes + sum(b.nbytes for b in self.blocks.values())
                + sum(r.nbytes for rs in self.rows.values() for r in rs))

    def _add(self, key: str, mine: np.ndarray | None, theirs: np.ndarray) -> np.ndarray:
        if mine is None:
            return theirs  # a reference, not a copy: read-only until something adds into it
        if key in self.owned:
            np.add(mine, theirs, out=mine)
            return mine
        self.owned.add(key)
        return mine + theirs

    def absorb(self, other: SigmaBlocks) -> None:
        """Add ``other`` into this partial (exact float64 sums; row lists concatenated)."""
        check_mergeable(self, other)
        self.total = self._add("Σ", self.total, other.total)
        for c, b in other.blocks.items():
            self.blocks[c] = self._add(f"c:{c}", self.blocks.get(c), b)
        if other.rows and self.rows and self.rows_bf16 != other.rows_bf16:
            raise ValueError("cannot merge partial Σ whose kept rows have different dtypes")
        self.rows_bf16 = self.rows_bf16 if self.rows else other.rows_bf16
        for c, rs in other.rows.items():
            self.rows[c] = [*self.rows.get(c, []), *rs]
        for c, n in other.counts.items():
            self.counts[c] = self.counts.get(c, 0) + n
        self.n_total += other.n_total
        self.sources = self.sources | other.sources
        self.max_rows = min(self.max_rows, other.max_rows)
        for c in [c for c, rs in self.rows.items() if sum(len(r) for r in rs) > 2 * self.dim]:
            self._fold(c)

    def _fold(self, concept: str) -> None:
        """Fold a concept's rows into its block now (they outweigh the block)."""
        blocks = {concept: as_tensor(self.blocks[concept])} if concept in self.blocks else {}
        rows = {concept: self._rows_tensor(self.rows.pop(concept))}
        fold_rows(blocks, rows, {concept: self.max_rows + 1}, self.max_rows)
        self.blocks[concept] = _numpy(blocks[concept])
        self.owned.add(f"c:{concept}")

    def to_moments(self) -> Moments:
        """The reduced partial as :class:`Moments` (tensors over these arrays, no copy), with
        rows folded where the merged count (or an existing block) says so."""
        concepts = {c: as_tensor(b) for c, b in self.blocks.items()}
        rows = {c: self._rows_tensor(rs) for c, rs in self.rows.items()}
        fold_rows(concepts, rows, self.counts, self.max_rows)
        return Moments(dim=self.dim, total=as_tensor(self.total), n_total=self.n_total,
                       concepts=concepts, counts=dict(self.counts), sources=self.sources,
                       rows=rows, max_rows=self.max_rows)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
