"""A committed run bound to its base model: engrams are formed on read, so they need ``W_m``.

A run (format 3) stores each input group's spectrum and each concept's statistics; the
engram ``W⁺_c = W_m Σ_c Σ⁺`` is formed from them and the base weight ``W_m`` when it is asked
for (``io/store.py``). :func:`open_run` opens a run and binds, lazily (nothing is loaded until
the first engram), the model the run recorded, or the one given:

- ``model=None``: the run's own ``model`` config (a directory, an ``s3://`` URI, or a factory);
- ``model="DIR-or-URI"``: the same model moved elsewhere; ``model="pkg.mod:fn"``: a factory
  replacing the run's (keeping its kwargs and weights);
- ``model=nn.Module``: an in-memory model (the Python API's ``extract`` binds the module it
  was given).

Every weight read is checked against the digest the run recorded at extraction (the module's
(out, D) float64 matrix, bias column included), so a changed model is refused, naming the
module. Checkpoints are read tensor by tensor (:class:`~engram_ray.models.weights.WeightFiles`),
never whole, and each tensor is cast to the dtype the extraction's model had (the parameter's
dtype in the model built from the config, or ``parallel.dtype``): the weight the engram was
computed with, bit for bit.

Factories: a run naming a factory (``"pkg.module:callable"``) would import and run that code,
so it is refused unless the caller consents (``trust_factory=True``, or the model given again);
the factories shipped in :mod:`engram_ray.models` (:data:`BUILTIN_FACTORIES`) are the exception.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from engram_ray.config import ModelSpec, SolverConfig
from engram_ray.core.layers import as_matrix, weight_matrix
from engram_ray.io.storage import Location, Storage, as_storage
from engram_ray.io.store import Run

__all__ = ["BUILTIN_FACTORIES", "ModelBinder", "adapter_base", "bind_module", "check_trusted",
           "edit_device", "model_at", "open_run", "recorded_checkpoint", "run_dtype",
           "run_model_spec"]

# Factories shipped with engram-ray that only construct a module from numbers: running them
# runs no code a run.json could choose. Any other factory needs the user's consent.
BUILTIN_FACTORIES = frozenset({
    "engram_ray.models.sequential:mlp",
    "engram_ray.models.tiny:tiny_llama",
    "engram_ray.models.tiny:tiny_gpt2",
})
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def run_model_spec(run: Run, model: str | None = None) -> ModelSpec:
    """The model a run was extracted from, as data (nothing is imported here).

    ``model`` overrides it: a directory or URI, or a factory ``"pkg.module:callable"`` that
    replaces the run's own factory (keeping the run's ``kwargs`` and ``weights``).
    """
    recorded = (run.info.get("config") or {}).get("model")
    if model is not None:
        if _FACTORY.fullmatch(model) and not os.path.exists(model):
            kept = {k: v for k, v in (recorded or {}).items() if k in ("kwargs", "weights")}
            return ModelSpec(factory=model, **kept) if "factory" in (recorded or {}) \
                else ModelSpec(factory=model)
        return ModelSpec(path=model)
    if not recorded:
        raise ValueError(f"run {run.uri} does not record its model; pass --model")
    return ModelSpec.from_dict(recorded)


def check_trusted(spec: ModelSpec, run_uri: str, *, given: bool, trust_factory: bool) -> None:
    """Refuse to import a factory the run names unless the user consented (module docstring):
    the message names the factory and the flags that consent."""
    if spec.factory is None or given or trust_factory or spec.factory in BUILTIN_FACTORIES:
        return
    raise PermissionError(
        f"run {run_uri} builds its model with factory {spec.factory!r}, which would import and "
        "run that code; pass --trust-factory if you trust the run's author, or --model "
        f"{spec.factory} to name it yourself")


class _ModuleWeights:
    """Weights of an in-memory model."""

    allow_other = False  # True: not checked against the run's digests (--allow-other-weights)

    def __init__(self, model: nn.Module, where: str) -> None:
        self.model, self.where = model, where
        first = next(iter(model.parameters()), None)
        # Engrams are formed where the model lives (a CUDA model: on its GPU).
        self.device = first.device if first is not None else torch.device("cpu")

    def matrix(self, module: str, bias: bool) -> torch.Tensor:
        try:
            sub = self.model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"module {module!r} of the run is not in {self.where}") from None
        return weight_matrix(sub, bias)


class _CheckpointWeights:
    """Weights of an HF checkpoint, read tensor by tensor and cast to the dtype the
    extraction's model held them in (module docstring).

    ``recorded``: the run's ``checkpoint`` record (``models.outline.checkpoint_layout``: each
    tensor's dtype, the tied aliases) and its modules' kinds and shapes; the tensors are then
    read by key with no model built (no transformers import: seconds per edit process). Runs
    without one, and a model given with other weights, build the model on the meta device
    from its config for the same facts."""

    allow_other = False

    def __init__(self, spec: ModelSpec, storage_options, dtype,
                 device: torch.device | str = "cpu", recorded: Mapping | None = None,
                 location: Location | None = None) -> None:
        from engram_ray.models.loading import open_weights

        self.where, self.device = spec.path, torch.device(device)
        self.recorded = recorded
        if recorded is None:
            from engram_ray.models.loading import build_empty, tied_aliases

            self.empty = build_empty(spec, storage_options, dtype=dtype, location=location)
            self.aliases = tied_aliases(self.empty)
        else:
            self.aliases = dict(recorded["checkpoint"].get("aliases") or {})
        self.files = open_weights(spec, storage_options, location=location)

    def matrix(self, module: str, bias: bool) -> torch.Tensor:
        if self.recorded is not None:
            return self._recorded_matrix(module, bias)
        try:
            sub = self.empty.get_submodule(module)
        except AttributeError:
            raise ValueError(f"module {module!r} of the run is not in model {self.where}") from None
        for part in ("weight", "bias") if bias else ("weight",):
            meta = getattr(sub, part, None)
            if meta is None:
                continue
            tensor = self._read(module, part).to(meta.dtype)
            setattr(sub, part, nn.Parameter(tensor, requires_grad=False))
        return weight_matrix(sub, bias)

    def _recorded_matrix(self, module: str, bias: bool) -> torch.Tensor:
        from engram_ray.models.loading import as_dtype

        info = self.recorded["modules"][module]
        dtypes = self.recorded["checkpoint"]["dtypes"]
        parts = {}
        for part in ("weight", "bias") if bias else ("weight",):
            key = f"{module}.{part}"
            if key not in dtypes:
                raise ValueError(f"run records no dtype for tensor {key!r} (module {module!r})")
            parts[part] = self._read(module, part).to(as_dtype(dtypes[key]))
        shape = tuple(info["weight_shape"])
        if tuple(parts["weight"].shape) != shape:
            raise ValueError(f"module {module!r}: model {self.where} holds a weight of shape "
                             f"{tuple(parts['weight'].shape)}, the run one of {shape}")
        return as_matrix(parts["weight"], parts.get("bias"), info["kind"])

    def _read(self, module: str, part: str) -> torch.Tensor:
        key = f"{module}.{part}"
        key = key if key in self.files else self.aliases.get(key, key)
        if key not in self.files:
            raise ValueError(f"model {self.where} has no tensor {key!r} (module {module!r} "
                             "of the run)")
        return self.files.read([key], self.device)[key]


def recorded_checkpoint(run: Run) -> dict | None:
    """What the run recorded of its checkpoint (``checkpoint``: tensor dtypes and tied
    aliases; ``modules``: kinds and shapes), or None for a run without that record."""
    if not run.info.get("checkpoint"):
        return None
    return {"checkpoint": run.info["checkpoint"], "modules": run.info.get("modules") or {}}


def edit_device(name: str = "cpu") -> str:
    """The device an edit is formed on: ``name``, with ``auto`` a GPU when torch sees one
    (float64 matmuls: fast on data-center GPUs, slower on consumer cards, still above a CPU)."""
    from engram_ray.devices import resolve_device

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(resolve_device(name, key="--device"))


def run_dtype(run: Run) -> str | None:
    """The dtype the run's extraction loaded its model in (``parallel.dtype``; None: the
    model's own)."""
    return ((run.info.get("config") or {}).get("parallel") or {}).get("dtype")


