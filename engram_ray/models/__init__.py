"""Loading models, whole or as model-parallel stages that keep the full model's module names.

- :mod:`~engram_ray.models.loading`: :class:`ModelSpec`, :func:`load_model`, :func:`load_tokenizer`;
- :mod:`~engram_ray.models.stages`: :func:`split_model`, :func:`load_stage`, :func:`stage_family`,
  :func:`assign_layers`, :class:`Stage` (families in ``llama``, ``gpt2``, ``sequential``);
- :mod:`~engram_ray.models.weights`: key-selective safetensors reads;
- :mod:`~engram_ray.models.tiny`: tiny HF models for tests and demos.

transformers is imported only where an HF model is built or run.
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
