"""Loading models, whole or as model-parallel stages that keep the full model's module names.

- :mod:`~engram_ray.models.loading`: :class:`ModelSpec`, :func:`load_model`,
  :func:`load_model_config`, :func:`load_tokenizer` (transformers never runs a model
  directory's own code: ``trust_remote_code=False`` throughout);
- :mod:`~engram_ray.models.stages`: :func:`split_model`, :func:`load_stage`, :func:`stage_family`,
  :func:`assign_layers`: cutting a model into pipeline stages, dispatched through the table;
- :mod:`~engram_ray.models.registry`: the family table, one row per kind of model (``llama``,
  ``gpt2``, ``sequential``, ``single``): its HF classes and ``model_type``s, part paths and
  position handling; adding a decoder family is adding a row;
- :mod:`~engram_ray.models.base`: :class:`Stage`, the row type ``Family`` and the one
  ``DecoderStage`` every decoder family runs on; :mod:`~engram_ray.models.sequential`: the
  ``nn.Sequential`` and whole-model stages;
- :mod:`~engram_ray.models.native`: the llama/mistral/qwen2/qwen3 and GPT-2 forward in plain
  torch, built from ``config.json``, so a stage runs them without importing transformers;
- :mod:`~engram_ray.models.weights`: :class:`~engram_ray.models.weights.WeightFiles`,
  key-selective safetensors reads;
- :mod:`~engram_ray.models.tiny`: tiny HF models for tests and demos.

Imports run one way, base → sequential → registry → stages (loading and weights beside them),
so no module imports one that imports it back. transformers is imported only where an HF model
is built or run whole, or for a stage of an architecture native does not cover.
"""

from engram_ray.models.loading import ModelSpec, load_model, load_tokenizer
from engram_ray.models.stages import (
    FAMILIES,
    Stage,
    assign_layers,
    load_stage,
    split_model,
    stage_family,
)

__all__ = [
    "FAMILIES",
    "ModelSpec",
    "Stage",
    "assign_layers",
    "load_model",
    "load_stage",
    "load_tokenizer",
    "split_model",
    "stage_family",
]