def bind_module(run: Run, model: nn.Module, where: str = "the given model") -> Run:
    """Bind ``run`` to an in-memory model now (e.g. the factory model an apply is about to
    edit, built once); its weights are checked like any other's."""
    return run.bind(_ModuleWeights(model, where))


def adapter_base(run: Run, base=None, storage_options: Mapping | None = None, *,
                 trust_factory: bool = False, location: Location | None = None):
    """The model an adapter of ``run`` is for (``io.adapter.AdapterBase``): built on the meta
    device from ``base`` (an HF directory or URI, a :class:`ModelSpec` or its dict, or a live
    module; default the run's own model), with its checkpoint readable key by key. A factory
    the run names is built only with ``trust_factory`` (building it imports its code).
    ``location``: the model's path as the caller built it (``models.loading.model_location``)."""
    from engram_ray.io.adapter import AdapterBase
    from engram_ray.models.loading import build_empty, open_weights

    if isinstance(base, nn.Module):
        return AdapterBase(base, None, storage_options)
    if base is None:
        spec = run_model_spec(run)
        check_trusted(spec, run.uri, given=False, trust_factory=trust_factory)
    elif isinstance(base, ModelSpec):
        spec = base
    elif isinstance(base, Mapping):
        spec = ModelSpec.from_dict(base)
    else:
        spec = ModelSpec(path=str(base))
    weights = None if spec.path is None and spec.weights is None \
        else open_weights(spec, storage_options, location=location)
    recorded = recorded_checkpoint(run)
    outline = (recorded or {}).get("checkpoint", {}).get("outline")
    if spec.path is not None and outline \
            and not getattr(run.binder, "allow_other_weights", False):
        # The run's record (models/outline.py): the model's facts without its code or import.
        from engram_ray.models.outline import outline_module

        return AdapterBase(outline_module(outline), spec, storage_options, weights)
    return AdapterBase(build_empty(spec, storage_options, location=location), spec,
                       storage_options, weights)


