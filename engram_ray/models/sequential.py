"""Stages of plain torch models: ``nn.Sequential`` slices, and the whole-model fallback.

- :class:`SequentialStage`: children ``layer_range`` of an ``nn.Sequential``, registered under
  their own names (``"0"``, ``"2"``, or an ``OrderedDict``'s keys). Payload ``{"x": tensor}``
  in and ``{"x": tensor}`` out; the last stage returns ``{"logits": tensor}``.
- :class:`SingleStage`: any other model, run whole. It registers the model's own children,
  parameters and buffers under their own names (never a ``"model."`` prefix), so its
  ``named_modules()`` reads as the model's. Payload: the model's keyword inputs (``{"x": t}``
  is called positionally, matching ``Batch``'s tensor inputs); returns
  ``{"logits": output.logits}`` (HF outputs), the output tensor, or a tuple's first element.
- :func:`mlp`: a small seeded ``nn.Sequential`` MLP factory (``"engram_ray.models.sequential:mlp"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engram_ray.models.base import Family, Stage

__all__ = ["SequentialStage", "SingleStage", "mlp"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class SequentialStage(Stage):
    """Children ``layer_range`` of an ``nn.Sequential``, in order, under their original names."""

    def __init__(
        self, model: nn.Sequential, family: Family, *, index: int, n_stages: int, layer_range: range
    ) -> None:
        super().__init__(family, index=index, n_stages=n_stages, layer_range=layer_range)
        children = list(model.named_children())
        self._order = [children[i][0] for i in layer_range]
        for i in layer_range:
            name, child = children[i]
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for name in self._order:
            x = self._modules[name](x)
        return {"logits": x} if self.is_last else {"x": x}


class SingleStage(Stage):
    """The whole model as the only stage; names, parameters and buffers are the model's own.

    Takes the same arguments as the other stages (so the registry builds every family alike),
    but ``index``/``n_stages``/``layer_range`` are always ``0``/``1``/``range(0, 1)``.
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        *,
        index: int = 0,
        n_stages: int = 1,
        layer_range: range = range(0, 1),
    ) -> None:
        # Always stage 0 of 1: the caller checks that the model was not asked to split.
        super().__init__(family, index=0, n_stages=1, layer_range=range(0, 1))
        self.__dict__["wrapped"] = model  # held without registering: no "wrapped." prefix
        self._mirror()

    def _mirror(self) -> None:
        """Register the wrapped model's direct members under their own names."""
        m = self.wrapped
        self._modules.clear()
        self._modules.update(m._modules)
        self._parameters.clear()
        self._parameters.update(m._parameters)
        self._buffers.clear()
        self._buffers.update(m._buffers)
        self._non_persistent_buffers_set = set(m._non_persistent_buffers_set)

    def _apply(self, fn, recurse=True):
        # ``.to()``/``.half()`` must reach the wrapped model's own tensors, then be mirrored.
        self.wrapped._apply(fn, recurse)
        self._mirror()
        return self

    def train(self, mode: bool = True):
        self.wrapped.train(mode)
        self.training = mode
        return self

    def get_input_embeddings(self) -> nn.Module | None:
        return _call_accessor(self.wrapped, "get_input_embeddings")

    def get_output_embeddings(self) -> nn.Module | None:
        return _call_accessor(self.wrapped, "get_output_embeddings")

    def forward(self, **payload) -> dict[str, torch.Tensor]:
        if set(payload) == {"x"}:
            out = self.wrapped(payload["x"])
        else:
            out = self.wrapped(**payload)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"{type(self.wrapped).__name__} returned {type(out).__name__}, not logits"
            )
        return {"logits": logits}


def _call_accessor(model: nn.Module, name: str) -> nn.Module | None:
    fn = getattr(model, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except NotImplementedError:
        return None


def mlp(
    sizes: Sequence[int], activation: str = "gelu", bias: bool = True, seed: int | None = 0
) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]), act, …, Linear(sizes[-2], sizes[-1])`` as an ``nn.Sequential``.

    Seeded without touching the global RNG, so every worker that builds it gets the same
    weights (a factory model without a weights file is still reproducible across stages).
    """
    if len(sizes) < 2:
        raise ValueError(f"mlp needs at least 2 sizes, got {list(sizes)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected {sorted(_ACTIVATIONS)}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(int(d_in), int(d_out), bias=bias))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
        return nn.Sequential(*layers)
