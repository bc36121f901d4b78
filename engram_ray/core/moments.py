"""Uncentered input second moments: Σ_total and Σ_c per input group, with exact counts.

For a layer ``y = W x`` (bias absorbed as a trailing constant 1 in ``x``) the engram needs

    Σ_c     = Σ_{t ∈ c}   x_t x_tᵀ      one per concept c
    Σ_total = Σ_{all t}   x_t x_tᵀ      every counted token: all concepts + reference-only rows

Why sums and not means: sums merge by plain addition (associative, commutative), so replicas,
shards and later increments combine exactly, and the paper's engram ``W Σ_c Σ_total⁺`` uses the
sums (the ``n_c / N`` factor lives inside). Why float64: activations arrive as float32 (exact for
bf16/fp16); each batch's Gram block is formed from them in float64 (products of float32 values
are exact there) and added to a float64 running sum, so millions of tokens do not wash out small
directions and the result does not depend on batching (see :meth:`Moments.add`).

Concepts with few tokens keep their raw features instead: while a concept has at most
``max_rows`` tokens (default ``D // 2``) its ``X_c`` (n_c × D, float32, exactly the activations)
is kept and ``Σ_c = X_cᵀ X_c`` is never formed. That is smaller than the Gram block (n_c·D vs D²
numbers) and lets the solver return the engram as rank-n_c factors ``(W X_cᵀ)(X_c Σ⁺)``: for a
TOFU author (hundreds of answer tokens) against a 2048–8192-wide layer, a fraction of the flops
and bytes of the dense ``W Σ_c Σ⁺``. Past ``max_rows`` tokens the rows fold into a Gram block;
the form depends only on the final count, never on batching or merge order.

``sources`` names the shards (or blocks) a partial sum covers. Merging two partials that cover a
common source would count rows twice, so :meth:`Moments.merge` refuses it: every row is counted
exactly once or the run fails. This is what lets a resumed or incremental run add new shards
without re-reading old ones.

Serialization stores each symmetric matrix as its packed upper triangle (half the bytes) in a
safetensors blob with a format version; unknown versions are refused with a hint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "FORMAT_VERSION",
    "ModuleInfo",
    "Moments",
    "check_mergeable",
    "Statistics",
    "check_counts",
    "fold_rows",
    "merge_summaries",
    "pack_symmetric",
    "partition",
    "unpack_symmetric",
]

FORMAT_VERSION = 2  # 2: raw feature rows of small concepts (version 1 is still read)


def pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    """Upper triangle (diagonal included) of a symmetric ``(D, D)`` matrix as a flat vector."""
    d = m.shape[0]
    iu = torch.triu_indices(d, d, device=m.device)
    return m[iu[0], iu[1]].contiguous()


def unpack_symmetric(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_symmetric`."""
    if v.numel() != dim * (dim + 1) // 2:
        raise ValueError(f"packed length {v.numel()} does not match dim {dim}")
    iu = torch.triu_indices(dim, dim, device=v.device)
    m = torch.zeros(dim, dim, dtype=v.dtype, device=v.device)
    m[iu[0], iu[1]] = v
    m[iu[1], iu[0]] = v
    return m


