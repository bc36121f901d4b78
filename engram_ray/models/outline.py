"""What a run records of its checkpoint model, and the module tree rebuilt from that record.

An edit needs facts about the base model, not its code: where each module's tensors are
stored (``<module>.weight``, or the input embedding for a tied ``lm_head``), the dtype the
extraction held them in (so a weight read back is the one the engram was computed with, bit
for bit), and for an adapter each target's kind, shape, bias, Conv2d options, ties and the
names of every other module (PEFT matches targets by name suffix). Building the model from
its config gives all of that, but costs an import of transformers and of the architecture:
seconds in every edit process, more than a small edit itself. So the extraction, which
builds the model anyway, records these facts in ``run.json`` (``checkpoint``), and an edit
rebuilds a module tree on the meta device from them (:func:`outline_module`): plain
``nn.Linear``/``nn.Conv2d`` and engram-ray's own ``Conv1D`` carry the recorded shapes,
dtypes and biases, tied modules share one parameter, and every other name is an empty
container. No weights and no code of the checkpoint are involved.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from engram_ray.config import ModelSpec
from engram_ray.core.layers import Conv1D, module_kind
from engram_ray.io.storage import Location, StorageOptions
from engram_ray.models.loading import as_dtype, build_empty, tied_aliases

__all__ = ["checkpoint_layout", "describe", "outline_module"]


def checkpoint_layout(spec: ModelSpec, modules: Mapping[str, bool],
                      storage_options: StorageOptions | None = None,
                      dtype: torch.dtype | str | None = None, *,
                      location: Location | None = None) -> dict:
    """The record of a ``path`` spec's checkpoint for ``modules`` (name → bias absorbed).

    ``dtypes``: each tensor's dtype in the model built from the config (``dtype``, else the
    config's, as ``from_pretrained`` gives it); ``aliases``: :func:`tied_aliases`;
    ``outline``: every module name, and for ``modules`` and the modules they share a weight
    with: kind, weight shape and dtype, whether a bias exists, Conv2d options. ``location``:
    the model folder as the operation built it (``models.loading.model_location``)."""
    return describe(build_empty(spec, storage_options, dtype=dtype, location=location), modules)


def describe(skeleton: nn.Module, modules: Mapping[str, bool]) -> dict:
    """:func:`checkpoint_layout` of a built model (meta-device parameters suffice)."""
    dtypes = {}
    for name, bias in modules.items():
        sub = skeleton.get_submodule(name)
        for part in ("weight", "bias") if bias else ("weight",):
            dtypes[f"{name}.{part}"] = _name(getattr(sub, part).dtype)
    owners: dict[int, list[str]] = {}
    for name, mod in skeleton.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and name:
            owners.setdefault(id(w), []).append(name)
    described = {}
    for name in modules:
        sharing = owners.get(id(skeleton.get_submodule(name).weight), [name])
        for n in sharing:
            described[n] = _facts(skeleton.get_submodule(n), sharing)
    return {"dtypes": dtypes, "aliases": tied_aliases(skeleton),
            "outline": {"names": [n for n, _ in skeleton.named_modules() if n],
                        "modules": described}}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _facts(mod: nn.Module, sharing: list[str]) -> dict:
    w = mod.weight
    out = {"kind": module_kind(mod), "weight_shape": list(w.shape), "dtype": _name(w.dtype),
           "bias": getattr(mod, "bias", None) is not None, "tied": sorted(sharing)}
    if out["kind"] == "conv2d":
        out["conv"] = {"stride": list(mod.stride), "padding": mod.padding if isinstance(
            mod.padding, str) else list(mod.padding), "dilation": list(mod.dilation),
            "groups": mod.groups, "padding_mode": mod.padding_mode}
    return out


def outline_module(outline: Mapping) -> nn.Module:
    """A meta-device module tree with the recorded names (module docstring): described modules
    are layers of their recorded kind (a tied group shares one weight parameter), every other
    name an empty ``nn.Module``; nothing is read and no checkpoint code runs."""
    root = nn.Module()
    described = outline.get("modules") or {}
    names = list(outline.get("names") or [])  # the model's order: parents first
    for name in names + [n for n in described if n not in set(names)]:
        holder = root
        *parents, leaf = name.split(".")
        for part in parents:
            if part not in holder._modules:
                holder.add_module(part, nn.Module())
            holder = holder._modules[part]
        if leaf not in holder._modules:
            holder.add_module(leaf, _layer(described[name]) if name in described
                              else nn.Module())
    shared: dict[tuple[str, ...], nn.Parameter] = {}
    for name, facts in described.items():
        group = tuple(facts.get("tied") or [name])
        mod = root.get_submodule(name)
        if len(group) > 1:
            mod.weight = shared.setdefault(group, mod.weight)
    return root


def _layer(facts: Mapping) -> nn.Module:
    """A layer with the recorded weight (meta device), bias and options; an embedding or other
    module that only shares a weight is a bare module holding it."""
    shape, dtype = tuple(facts["weight_shape"]), as_dtype(facts["dtype"])
    kind, bias = facts["kind"], facts["bias"]
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
        if kind == "linear":
            mod = nn.Linear(shape[1], shape[0], bias=bias, dtype=dtype)
        elif kind == "conv1d":
            mod = Conv1D(shape[1], shape[0]).to(dtype)
            if not bias:
                mod.bias = None
        elif kind == "conv2d":
            c = facts["conv"]
            padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
            mod = nn.Conv2d(shape[1] * c["groups"], shape[0], tuple(shape[2:]),
                            stride=tuple(c["stride"]), padding=padding,
                            dilation=tuple(c["dilation"]), groups=c["groups"], bias=bias,
                            padding_mode=c["padding_mode"], dtype=dtype)
        else:
            mod = nn.Module()
            mod.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    return mod
