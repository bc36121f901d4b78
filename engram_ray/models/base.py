"""What every pipeline stage shares: the :class:`Stage` base, the :class:`Family` row type, and
the one decoder stage (:class:`DecoderStage`) that every decoder-only causal LM family runs on.

Pipeline parallelism runs stage ``i`` on its own worker and streams activations from stage
``i`` to ``i+1``. Each stage is an ``nn.Module`` that owns only its slice but keeps the full
model's dotted names for it (``model.layers.3.self_attn.q_proj``, ``lm_head``, ``2``): the
statistics and engrams a stage computes are stored by module name, so they must read exactly
as the unsplit model's, and a stage's ``state_dict`` uses checkpoint names too.

HF decoder families differ only in *where* their parts live and *how positions enter*, so a
family is data (a :class:`Family` row, kept in :mod:`engram_ray.models.registry`) and
:class:`DecoderStage` reads it: ``embed``/``blocks``/``norm``/``head`` attribute paths, and
``positions`` with its ``position_module``:

- ``"rotary"`` (Llama, Mistral, Qwen): every stage holds the (buffer-only) rotary module and
  hands its ``(cos, sin)`` to each block as ``position_embeddings``;
- ``"learned"`` (GPT-2): stage 0 holds the position embedding and adds it to the token
  embeddings, before the optional embedding ``dropout``.

A stage re-derives what the blocks need from two small tensors rather than shipping the 4-D
mask or rotary tables between workers: position ids are ``arange(T)`` as in HF's forward
without a cache (right padding keeps real tokens at ``0..len-1``) unless the payload carries
``position_ids``; causal masks come from the ``(B, T)`` padding mask through transformers'
``create_causal_mask`` / ``create_sliding_window_causal_mask``, per layer type
(``config.layer_types``; every layer slides when only ``config.sliding_window`` is set).
A family with a real quirk (scaled embeddings, extra block inputs) subclasses
:class:`DecoderStage` and overrides :meth:`~DecoderStage.embed` or
:meth:`~DecoderStage.block_kwargs`.

Decoder payload: stage 0 takes ``{"input_ids": (B, T) long, "attention_mask": (B, T) 0/1}``; a
middle stage returns :func:`decoder_payload` (``hidden_states`` (B, T, H), ``attention_mask``,
plus ``position_ids`` when given); the last stage returns ``{"logits": (B, T, V)}``.

This module imports no other module of the package (transformers only inside ``forward``), so
family modules and the registry build on it without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "POSITIONS",
    "DecoderStage",
    "Family",
    "Stage",
    "decoder_payload",
    "get_path",
    "layer_type",
]

POSITIONS = ("rotary", "learned")


@dataclass(frozen=True)
class Family:
    """One row of the family table: how to recognise a model and how to cut it into stages.

    ``stage`` builds a stage as ``stage(model, family, index=, n_stages=, layer_range=)``.
    A model matches when its class (or one along its MRO) is named in ``classes`` and it has
    every part path, or when it is an instance of ``module_type``; an HF config matches by its
    ``model_type``. ``blocks`` is the path of the repeated blocks split across stages (``""``:
    the model itself, as for ``nn.Sequential``); ``None`` means the model runs whole.
    The remaining fields are the decoder layout that :class:`DecoderStage` reads.
    """

    name: str
    stage: type[Stage]
    classes: frozenset[str] = frozenset()
    model_types: frozenset[str] = frozenset()
    module_type: type | None = None
    blocks: str | None = None
    embed: str = ""
    norm: str = ""
    head: str = ""
    positions: str = ""
    position_module: str = ""
    dropout: str = ""

    def __post_init__(self) -> None:
        if self.positions and self.positions not in POSITIONS:
            raise ValueError(f"family {self.name!r}: positions must be one of {POSITIONS}")
        if self.positions and not self.position_module:
            raise ValueError(f"family {self.name!r}: positions need a position_module path")

    @property
    def splittable(self) -> bool:
        return self.blocks is not None

    def part_paths(self) -> tuple[str, ...]:
        """Every attribute path the model must have for this row to apply."""
        paths = (self.embed, self.blocks, self.norm, self.head, self.position_module, self.dropout)
        return tuple(p for p in paths if p)

    def matches_module(self, model: nn.Module, class_names: set[str]) -> bool:
        if self.module_type is not None and isinstance(model, self.module_type):
            return True
        return bool(class_names & self.classes) and all(
            get_path(model, p) is not None for p in self.part_paths()
        )

    def n_blocks(self, model: nn.Module) -> int:
        """How many blocks the model has to split (``1`` for a model that runs whole)."""
        if self.blocks is None:
            return 1
        return len(get_path(model, self.blocks))


def get_path(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``"a.b.c"`` (``obj`` itself for ``""``); ``None`` where a part is missing."""
    for part in path.split(".") if path else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class Stage(nn.Module):
    """One slice of a model; ``forward(**payload) -> dict[str, Tensor]``.

    ``index``/``n_stages`` place it in the pipeline; ``layer_range`` lists the repeated blocks
    (decoder layers, or ``nn.Sequential`` children) it owns; ``row`` is its :class:`Family`
    and ``family`` that row's name. ``loaded_keys`` holds the checkpoint keys
    :func:`~engram_ray.models.stages.load_stage` read for it (empty for ``split_model``).
    """

    def __init__(self, family: Family, *, index: int, n_stages: int, layer_range: range) -> None:
        super().__init__()
        if not 0 <= index < n_stages:
            raise ValueError(f"stage index {index} out of range for {n_stages} stage(s)")
        self.row = family
        self.index = index
        self.n_stages = n_stages
        self.layer_range = layer_range
        self.loaded_keys: frozenset[str] = frozenset()

    @property
    def family(self) -> str:
        return self.row.name

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    def get_input_embeddings(self) -> nn.Module | None:
        """The token embedding when this stage owns it (HF-style accessor)."""
        return None

    def get_output_embeddings(self) -> nn.Module | None:
        """The output layer (``lm_head``) when this stage owns it, so ``"all-linear"``
        selections can leave it out exactly as for the unsplit model."""
        return None

    def extra_repr(self) -> str:
        r = self.layer_range
        return f"family={self.family!r}, index={self.index}, n_stages={self.n_stages}, layers=[{r.start}, {r.stop})"


