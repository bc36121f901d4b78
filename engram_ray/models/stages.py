"""Model-parallel stages: a model cut into ``n_stages`` contiguous slices, each its own module.

Pipeline parallelism runs stage ``i`` on its own worker and streams activations from stage
``i`` to ``i+1``. Each stage is an ``nn.Module`` that owns only its slice but keeps the full
model's dotted names for it (``model.layers.3.self_attn.q_proj``, ``lm_head``, ``2``): the
statistics and engrams a stage computes are stored by module name, so they must read exactly
as the unsplit model's. A stage's ``state_dict`` therefore uses checkpoint names too, which is
what lets :func:`load_stage` read only its own tensors.

Families (:func:`stage_family`):

- ``"llama"``: Llama, Mistral, Qwen2, Qwen3 causal LMs (:mod:`engram_ray.models.llama`);
- ``"gpt2"``: ``GPT2LMHeadModel`` (:mod:`engram_ray.models.gpt2`);
- ``"sequential"``: any ``nn.Sequential``, children split contiguously;
- ``"single"``: anything else runs whole, as one stage.

Stage protocol: ``stage(**payload) -> dict`` of tensors. Stage 0 takes the model inputs
(``input_ids`` + ``attention_mask`` for LMs, ``x`` for ``nn.Sequential``); stage ``i>0`` takes
exactly what stage ``i-1`` returned; the last stage returns ``{"logits": …}``. The family
modules document their payloads.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from engram_ray.io.storage import StorageOptions
from engram_ray.models.loading import (
    ModelSpec,
    as_dtype,
    build_empty,
    call_factory,
    load_config,
    load_model,
    open_checkpoint,
    tied_aliases,
)
from engram_ray.models.weights import materialize

__all__ = [
    "FAMILIES",
    "Stage",
    "assign_layers",
    "decoder_payload",
    "load_stage",
    "split_model",
    "stage_family",
]

FAMILIES = ("llama", "gpt2", "sequential", "single")

# Supported causal-LM classes (matched by name along the MRO, so transformers is not imported
# for plain torch models) and the config ``model_type``s that build them.
_LLAMA_CLASSES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
_LLAMA_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_GPT2_CLASSES = {"GPT2LMHeadModel"}
_GPT2_TYPES = {"gpt2"}


def assign_layers(n_layers: int, n_stages: int) -> list[range]:
    """Split layers ``0..n_layers-1`` into ``n_stages`` contiguous ranges, sizes within one.

    The first ``n_layers % n_stages`` stages take one extra layer. With more stages than layers
    the trailing ranges are empty (a last stage with only the final norm and lm_head is valid).
    """
    if not isinstance(n_layers, int) or n_layers < 0:
        raise ValueError(f"n_layers must be an int >= 0, got {n_layers!r}")
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for i in range(n_stages):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


class Stage(nn.Module):
    """One slice of a model; ``forward(**payload) -> dict[str, Tensor]``.

    ``index``/``n_stages`` place it in the pipeline; ``layer_range`` lists the repeated blocks
    (decoder layers, or ``nn.Sequential`` children) it owns. ``loaded_keys`` holds the
    checkpoint keys :func:`load_stage` read for it (empty for :func:`split_model`).
    """

    family: ClassVar[str] = ""

    def __init__(self, *, index: int, n_stages: int, layer_range: range) -> None:
        super().__init__()
        if not 0 <= index < n_stages:
            raise ValueError(f"stage index {index} out of range for {n_stages} stage(s)")
        self.index = index
        self.n_stages = n_stages
        self.layer_range = layer_range
        self.loaded_keys: frozenset[str] = frozenset()

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


def _mro_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _has_path(obj: Any, *paths: str) -> bool:
    for path in paths:
        o = obj
        for part in path.split("."):
            o = getattr(o, part, None)
            if o is None:
                return False
    return True


def stage_family(obj: Any, storage_options: StorageOptions | None = None) -> str:
    """``"llama"``, ``"gpt2"``, ``"sequential"`` or ``"single"`` for a model, HF config or spec.

    A spec is resolved cheaply: its config for HF directories, a meta-device build for
    factories. Models are matched by class and checked for the expected submodules.
    """
    if isinstance(obj, ModelSpec):
        obj = load_config(obj, storage_options) if obj.path is not None else build_empty(obj)
    if isinstance(obj, nn.Sequential):
        return "sequential"
    if isinstance(obj, nn.Module):
        names = _mro_names(obj)
        if names & _LLAMA_CLASSES and _has_path(
            obj, "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"
        ):
            return "llama"
        if names & _GPT2_CLASSES and _has_path(
            obj,
            "transformer.wte",
            "transformer.wpe",
            "transformer.h",
            "transformer.ln_f",
            "lm_head",
        ):
            return "gpt2"
        return "single"
    model_type = getattr(obj, "model_type", None)
    if model_type in _LLAMA_TYPES:
        return "llama"
    if model_type in _GPT2_TYPES:
        return "gpt2"
    return "single"


def _make_stage(model: nn.Module, family: str, index: int, n_stages: int) -> Stage:
    # Family modules import transformers; import them only for the models that need them.
    if family == "llama":
        from engram_ray.models.llama import DecoderStage as cls

        n_layers = len(model.model.layers)
    elif family == "gpt2":
        from engram_ray.models.gpt2 import GPT2Stage as cls

        n_layers = len(model.transformer.h)
    elif family == "sequential":
        from engram_ray.models.sequential import SequentialStage as cls

        n_layers = len(model)
    elif family == "single":
        from engram_ray.models.sequential import SingleStage

        if n_stages != 1:
            raise ValueError(
                f"{type(model).__name__} is not in a splittable family {FAMILIES[:3]}: it runs "
                f"as a single stage, so n_stages must be 1 (got {n_stages})"
            )
        return SingleStage(model)
    else:
        raise ValueError(f"unknown stage family {family!r}; expected one of {FAMILIES}")
    layers = assign_layers(n_layers, n_stages)[index]
    return cls(model, index=index, n_stages=n_stages, layer_range=layers)


def split_model(model: nn.Module, n_stages: int) -> list[Stage]:
    """Cut an in-memory model into stages that share (do not copy) its modules.

    A model outside the splittable families comes back as one stage (the list is shorter than
    ``n_stages``); check :func:`stage_family` first where the count matters.
    """
    assign_layers(0, n_stages)  # validates n_stages
    family = stage_family(model)
    count = 1 if family == "single" else n_stages
    stages = [_make_stage(model, family, i, count) for i in range(count)]
    for s in stages:
        s.training = model.training  # the wrapper only; owned modules keep their own mode
    return stages


def load_stage(
    spec: ModelSpec,
    index: int,
    n_stages: int,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    storage_options: StorageOptions | None = None,
) -> Stage:
    """Build stage ``index`` of ``n_stages`` and read only its own tensors from the checkpoint.

    The full model is built with meta-device parameters (no memory), the stage keeps its slice,
    and :func:`~engram_ray.models.weights.materialize` reads exactly the tensors that slice
    holds (a tied ``lm_head`` from the input embedding's key) straight onto ``device``; shards
    holding none of them are never opened (nor downloaded). ``dtype`` None keeps the
    checkpoint's dtype (the config's, as transformers 5's ``"auto"``). Models of the
    ``"single"`` family load whole (``n_stages`` must be 1). Returns the stage in eval mode.
    """
    assign_layers(0, n_stages)
    if not 0 <= index < n_stages:
        raise ValueError(f"stage index {index} out of range for {n_stages} stage(s)")
    dtype = as_dtype(dtype)
    skeleton = build_empty(spec, storage_options, dtype)
    family = stage_family(skeleton)
    if family == "single":
        _make_stage(skeleton, family, index, n_stages)  # raises unless n_stages == 1
        model = load_model(spec, storage_options, dtype).to(device)
        return _make_stage(model, family, 0, 1).eval()
    if spec.factory is not None and spec.weights is None:
        # No checkpoint: the factory's own (seeded) initialization is the model.
        model = call_factory(spec)
        stage = _make_stage(model, family, index, n_stages)
        return stage.to(device=device, dtype=dtype).eval()
    checkpoint = open_checkpoint(spec, storage_options)
    stage = _make_stage(skeleton, family, index, n_stages)
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    read = materialize(
        stage,
        checkpoint,
        device=device,
        dtype=dtype,
        aliases=tied_aliases(skeleton),
        prefixes=(prefix,) if prefix else (),
    )
    stage.loaded_keys = frozenset(read)
    return stage.eval()
