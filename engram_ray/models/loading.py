"""Which model to load (:class:`ModelSpec`), and loading it whole in one process.

A model is named either by an HF directory (local, or a URI of any accepted storage scheme:
``s3://``, ``gs://``…) or a Hugging Face Hub id (``org/name``, ``hf://org/name@revision``,
resolved through huggingface_hub's cache: :mod:`engram_ray.hub`), loaded with transformers'
``AutoModelForCausalLM``, or by a ``"pkg.module:callable"`` factory plus keyword arguments and an
optional ``.safetensors`` state dict (any ``nn.Module``: an ``nn.Sequential`` MLP, a CNN…). The
spec is a small plain dataclass so it travels to remote workers, which then load what they need
themselves (the whole model here, one pipeline stage in :mod:`engram_ray.models.stages`).

Remote HF directories are copied into a local cache (``$ENGRAM_RAY_CACHE``, default
``~/.cache/engram_ray``) because transformers and ``safe_open`` read local files; only
safetensors weights are supported there.

A ``model.path`` that is none of these (no such folder, no ``scheme://``, no Hub id the cache
holds or the Hub serves) fails naming all three.

Model directories are data, not code: every transformers ``Auto*`` call passes
``trust_remote_code=False``, so a directory whose ``config.json`` carries an ``auto_map`` to
its own ``.py`` files loads the built-in class for its ``model_type``, and never runs that code
nor stops to ask ``[y/N]`` on stdin (a remote worker has no one to answer). When there is no
built-in class (a ``model_type`` transformers does not know), the error says so in one line:
engram-ray has no flag to run a checkpoint's own code, on purpose (:func:`_hf_config`).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from engram_ray import hub
from engram_ray.config import ModelSpec
from engram_ray.io.storage import (
    Location,
    Storage,
    StorageOptions,
    as_storage,
    is_remote,
    location_uri,
)
from engram_ray.models.weights import (
    WeightFiles,
    cache_dir_for,
    download,
    empty_parameters,
    materialize,
)

__all__ = [
    "ModelSpec",
    "as_dtype",
    "build_empty",
    "call_factory",
    "check_model_path",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "model_dir",
    "model_location",
    "open_weights",
    "resolve_factory",
    "tied_aliases",
]

# Weight formats never copied from a remote directory: only safetensors is read.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a ``torch.dtype``, or its name (``"bfloat16"``, ``"torch.float16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    out = getattr(torch, name, None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return out


def resolve_factory(factory: str) -> Callable[..., nn.Module]:
    """Import ``"pkg.module:callable"``; failures name the factory string."""
    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"model factory {factory!r}: cannot import {module_name!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ImportError(f"model factory {factory!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise TypeError(f"model factory {factory!r} is not callable")
    return fn


def call_factory(spec: ModelSpec) -> nn.Module:
    """Build a factory spec's model with its own initialization (no weights read)."""
    model = resolve_factory(spec.factory)(**spec.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model factory {spec.factory!r} returned {type(model).__name__}, not nn.Module"
        )
    return model


def model_dir(
    path: Location, storage_options: StorageOptions | None = None, *, weights: bool = True
) -> str:
    """A local directory with the HF checkpoint at ``path`` (copied into the cache if remote).

    ``weights=False`` copies only the small files (config, tokenizer, index json): a stage reads
    its own shards later through :class:`~engram_ray.models.weights.WeightFiles`. A Hub id is
    its snapshot in the Hugging Face cache (fetched there first when online). A remote
    folder's files are fetched through its one ``Storage`` (``path`` may already be it).
    """
    given, path = path, location_uri(path)
    if isinstance(given, Storage):
        storage_options = None  # the Storage carries its own options
    if hub.is_hub_path(path):
        local = hub.snapshot(path, weights=weights)
        if not os.path.exists(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"model path {path} (Hub snapshot {local}) has no config.json")
        return local
    if not is_remote(path):
        local = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(local):
            raise FileNotFoundError(_not_found(path, local))
        if not os.path.exists(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"model path {path} has no config.json")
        return local
    store = as_storage(given, storage_options)
    fs = store.fs
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        entries = []
    files = [e for e in entries if e.get("type") == "file"]
    if not files:
        raise FileNotFoundError(f"model path not found: {path}")
    names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in files}
    if "config.json" not in names:
        raise FileNotFoundError(f"model path {path} has no config.json")
    local = cache_dir_for(path)
    for name in sorted(names):
        if name.endswith(_OTHER_WEIGHTS) or (name.endswith(".safetensors") and not weights):
            continue
        download(store.child(name), local)
    return local