@dataclass
class Moments:
    """Σ_total and every Σ_c (float64 sums) for one input group, with token counts.

    ``total``: (D, D); ``concepts[c]``: (D, D) Gram blocks of concepts with more than
    ``max_rows`` tokens; ``rows[c]``: (n_c, D) float32 raw features of the others (a concept is in
    exactly one of the two); ``n_total`` / ``counts[c]``: tokens summed.
    """

    dim: int
    total: torch.Tensor
    n_total: int = 0
    concepts: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    sources: frozenset[str] = frozenset()
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    max_rows: int = 0

    @classmethod
    def zeros(
        cls, dim: int, device: torch.device | str = "cpu", max_rows: int | None = None
    ) -> Moments:
        """Empty sums; ``max_rows`` defaults to ``dim // 2`` (0 = always Gram blocks).

        Why ``D / 2``: a rank-r engram of an (out × D) layer stores ``r·(out + D)`` numbers
        against ``out·D`` dense, so for square layers factors stop paying at ``r = D / 2``; the
        factored solve (``out·D·r + r·D²`` flops) crosses the dense one (``2·out·D²``) later.
        """
        max_rows = dim // 2 if max_rows is None else max_rows
        return cls(dim=dim, total=torch.zeros(dim, dim, dtype=torch.float64, device=device),
                   max_rows=max_rows)

    @property
    def names(self) -> list[str]:
        """Every concept with a Σ_c (Gram block or rows), sorted."""
        return sorted(set(self.concepts) | set(self.rows))

    def sigma(self, concept: str) -> torch.Tensor:
        """Σ_c as a float64 (D, D) matrix, whichever form the concept is kept in."""
        if concept in self.rows:
            return _gram(self.rows[concept], torch.float64)
        return self.concepts[concept]

    def add(
        self,
        x: torch.Tensor,
        concept_index: torch.Tensor,
        names: Sequence[str],
        gram_dtype: torch.dtype = torch.float64,
        *,
        parts: Sequence[tuple[int, torch.Tensor]] | None = None,
        unlabelled: torch.Tensor | None = None,
    ) -> None:
        """Add token features ``x`` (n, D) whose concept is ``names[concept_index[t]]`` (−1 = none).

        ``parts`` (optional) is :func:`partition` of ``concept_index``, computed once per batch
        by a caller that feeds many groups, and ``unlabelled`` the positions of index −1 (on
        CUDA each ``nonzero`` waits for the GPU, so a caller computes them once). Each token's
        outer product is formed once: the Gram blocks of large concepts are summed into
        Σ_total, and every other token (reference rows, small concepts kept as rows) goes into
        Σ_total in one Gram, so one pass for every concept costs one Gram of all tokens.

        ``gram_dtype=float64`` (default): the products of float32 activations are exact in
        float64 and their sums lose nothing measurable, so Σ does not depend on how rows were
        batched, sharded or spread over replicas. That matters because the solve amplifies
        Σ's relative error by up to 1/rtol ≈ 10⁵: with float32 Gram blocks, re-batching the
        same rows moved tiny-Llama engrams by ~1e-4; with float64, by ~5e-7.
        ``float32`` halves the cost (and is the fast path on GPUs with slow fp64).
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"feature width {x.shape[-1]} does not match Σ dim {self.dim}")
        # Rows kept for small concepts stay in the captured dtype when it is bf16/fp16 (exact,
        # half the bytes of float32); every Gram is formed from float32 (exact for them).
        captured = x if x.dtype in (torch.bfloat16, torch.float16) else None
        x = x.float()  # (n, D); exact for bf16/fp16 inputs
        if parts is None:
            parts = partition(concept_index)
        # Tokens whose Gram did not go into a concept block: unlabelled ones and those of
        # concepts kept as rows. Gathered by index (sizes known on the host: no GPU sync).
        rest = []
        for k, idx in parts:
            name = names[k]
            rows = x[idx]  # (n_k, D)
            n = self.counts.get(name, 0) + rows.shape[0]
            self.counts[name] = n
            if name not in self.concepts and n <= self.max_rows:
                kept = rows if captured is None else captured[idx]
                old = self.rows.get(name)
                self.rows[name] = kept if old is None else torch.cat([old, kept.to(old.dtype)])
                rest.append(idx)
                continue
            gram = _gram(rows, gram_dtype)
            self.total += gram
            if name in self.rows:  # crossed max_rows: fold the kept rows (already in Σ_total)
                gram = gram + _gram(self.rows.pop(name), gram_dtype)
            self.concepts[name] = self.concepts[name] + gram if name in self.concepts else gram
        if len(rest) == len(parts):  # no concept block took a token: one Gram of all
            self.total += _gram(x, gram_dtype)
        else:
            labelled = sum(int(idx.shape[0]) for _, idx in parts)
            if labelled < x.shape[0]:  # unlabelled tokens (concept index −1)
                rest.append((concept_index < 0).nonzero().squeeze(1) if unlabelled is None
                            else unlabelled)
            if rest:  # in ascending order: the same rows, in the same order, as a bool mask
                self.total += _gram(x[torch.cat(rest).sort().values], gram_dtype)
        self.n_total += x.shape[0]

    def merge(self, other: Moments) -> Moments:
        """Exact sum of two partials (associative, order-independent); refuses double counting."""
        check_mergeable(self, other)
        dev = self.total.device
        concepts = {c: t.clone() for c, t in self.concepts.items()}
        for c, t in other.concepts.items():
            concepts[c] = concepts[c] + t.to(dev) if c in concepts else t.to(dev).clone()
        rows = dict(self.rows)
        for c, r in other.rows.items():
            rows[c] = torch.cat([rows[c], r.to(dev)]) if c in rows else r.to(dev)
        counts = dict(self.counts)
        for c, n in other.counts.items():
            counts[c] = counts.get(c, 0) + n
        max_rows = min(self.max_rows, other.max_rows)
        fold_rows(concepts, rows, counts, max_rows)
        return Moments(
            dim=self.dim,
            total=self.total + other.total.to(dev),
            n_total=self.n_total + other.n_total,
            concepts=concepts,
            counts=counts,
            sources=self.sources | other.sources,
            rows=rows,
            max_rows=max_rows,
        )

    def summary(self) -> tuple[int, dict[str, int]]:
        """(tokens, tokens per concept): what a driver needs without the matrices."""
        return self.n_total, dict(self.counts)

    def to(self, device: torch.device | str) -> Moments:
        return Moments(
            dim=self.dim,
            total=self.total.to(device),
            n_total=self.n_total,
            concepts={c: t.to(device) for c, t in self.concepts.items()},
            counts=dict(self.counts),
            sources=self.sources,
            rows={c: r.to(device) for c, r in self.rows.items()},
            max_rows=self.max_rows,
        )

    # --- serialization -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        names = sorted(self.concepts)
        small = sorted(self.rows)
        tensors = {"total": pack_symmetric(self.total.cpu())}
        for i, c in enumerate(names):
            tensors[f"c{i}"] = pack_symmetric(self.concepts[c].cpu())
        for i, c in enumerate(small):
            tensors[f"r{i}"] = self.rows[c].cpu().float().contiguous()
        meta = {
            "format_version": str(FORMAT_VERSION),
            "dim": str(self.dim),
            "n_total": str(self.n_total),
            "concepts": json.dumps(names),
            "row_concepts": json.dumps(small),
            "max_rows": str(self.max_rows),
            "counts": json.dumps(dict(sorted(self.counts.items()))),
            "sources": json.dumps(sorted(self.sources)),
        }
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes, what: str = "moments") -> Moments:
        from safetensors import safe_open
        from safetensors.torch import load

        meta = _read_metadata(blob, safe_open)
        version = meta.get("format_version")
        if version not in ("1", str(FORMAT_VERSION)):
            raise ValueError(
                f"{what}: unknown statistics format version {version!r} (this engram-ray reads "
                f"versions 1 to {FORMAT_VERSION}); re-extract the statistics with this version"
            )
        tensors = load(blob)
        dim = int(meta["dim"])
        names = json.loads(meta["concepts"])
        small = json.loads(meta.get("row_concepts", "[]"))  # version 1 has Gram blocks only
        counts = json.loads(meta["counts"])
        return cls(
            dim=dim,
            total=unpack_symmetric(tensors["total"], dim),
            n_total=int(meta["n_total"]),
            concepts={c: unpack_symmetric(tensors[f"c{i}"], dim) for i, c in enumerate(names)},
            counts={c: int(n) for c, n in counts.items()},
            sources=frozenset(json.loads(meta["sources"])),
            rows={c: tensors[f"r{i}"] for i, c in enumerate(small)},
            max_rows=int(meta.get("max_rows", "0")),
        )


def fold_rows(concepts: dict[str, torch.Tensor], rows: dict[str, torch.Tensor],
              counts: Mapping[str, int], max_rows: int) -> None:
    """Fold (in the dicts, in place) the kept rows of every concept that has a Gram block or
    more than ``max_rows`` tokens into its block: the form follows the merged count alone.

    One rule for every merge (two partials here, R replicas' partials in the Ray reduction,
    which concatenates rows while they travel and folds once where the group is solved), so
    the form never depends on how rows were spread or in which order partials met.
    """
    for c in list(rows):
        if c in concepts or counts[c] > max_rows:
            gram = _gram(rows.pop(c), torch.float64)
            concepts[c] = concepts[c] + gram if c in concepts else gram


def partition(concept_index: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(k, row indices with concept_index == k)]`` for every labelled concept ``k ≥ 0``,
    ``k`` ascending, each index list ascending.

    One stable sort and one read of the run lengths, whatever the number of concepts: on CUDA
    a ``nonzero`` per concept would wait for the GPU once per concept and batch.
    """
    if concept_index.numel() == 0:
        return []
    order = torch.argsort(concept_index, stable=True)
    ks, counts = torch.unique_consecutive(concept_index[order], return_counts=True)
    out, start = [], 0
    for k, n in zip(ks.tolist(), counts.tolist()):
        if k >= 0:
            out.append((k, order[start:start + n]))
        start += n
    return out


