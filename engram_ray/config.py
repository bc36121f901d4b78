"""The extraction config: one YAML file, validated, with dotted ``--set key=value`` overrides.

::

    model:    {path: DIR-or-URI}                   # or {factory, kwargs, weights}
    data:     {paths: [...], concept_column, text_column | prompt_column + answer_column
               | features_column, max_length, batch_size, storage_options}
    select:   {target_modules, layers_to_transform, absorb_bias, share_inputs, gram_dtype,
               low_rank}
    solver:   {rtol, condition_cap, rank_fraction, ridge}
    parallel: {stages, replicas, address, num_cpus, num_gpus, max_in_flight, placement,
               encode_num_cpus, encode_concurrency, solver_num_cpus, solver_num_gpus, dtype}
    store:    {uri, run_id, storage_options, overwrite, keep_statistics, extend,
               checkpoint_shards}

Unknown keys anywhere are errors naming the full dotted key, so a typo never falls back to a
default silently. Every section is a keyword-only dataclass validated in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import fs as fsx
from .data import DataConfig
from .models.loading import ModelSpec
from .solve import SolverConfig

__all__ = [
    "ExtractConfig",
    "ParallelConfig",
    "SelectConfig",
    "StoreConfig",
    "apply_overrides",
    "load_config",
]


class ConfigError(ValueError):
    """A config problem; the message names the dotted key."""


@dataclass(kw_only=True)
class SelectConfig:
    target_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    absorb_bias: bool = True
    share_inputs: bool = True
    gram_dtype: str = "float64"  # float32: half the cost, batching-dependent at ~1e-4
    # Keep concepts with ≤ D/2 tokens as raw rows and store their engrams as exact rank-n_c
    # factors (fewer flops and bytes); false: dense Gram blocks and dense engrams for all.
    low_rank: bool = True

    def __post_init__(self) -> None:
        if self.gram_dtype not in ("float32", "float64"):
            raise ConfigError(f"select.gram_dtype must be float32 or float64, got {self.gram_dtype!r}")


@dataclass(kw_only=True)
class ParallelConfig:
    stages: int = 1
    replicas: int = 1
    address: str | None = None  # None: start (or join) a local Ray
    num_cpus: float = 1.0  # per stage actor
    num_gpus: float = 0.0  # per stage actor; > 0 runs the stage on CUDA
    max_in_flight: int = 4  # micro-batches in flight per replica (bounds memory, overlaps stages)
    placement: str = "spread"  # "spread" stage actors over nodes, or "pack" them
    encode_num_cpus: float = 1.0  # per tokenization task of Ray Data's map_batches
    # Tokenization tasks at once (None: as many as fit). Each new worker imports transformers
    # (seconds of CPU): on a small machine a cap keeps that storm off the stage actors' cores.
    encode_concurrency: int | None = None
    solver_num_cpus: float = 1.0
    solver_num_gpus: float = 0.0
    dtype: str | None = None  # e.g. "bfloat16" for the stage weights; Σ stays fp32→fp64

    def __post_init__(self) -> None:
        for key in ("stages", "replicas", "max_in_flight"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"parallel.{key} must be an integer ≥ 1, got {v!r}")
        for key in ("num_cpus", "num_gpus", "encode_num_cpus", "solver_num_cpus",
                    "solver_num_gpus"):
            if getattr(self, key) < 0:
                raise ConfigError(f"parallel.{key} must be ≥ 0")
        if self.placement not in ("spread", "pack"):
            raise ConfigError(f"parallel.placement must be 'spread' or 'pack', got {self.placement!r}")


@dataclass(kw_only=True)
class StoreConfig:
    uri: str = "runs"
    run_id: str | None = None  # None: a fresh time-stamped id
    storage_options: dict[str, Any] | None = None
    overwrite: bool = False
    keep_statistics: bool = False  # store Σ in the run so new shards can be merged in later
    # A committed run that kept its Σ: read only the shards it has not counted, merge, re-solve
    # (the new run keeps its Σ too, so it can be extended again).
    extend: str | None = None
    # Ray pipeline: feed the shards N at a time and checkpoint the Σ so far after each slice
    # under <uri>/_checkpoints/<run_id>; rerunning with the same run_id resumes (resume.py).
    checkpoint_shards: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_shards is not None and self.checkpoint_shards < 1:
            raise ConfigError(f"store.checkpoint_shards must be ≥ 1, got {self.checkpoint_shards}")
        if self.checkpoint_shards is not None and self.run_id is None:
            raise ConfigError("store.checkpoint_shards needs a fixed store.run_id: a rerun "
                              "finds its checkpoint by it")
        if self.checkpoint_shards is not None and self.extend is not None:
            raise ConfigError("store.checkpoint_shards and store.extend cannot be combined yet")

    def run_uri(self, run_id: str) -> str:
        return fsx.join(self.uri, run_id)


@dataclass(kw_only=True)
class ExtractConfig:
    model: ModelSpec
    data: DataConfig
    select: SelectConfig = field(default_factory=SelectConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if hasattr(v, "to_dict") else dataclasses.asdict(v)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExtractConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError("the config must be a mapping with sections model, data, …")
        sections = {
            "model": ModelSpec,
            "data": DataConfig,
            "select": SelectConfig,
            "solver": SolverConfig,
            "parallel": ParallelConfig,
            "store": StoreConfig,
        }
        _reject_unknown(raw, sections, "")
        for required in ("model", "data"):
            if required not in raw:
                raise ConfigError(f"config section {required!r} is missing")
        built = {name: _build(name, typ, raw.get(name) or {}) for name, typ in sections.items()
                 if name in raw}
        return cls(**built)


def _reject_unknown(raw: Mapping, known: Sequence[str] | Mapping, prefix: str) -> None:
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            more = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{more} "
                              f"(known: {sorted(known)})")


def _build(name: str, typ, values: Mapping[str, Any]):
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(typ)]
    _reject_unknown(values, names, f"{name}.")
    try:
        return typ(**dict(values))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {name!r}: {e}") from e


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML: numbers, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, _, text = item.partition("=")
        value = yaml.safe_load(text) if text else None
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = value
    return raw


def load_config(path: str, overrides: Sequence[str] = ()) -> ExtractConfig:
    """Read a YAML config file (local or ``s3://``), apply overrides, validate."""
    try:
        with fsx.filesystem(path).open(path, "r") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    return ExtractConfig.from_dict(apply_overrides(raw, overrides))