def _not_found(path: str, local: str) -> str:
    return (f"model path {path!r} is neither a folder (no directory {local}), nor a URI "
            "(scheme://bucket/path), nor a Hugging Face Hub id (org/name or "
            f"hf://org/name@revision) held by the Hub cache {hub.cache_dir()}")


def check_model_path(path: Location, storage_options: StorageOptions | None = None) -> None:
    """Fail early, in one line, when ``path`` names no model: a missing folder, an empty URI
    prefix, a Hub id neither cached nor served (the small files are fetched into the cache when
    online); the message names what was tried."""
    given, path = path, location_uri(path)
    if isinstance(given, Storage):
        storage_options = None  # the Storage carries its own options
    if hub.is_hub_path(path):
        hub.snapshot(path, weights=False)
        return
    if not is_remote(path):
        local = os.path.abspath(os.path.expanduser(path))
        if not os.path.exists(local):
            raise FileNotFoundError(_not_found(path, local))
    elif not as_storage(given, storage_options).fs.exists(path):
        raise FileNotFoundError(f"model path {path} does not exist")


def model_location(path: str | None, storage_options: StorageOptions | None = None
                   ) -> Location | None:
    """A model ``path`` as an operation passes it down: a remote folder's :class:`Storage`,
    built once here (every later read of the model goes through it); a local folder or a Hub
    id as is (they are not read through a Storage)."""
    if path is None or hub.is_hub_path(path) or not is_remote(path):
        return path
    return as_storage(path, storage_options)


def _path(spec: ModelSpec, location: Location | None) -> Location:
    """``spec.path`` (a factory's: ``spec.weights``), or the caller's ``location`` of it
    (:func:`model_location`)."""
    path = spec.path if spec.path is not None else spec.weights
    if location is None:
        return path
    if path is None or location_uri(location).rstrip("/") != path.rstrip("/"):
        raise ValueError(f"model location {location_uri(location)} is not the model's "
                         f"{path}")
    return location


def load_model_config(spec: ModelSpec, storage_options: StorageOptions | None = None, *,
                      location: Location | None = None):
    """The HF config of a ``path`` spec (only the small files are fetched). ``location``:
    ``spec.path`` as the caller built it (:func:`model_location`), here and below."""
    if spec.path is None:
        raise ValueError(f"model {spec.name} is a factory: it has no HF config")
    return _hf_config(model_dir(_path(spec, location), storage_options, weights=False))