class ModelBinder:
    """Binds a run to its base model on first use (picklable: Ray tasks reopen runs by URI and
    rebind there). ``model``: None (the run's own), a path/URI/factory string, or a module.
    ``allow_other_weights``: the given model's weights are used although they differ from the
    run's (e.g. a float16 copy): the engrams are then formed with them, unchecked."""

    def __init__(self, model: str | nn.Module | None = None, *, trust_factory: bool = False,
                 storage_options: Mapping | None = None,
                 allow_other_weights: bool = False, device: str = "cpu") -> None:
        self.model, self.trust_factory = model, trust_factory
        self.storage_options = storage_options
        self.allow_other_weights = allow_other_weights
        self.device = device
        self._locations: dict[str, Location] = {}  # model path → its location, built once

    def location(self, run: Run, path: str) -> Location:
        """The model folder ``path`` as this binder reads it (a remote one's Storage, built on
        first use; ``models.loading.model_location``): the driver that opened the run writes
        the edited model from the same one (:func:`model_at`)."""
        from engram_ray.models.loading import model_location

        if path not in self._locations:
            options = self.storage_options if self.storage_options is not None \
                else run.storage_options
            self._locations[path] = model_location(path, options)
        return self._locations[path]

    def __call__(self, run: Run):
        weights = self._weights(run)
        weights.allow_other = self.allow_other_weights
        return weights

    def _weights(self, run: Run):
        if isinstance(self.model, nn.Module):
            return _ModuleWeights(self.model, "the given model")
        spec = run_model_spec(run, self.model)
        check_trusted(spec, run.uri, given=self.model is not None,
                      trust_factory=self.trust_factory)
        options = self.storage_options if self.storage_options is not None \
            else run.storage_options
        dtype = run_dtype(run)
        if spec.path is not None:
            # Other weights (e.g. a float16 copy) are cast as that model's own config says.
            recorded = None if self.allow_other_weights else recorded_checkpoint(run)
            return _CheckpointWeights(spec, options, dtype, self.device, recorded,
                                      location=self.location(run, spec.path))
        from engram_ray.models.loading import load_model

        model = load_model(spec, options, dtype=dtype).to(self.device)
        return _ModuleWeights(model, f"factory {spec.factory}")


def model_at(run: Run, path: str, storage_options: Mapping | None = None) -> Location:
    """The model folder ``path`` as ``run``'s binder reads it (:meth:`ModelBinder.location`),
    so that an apply reads and writes the base model through one location; built here for a
    run bound to no binder."""
    from engram_ray.models.loading import model_location

    binder = getattr(run, "_binder", None)
    if isinstance(binder, ModelBinder):
        return binder.location(run, path)
    return model_location(path, storage_options)


def open_run(uri: Location, storage_options: Mapping | None = None, *,
             model: str | nn.Module | None = None,
             solver: SolverConfig | Mapping | Sequence[str] | None = None,
             trust_factory: bool = False, allow_other_weights: bool = False,
             device: str = "cpu") -> Run:
    """Open the committed run at ``uri`` (local path or ``s3://``), bound to its base model
    (module docstring; loaded on the first engram). ``solver`` re-solves the stored spectrum
    with other options: a :class:`SolverConfig`, or overrides of the run's own (``{"rtol":
    1e-4}``, ``["rtol=1e-4"]``); default the run's. ``allow_other_weights`` (only with a
    ``model``) skips the weight check: the engrams are formed with the given weights.
    ``device``: where engrams and edits are formed (``cpu``, ``cuda``, ``cuda:N``, or
    ``auto``: a GPU when torch sees one); an in-memory model's own device wins."""
    if allow_other_weights and model is None:
        raise ValueError("allow_other_weights needs a model (--model): the run's own model is "
                         "the one it was extracted from, or it has changed")
    if isinstance(uri, Storage):  # the run's Storage, built by the caller: its options
        storage_options = as_storage(uri, storage_options).options
    run = Run(uri, storage_options,
              binder=ModelBinder(model, trust_factory=trust_factory,
                                 storage_options=storage_options,
                                 allow_other_weights=allow_other_weights,
                                 device=edit_device(device)))
    if solver is not None and not isinstance(solver, SolverConfig):
        solver = run.run_solver.updated(solver)
    return run.with_solver(solver)
