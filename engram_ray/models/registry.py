"""The family table: one :class:`~engram_ray.models.base.Family` row per kind of model.

A row says which HF classes (matched by name along the MRO, so transformers is never imported
for plain torch models) and config ``model_type``s it serves, where the model keeps its token
embedding, blocks, final norm and head, how positions enter (``"rotary"`` or ``"learned"``),
and which :class:`~engram_ray.models.base.Stage` class cuts it. Per-model facts are data here,
as HF PEFT keeps its per-model target modules in mapping tables, and the code that reads them
(:class:`~engram_ray.models.base.DecoderStage`, :func:`family_of`) holds no per-family branch.

Adding a decoder family means adding a row, plus a small :class:`DecoderStage` subclass only
for a genuine quirk. Rows are tried in order; a module matching none is ``"single"`` (it runs
whole), as is a config whose ``model_type`` no row lists.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from engram_ray.models.base import DecoderStage, Family
from engram_ray.models.sequential import SequentialStage, SingleStage

__all__ = ["FAMILIES", "SINGLE", "TABLE", "family_named", "family_of"]

LLAMA = Family(
    name="llama",
    stage=DecoderStage,
    classes=frozenset(
        {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    ),
    model_types=frozenset({"llama", "mistral", "qwen2", "qwen3"}),
    embed="model.embed_tokens",
    blocks="model.layers",
    norm="model.norm",
    head="lm_head",
    positions="rotary",
    position_module="model.rotary_emb",
)

GPT2 = Family(
    name="gpt2",
    stage=DecoderStage,  # its linear layers are transformers' Conv1D; the stage does not care
    classes=frozenset({"GPT2LMHeadModel"}),
    model_types=frozenset({"gpt2"}),
    embed="transformer.wte",
    blocks="transformer.h",
    norm="transformer.ln_f",
    head="lm_head",  # tied to wte: HF checkpoints store it once, as transformer.wte.weight
    positions="learned",
    position_module="transformer.wpe",
    dropout="transformer.drop",
)

SEQUENTIAL = Family(name="sequential", stage=SequentialStage, module_type=nn.Sequential, blocks="")

SINGLE = Family(name="single", stage=SingleStage)  # the fallback: anything else runs whole

TABLE: tuple[Family, ...] = (LLAMA, GPT2, SEQUENTIAL, SINGLE)

FAMILIES = tuple(row.name for row in TABLE)


def family_named(name: str) -> Family:
    """The row called ``name``; a ``ValueError`` lists the known families."""
    for row in TABLE:
        if row.name == name:
            return row
    raise ValueError(f"unknown stage family {name!r}; expected one of {FAMILIES}")


def family_of(obj: Any) -> Family:
    """The row for a model (by class and parts) or an HF config (by ``model_type``)."""
    if isinstance(obj, nn.Module):
        names = {c.__name__ for c in type(obj).__mro__}
        return next((row for row in TABLE if row.matches_module(obj, names)), SINGLE)
    model_type = getattr(obj, "model_type", None)
    return next((row for row in TABLE if model_type in row.model_types), SINGLE)
