"""The unit of work every engine path consumes: model inputs, a token mask, one concept per row.

A ``Batch`` is what the single-process engine, the stage actors and the readers exchange, so the
distributed path and its single-process oracle see exactly the same rows.

- ``inputs``: a tensor (called as ``model(inputs)``) or a mapping of tensors (called as
  ``model(**inputs)``; e.g. ``input_ids`` + ``attention_mask`` for HF models).
- ``mask``: optional ``(B, T)`` bool; which token positions count in Σ (e.g. answer tokens
  only). ``None`` means every position counts, except padding when ``inputs`` carries an
  ``attention_mask``.
- ``concepts``: one entry per row: a concept name, or ``None`` for a reference-only row that
  counts in Σ_total only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Batch"]


@dataclass
class Batch:
    inputs: torch.Tensor | Mapping[str, torch.Tensor]
    concepts: Sequence[str | None]
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.batch_size
        if len(self.concepts) != n:
            raise ValueError(f"batch has {n} rows but {len(self.concepts)} concept labels")
        for c in self.concepts:
            if c is not None and not isinstance(c, str):
                raise TypeError(f"concept labels must be str or None, got {type(c).__name__}: {c!r}")
        if self.mask is not None:
            if self.mask.dim() != 2 or self.mask.shape[0] != n:
                raise ValueError(f"mask must be (B, T) with B={n}, got {tuple(self.mask.shape)}")
            self.mask = self.mask.bool()

    @property
    def batch_size(self) -> int:
        if isinstance(self.inputs, torch.Tensor):
            return int(self.inputs.shape[0])
        first = next(iter(self.inputs.values()))
        return int(first.shape[0])

    def token_mask(self) -> torch.Tensor | None:
        """The effective ``(B, T)`` mask: explicit mask, else the attention mask, else None."""
        if self.mask is not None:
            return self.mask
        if isinstance(self.inputs, Mapping) and "attention_mask" in self.inputs:
            return self.inputs["attention_mask"].bool()
        return None

    def call(self, model: torch.nn.Module):
        """Run ``model`` on the inputs with the right calling convention."""
        if isinstance(self.inputs, torch.Tensor):
            return model(self.inputs)
        return model(**self.inputs)