def _gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``xᵀx`` formed in ``dtype`` and returned as float64.

    On CUDA with TF32 off (:func:`engram_ray.devices.no_tf32`): a float32 Gram is then IEEE
    float32 whatever precision the process chose for its other matmuls (TF32 would cost ~1e-3
    relative); float64 is never TF32, the guard costs a flag flip.
    """
    x = x.to(dtype)
    if not x.is_cuda:
        return (x.T @ x).double()
    from engram_ray.devices import no_tf32

    with no_tf32():
        return (x.T @ x).double()


def _read_metadata(blob: bytes, _safe_open) -> dict[str, str]:
    # safetensors' header: 8-byte little-endian length, then JSON with "__metadata__".
    if len(blob) < 8:
        raise ValueError("statistics blob is truncated")
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return header.get("__metadata__", {})


@dataclass(frozen=True)
class ModuleInfo:
    """What the solver and the store need to know about one captured module.

    ``kind``: "linear" (weight (out, in)), "conv1d" (GPT-2, weight (in, out)) or "conv2d"
    (weight (out, C, kh, kw), input unfolded to C·kh·kw patches). ``group``: the input group
    whose Σ this module reads; ``bias``: whether a constant-1 column was absorbed.
    """

    name: str
    kind: str
    group: str
    weight_shape: tuple[int, ...]
    bias: bool
    layer: int | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "group": self.group,
            "weight_shape": list(self.weight_shape),
            "bias": self.bias,
            "layer": self.layer,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ModuleInfo:
        return cls(
            name=d["name"],
            kind=d["kind"],
            group=d["group"],
            weight_shape=tuple(d["weight_shape"]),
            bias=bool(d["bias"]),
            layer=d.get("layer"),
        )


@dataclass
class Statistics:
    """Every input group's :class:`Moments` plus the modules that read each group."""

    modules: dict[str, ModuleInfo]
    groups: dict[str, Moments]

    @property
    def concepts(self) -> list[str]:
        names: set[str] = set()
        for m in self.groups.values():
            names.update(m.counts)  # counts also lists labelled concepts whose tokens were masked out
        return sorted(names)

    def members(self, group: str) -> list[ModuleInfo]:
        return [m for m in self.modules.values() if m.group == group]

    def merge(self, other: Statistics) -> Statistics:
        """Merge two partials over the same modules (e.g. two replicas, or old + new shards)."""
        if set(other.modules) != set(self.modules):
            diff = sorted(set(other.modules) ^ set(self.modules))[:5]
            raise ValueError(f"cannot merge statistics over different modules, e.g. {diff}")
        groups = dict(self.groups)
        for g, m in other.groups.items():
            groups[g] = groups[g].merge(m) if g in groups else m
        return Statistics(modules=dict(self.modules), groups=groups)

    def check_concepts(self, expected: Iterable[str] = ()) -> None:
        """Every concept seen (or expected) must have tokens in every group, else name it."""
        check_counts({g: m.summary() for g, m in self.groups.items()}, expected)