def decoder_payload(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What a non-last LM stage hands on: ``hidden_states`` (B, T, H), the ``(B, T)``
    ``attention_mask`` and explicit ``position_ids`` when given; tensors only, no ``None``."""
    out = {"hidden_states": hidden_states}
    if attention_mask is not None:
        out["attention_mask"] = attention_mask
    if position_ids is not None:
        out["position_ids"] = position_ids
    return out


def layer_type(config, i: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"``: the mask decoder layer ``i`` uses."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def _mask_function(kind: str):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    functions = {
        "full_attention": create_causal_mask,
        "sliding_attention": create_sliding_window_causal_mask,
    }
    if kind not in functions:
        raise ValueError(f"unsupported decoder layer type {kind!r}; expected {sorted(functions)}")
    return functions[kind]


def _positions(position_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``position_ids``, else ``arange(T)`` as ``(1, T)`` on ``x``'s device."""
    if position_ids is not None:
        return position_ids
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at the dotted ``path`` under ``root``, creating plain containers."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if name not in node._modules:
            node.add_module(name, nn.Module())
        node = node._modules[name]
    node.add_module(leaf, module)


class DecoderStage(Stage):
    """Blocks ``layer_range`` of a decoder-only causal LM, under the model's own names.

    Stage 0 also owns the token embedding (and a learned position embedding and embedding
    dropout); the last stage the final norm and the head; every stage a rotary module. Blocks
    sit in an ``nn.ModuleDict`` keyed by their original index, so ``model.layers.3.…`` keeps its
    name in any stage. Which paths those are is the :class:`Family` row's business.
    """

    def __init__(
        self, model: nn.Module, family: Family, *, index: int, n_stages: int, layer_range: range
    ) -> None:
        super().__init__(family, index=index, n_stages=n_stages, layer_range=layer_range)
        self.config = model.config
        for path in self._owned():
            module = get_path(model, path)
            if path == family.blocks:
                module = nn.ModuleDict({str(i): module[i] for i in layer_range})
            _attach(self, path, module)

    def _owned(self) -> list[str]:
        """The paths this stage holds, in the unsplit model's registration order."""
        f = self.row
        rotary = f.positions == "rotary"
        first = [f.embed, "" if rotary else f.position_module, f.dropout] if self.is_first else []
        last = [f.norm] if self.is_last else []
        shared = [f.position_module] if rotary else []
        head = [f.head] if self.is_last else []
        return [p for p in [*first, f.blocks, *last, *shared, *head] if p]

    def part(self, path: str) -> nn.Module:
        return self.get_submodule(path)

    def get_input_embeddings(self) -> nn.Module | None:
        return self.part(self.row.embed) if self.is_first else None

    def get_output_embeddings(self) -> nn.Module | None:
        return self.part(self.row.head) if self.is_last else None

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Stage 0: token embeddings (B, T, H), plus learned positions, then dropout."""
        f = self.row
        h = self.part(f.embed)(input_ids)
        if f.positions == "learned":
            pos = _positions(position_ids, input_ids)
            h = h + self.part(f.position_module)(pos).to(h.device)
        return self.part(f.dropout)(h) if f.dropout else h

    def block_kwargs(self, h: torch.Tensor, pos: torch.Tensor) -> dict[str, Any]:
        """Inputs every block of this stage gets besides ``attention_mask``/``position_ids``."""
        if self.row.positions == "rotary":
            return {"position_embeddings": self.part(self.row.position_module)(h, pos)}
        return {}

    def causal_masks(
        self, h: torch.Tensor, attention_mask: torch.Tensor | None, pos: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """Layer type → its (B, 1, T, T) mask, or None when plain causal suffices."""
        masks: dict[str, torch.Tensor | None] = {}
        for i in self.layer_range:
            kind = layer_type(self.config, i)
            if kind not in masks:
                masks[kind] = _mask_function(kind)(
                    config=self.config,
                    inputs_embeds=h,
                    attention_mask=attention_mask,
                    past_key_values=None,
                    position_ids=pos,
                )
        return masks

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.is_first:
            if input_ids is None:
                raise ValueError("stage 0 takes `input_ids` (B, T)")
            hidden_states = self.embed(input_ids, position_ids)  # (B, T, H)
        elif hidden_states is None:
            raise ValueError(
                f"stage {self.index} takes `hidden_states` from stage {self.index - 1}"
            )
        h = hidden_states
        pos = _positions(position_ids, h)  # (1 or B, T)
        masks = self.causal_masks(h, attention_mask, pos)
        extra = self.block_kwargs(h, pos)
        blocks = self.part(self.row.blocks)
        for i in self.layer_range:
            mask = masks[layer_type(self.config, i)]
            h = blocks[str(i)](h, attention_mask=mask, position_ids=pos, **extra)
        if self.is_last:
            return {"logits": self.part(self.row.head)(self.part(self.row.norm)(h))}  # (B, T, V)
        return decoder_payload(h, attention_mask, position_ids)
