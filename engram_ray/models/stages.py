"""Model-parallel stages: a model cut into ``n_stages`` contiguous slices, each its own module.

Pipeline parallelism runs stage ``i`` on its own worker and streams activations from stage
``i`` to ``i+1``. Each stage keeps the full model's dotted names for its slice (see
:mod:`engram_ray.models.base`), so a stage's ``state_dict`` uses checkpoint names too, which is
what lets :func:`load_stage` read only its own tensors.

Families (:func:`stage_family`) are rows of :mod:`engram_ray.models.registry`:

- ``"llama"``: Llama, Mistral, Qwen2, Qwen3 causal LMs (rotary positions);
- ``"gpt2"``: ``GPT2LMHeadModel`` (learned positions);
- ``"sequential"``: any ``nn.Sequential``, children split contiguously;
- ``"single"``: anything else runs whole, as one stage.

Stage protocol: ``stage(**payload) -> dict`` of tensors. Stage 0 takes the model inputs
(``input_ids`` + ``attention_mask`` for LMs, ``x`` for ``nn.Sequential``); stage ``i>0`` takes
exactly what stage ``i-1`` returned; the last stage returns ``{"logits": …}``.
:mod:`~engram_ray.models.base` and :mod:`~engram_ray.models.sequential` document the payloads.
This module only dispatches through the table: it holds no per-family code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import nn

from engram_ray.io.storage import StorageOptions
from engram_ray.models.base import Family, Stage, decoder_payload
from engram_ray.models.loading import (
    ModelSpec,
    as_dtype,
    build_empty,
    call_factory,
    load_model,
    load_model_config,
    model_dir,
    open_weights,
    tied_aliases,
)
from engram_ray.models.native import NativeDecoderStage, native_model
from engram_ray.models.registry import FAMILIES, TABLE, family_of
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


def stage_family(obj: Any, storage_options: StorageOptions | None = None) -> str:
    """``"llama"``, ``"gpt2"``, ``"sequential"`` or ``"single"`` for a model, HF config or spec.

    A spec is resolved cheaply: its config for HF directories, a meta-device build for
    factories. Models are matched by class and checked for the row's parts
    (:func:`~engram_ray.models.registry.family_of`).
    """
    if isinstance(obj, ModelSpec):
        if obj.path is not None:
            obj = load_model_config(obj, storage_options)
        else:
            obj = build_empty(obj)
    return family_of(obj).name


def _make_stage(model: nn.Module, row: Family, index: int, n_stages: int) -> Stage:
    if not row.splittable and n_stages != 1:
        splittable = tuple(r.name for r in TABLE if r.splittable)
        raise ValueError(
            f"{type(model).__name__} is not in a splittable family {splittable}: it runs "
            f"as a single stage, so n_stages must be 1 (got {n_stages})"
        )
    layers = assign_layers(row.n_blocks(model), n_stages)[index]
    return row.stage(model, row, index=index, n_stages=n_stages, layer_range=layers)


def split_model(model: nn.Module, n_stages: int) -> list[Stage]:
    """Cut an in-memory model into stages that share (do not copy) its modules.

    A model outside the splittable families comes back as one stage (the list is shorter than
    ``n_stages``); check :func:`stage_family` first where the count matters.
    """
    assign_layers(0, n_stages)  # validates n_stages
    row = family_of(model)
    count = n_stages if row.splittable else 1
    stages = [_make_stage(model, row, i, count) for i in range(count)]
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
    holding none of them are never opened (nor downloaded). An HF directory whose
    architecture :mod:`~engram_ray.models.native` covers is built in plain torch from its
    ``config.json`` (no transformers import; ``ENGRAM_RAY_NATIVE=0`` turns this off), any other
    through transformers. ``dtype`` None keeps the
    checkpoint's dtype (the config's, as transformers 5's ``"auto"``). Models of the
    ``"single"`` family load whole (``n_stages`` must be 1). Returns the stage in eval mode.
    """
    assign_layers(0, n_stages)
    if not 0 <= index < n_stages:
        raise ValueError(f"stage index {index} out of range for {n_stages} stage(s)")
    dtype = as_dtype(dtype)
    skeleton = _native_skeleton(spec, storage_options, dtype)
    if skeleton is not None:
        row = dataclasses.replace(family_of(skeleton.config), stage=NativeDecoderStage)
    else:
        skeleton = build_empty(spec, storage_options, dtype)
        row = family_of(skeleton)
    if not row.splittable:
        _make_stage(skeleton, row, index, n_stages)  # raises unless n_stages == 1
        model = load_model(spec, storage_options, dtype).to(device)
        return _make_stage(model, row, 0, 1).eval()
    if spec.factory is not None and spec.weights is None:
        # No checkpoint: the factory's own (seeded) initialization is the model.
        model = call_factory(spec)
        stage = _make_stage(model, row, index, n_stages)
        return stage.to(device=device, dtype=dtype).eval()
    weights = open_weights(spec, storage_options)
    stage = _make_stage(skeleton, row, index, n_stages)
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    read = materialize(
        stage,
        weights,
        device=device,
        dtype=dtype,
        aliases=tied_aliases(skeleton),
        prefixes=(prefix,) if prefix else (),
    )
    stage.loaded_keys = frozenset(read)
    return stage.eval()


def _native_skeleton(spec: ModelSpec, storage_options: StorageOptions | None,
                     dtype: torch.dtype | None) -> nn.Module | None:
    """The pure-torch skeleton of an HF directory's model, or None (use transformers)."""
    if spec.path is None or os.environ.get("ENGRAM_RAY_NATIVE", "1") == "0":
        return None
    local = model_dir(spec.path, storage_options, weights=False)
    with open(os.path.join(local, "config.json")) as f:
        config = json.load(f)
    return native_model(config, dtype) if isinstance(config, dict) else None