def merge_summaries(*parts: Mapping[str, tuple[int, Mapping[str, int]]]) -> dict:
    """Sum ``{group: (tokens, tokens per concept)}`` summaries of disjoint partial Σ."""
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for part in parts:
        for g, (n, counts) in part.items():
            tot, acc = out.get(g, (0, {}))
            acc = dict(acc)
            for c, k in counts.items():
                acc[c] = acc.get(c, 0) + k
            out[g] = (tot + n, acc)
    return out


def check_counts(summaries: Mapping[str, tuple[int, Mapping[str, int]]], expected=()) -> None:
    """``summaries[group] = (n_total, counts)``: fail naming any concept without tokens."""
    names = set(expected)
    for _, counts in summaries.values():
        names.update(counts)
    for g, (n_total, counts) in sorted(summaries.items()):
        if n_total == 0:
            raise ValueError(f"input group {g!r} saw no tokens (check the mask)")
        for c in sorted(names):
            if counts.get(c, 0) == 0:
                raise ValueError(
                    f"concept {c!r} has zero tokens after masking at input group {g!r}; "
                    "its engram is undefined (check the answer/prompt columns and max_length)"
                )


def check_mergeable(a, b) -> None:
    """Two partial Σ (anything with ``dim`` and ``sources``) may be summed: same width, and no
    source counted by both (that would count its rows twice)."""
    if b.dim != a.dim:
        raise ValueError(f"cannot merge Σ of dim {a.dim} with dim {b.dim}")
    overlap = a.sources & b.sources
    if overlap:
        raise ValueError(f"partial statistics overlap on {len(overlap)} source(s), e.g. "
                         f"{sorted(overlap)[:3]}: those rows would be counted twice")