def _hf_config(local: str):
    """``AutoConfig`` of a local directory, never running (or asking to run) its own code.

    A checkpoint whose ``model_type`` only its own code defines (``config.json`` ``auto_map``)
    cannot be loaded: transformers then says to pass ``trust_remote_code=True``, a flag no
    engram-ray command has (running a checkpoint's code on every Ray worker is not a choice a
    config should make silently), so that advice is replaced by what the user can do."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        model_type = _config_json(local).get("model_type")
        raise ValueError(
            f"model {local} defines its architecture (model_type {model_type!r}) only in its "
            "own custom code (config.json auto_map): transformers has no built-in class for "
            "it, and engram-ray never runs a checkpoint's code; convert it to a transformers "
            "architecture, or build it with a model.factory (apply: --trust-factory)") from None


def _config_json(local: str) -> dict:
    try:
        with open(os.path.join(local, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _auto_class(config):
    """``AutoModelForCausalLM`` when it knows ``config``, else ``AutoModel``."""
    from transformers import AutoModel, AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    return AutoModelForCausalLM if type(config) in mapping else AutoModel


def build_empty(
    spec: ModelSpec,
    storage_options: StorageOptions | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    location: Location | None = None,
) -> nn.Module:
    """The full model with every parameter on the meta device (costs no memory).

    HF models are built from their config (in ``dtype``, else the config's dtype, as
    ``from_pretrained`` does); factories are called with their kwargs.
    """
    dtype = as_dtype(dtype)
    if spec.path is not None:
        config = load_model_config(spec, storage_options, location=location)
        with empty_parameters():
            return _auto_class(config).from_config(config, dtype=dtype, trust_remote_code=False)
    with empty_parameters():
        return call_factory(spec)


def open_weights(spec: ModelSpec, storage_options: StorageOptions | None = None, *,
                 location: Location | None = None) -> WeightFiles:
    """The spec's safetensors weights as lazily read :class:`WeightFiles`."""
    if spec.path is not None:
        if hub.is_hub_path(spec.path):  # the cache holds whole files: fetch them once
            return WeightFiles(model_dir(spec.path, weights=True), storage_options)
        if not is_remote(spec.path):
            model_dir(spec.path)  # a clear FileNotFoundError for a missing directory
        path = _path(spec, location)
        return WeightFiles(path, None if isinstance(path, Storage) else storage_options)
    if spec.weights is None:
        raise ValueError(f"model factory {spec.factory!r} has no `weights` to load from")
    path = _path(spec, location)
    return WeightFiles(path, None if isinstance(path, Storage) else storage_options)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameter name → the name a checkpoint stores it under.

    HF saves a tied ``lm_head.weight`` only as the input embedding (``transformer.wte.weight``,
    ``model.embed_tokens.weight``); the dict form of ``_tied_weights_keys`` (transformers 5)
    says so, and the input/output embedding pair covers older models.
    """
    out: dict[str, str] = {}
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", True) is False:
        return out  # untied: every weight is stored under its own name
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, Mapping):
        out.update({str(k): str(v) for k, v in tied.items()})
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_in) and callable(get_out):
        try:
            emb_in, emb_out = get_in(), get_out()
        except NotImplementedError:
            emb_in = emb_out = None
        names = {id(m): n for n, m in model.named_modules()}
        if emb_in is not None and emb_out is not None and id(emb_out) in names:
            out.setdefault(f"{names[id(emb_out)]}.weight", f"{names[id(emb_in)]}.weight")
    return out


def load_model(
    spec: ModelSpec,
    storage_options: StorageOptions | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    location: Location | None = None,
) -> nn.Module:
    """The whole model in eval mode on CPU, for the single-process path.

    HF directories go through ``from_pretrained`` (``dtype`` None means the checkpoint's dtype,
    transformers 5's ``"auto"``); factories are built and, with ``weights``, filled from them.
    """
    dtype = as_dtype(dtype)
    if spec.path is not None:
        local = model_dir(_path(spec, location), storage_options, weights=True)
        cls = _auto_class(_hf_config(local))
        kwargs = {} if dtype is None else {"dtype": dtype}
        return cls.from_pretrained(local, trust_remote_code=False, **kwargs).eval()
    if spec.weights is None:
        model = call_factory(spec)
        return (model.to(dtype) if dtype is not None else model).eval()
    weights = open_weights(spec, storage_options, location=location)
    model = build_empty(spec)
    materialize(model, weights, dtype=dtype, aliases=tied_aliases(model))
    return model.eval()


def load_tokenizer(spec: ModelSpec, storage_options: StorageOptions | None = None, *,
                   location: Location | None = None):
    """The HF tokenizer stored with a ``path`` spec (``AutoTokenizer`` on the local copy)."""
    if spec.path is None:
        raise ValueError(f"model factory {spec.factory!r} has no tokenizer")
    from transformers import AutoTokenizer

    local = model_dir(_path(spec, location), storage_options, weights=False)
    return AutoTokenizer.from_pretrained(local, trust_remote_code=False)
