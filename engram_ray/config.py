"""The extraction config: one YAML file, validated, with dotted ``--set key=value`` overrides.

::

    model:    {path: DIR-or-URI}                   # or {factory, kwargs, weights}
    data:     {paths: [...], concept_column, text_column | prompt_column + answer_column
               | features_column, max_length, batch_size, storage_options}
    select:   {target_modules, layers_to_transform, absorb_bias, share_inputs, gram_dtype,
               low_rank}
    solver:   {rtol, condition_cap, rank_fraction, ridge}
    parallel: {stages, replicas, address, num_cpus, num_gpus, max_in_flight, placement,
               encode_num_cpus, encode_concurrency, solver_num_cpus, solver_num_gpus, dtype, device}
    store:    {uri, run_id, storage_options, overwrite, keep_statistics, extend,
               checkpoint_shards, lease_timeout_s, break_lease}

Unknown keys anywhere are errors naming the full dotted key, so a typo never falls back to a
default silently. Every section is a keyword-only dataclass validated in ``__post_init__``.

``store.run_id`` names a directory the writer creates and, with ``overwrite``, replaces, so it
must be one safe path component (:func:`run_id_problem`): never ``.``/``..``/a path, and never a
name starting with ``_`` (reserved for the store's own ``_staging``, ``_leases``,
``_checkpoints``). ``storage_options`` hold credentials: ``to_dict`` (what ``run.json`` records)
and every error message go through :func:`engram_ray.redaction.redact`, and the options never
appear in a section's ``repr``. Locations and options are checked with :mod:`engram_ray.uris`
(a scheme whose fsspec implementation is missing is refused naming the package to install):
this module imports nothing from ``engram_ray.io``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from engram_ray import hub, uris
from engram_ray.redaction import redact, redact_text

__all__ = [
    "EDIT_FORMATS",
    "FLOAT32_EPS",
    "SCALE_NAMES",
    "ConfigError",
    "DataConfig",
    "EditSpec",
    "ExtractConfig",
    "ModelSpec",
    "SolverConfig",
    "ParallelConfig",
    "SelectConfig",
    "StoreConfig",
    "absolute_uri",
    "apply_overrides",
    "load_config",
    "run_id_problem",
]


class ConfigError(ValueError):
    """A config problem; the message names the dotted key."""


# Data file formats (``data.format``) and the file extensions that imply them.
FORMATS = ("parquet", "json")
# The float32 machine epsilon: the solver's default spectral cut is ``D × FLOAT32_EPS``.
FLOAT32_EPS = 1.1920928955078125e-07
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` is not one safe path component (``None`` when it is): letters, digits,
    ``.``, ``_`` and ``-`` only, at most 200 characters, not ``.`` or ``..``, not starting with
    ``_`` (the store's reserved names)."""
    if not isinstance(run_id, str):
        return f"must be a string, got a {type(run_id).__name__}"
    if not _RUN_ID.fullmatch(run_id):
        return (f"{run_id!r} is not one path component of letters, digits, '.', '_' and '-' "
                "(at most 200 characters)")
    if run_id in (".", ".."):
        return f"{run_id!r} names a directory, not a run"
    if run_id.startswith("_"):
        return f"{run_id!r} starts with '_', reserved for the store's _staging, _leases, _checkpoints"
    return None


def absolute_uri(uri: str, key: str) -> str:
    """``uri`` with a relative local path made absolute against this process's working
    directory, so every Ray worker (whose working directory differs) and every printed line
    name the same place; URLs (``s3://…``) pass unchanged, after their scheme is checked (a
    ``gs://`` URL without gcsfs is refused here, naming the key and the package), and a
    ``file://`` URL becomes its local path.

    A Ray job started with ``--working-dir`` runs its entrypoint inside Ray's temporary copy
    of that directory: a relative store there would commit into the copy, which Ray deletes,
    and the submitter's own directory is not known to the job. So inside such a job a relative
    path is refused, naming the key and the fix.
    """
    try:
        if uris.is_remote(uri):
            uris.check_scheme(uri)
            return uri
    except uris.UnsupportedScheme as e:
        raise ConfigError(f"{key}: {e}") from None
    path = os.path.expanduser(uris.normalize(uri))
    if os.path.isabs(path):
        return path
    if _ray_job_working_dir() is not None:
        raise ConfigError(f"{key} {uri!r} is a relative path, and this Ray job runs in Ray's "
                          f"temporary copy of its working directory ({os.getcwd()}), which is "
                          "deleted after the job: give an absolute path on a filesystem every "
                          "node shares, or an s3:// URI")
    return os.path.abspath(path)


def _ray_job_working_dir() -> str | None:
    """The ``working_dir`` of the Ray job this process is the entrypoint of (Ray's job
    supervisor passes the job's runtime env in ``RAY_JOB_CONFIG_JSON_ENV_VAR``), else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return env.get("working_dir") if isinstance(env, dict) else None


def _check_options(options: Any, key: str, locations: Sequence[str] = ()) -> dict[str, Any] | None:
    """Validated storage options (a copy) for the schemes of ``locations`` (S3's when none is
    remote); errors name ``key`` and never echo a value."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ConfigError(f"{key}: expected a mapping of option names to values, got a "
                          f"{type(options).__name__}")
    try:
        schemes = {uris.check_scheme(u) for u in locations} - {"file"}
        for scheme in sorted(schemes) or ["s3"]:
            uris.resolve_storage_options(options, scheme)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return dict(options)


@dataclass(kw_only=True)
class ModelSpec:
    """A model to load: an HF directory ``path``, or a ``factory`` with ``kwargs`` and ``weights``.

    - ``path``: local directory or URI (``s3://``, ``gs://``, ``file://``…) of an HF checkpoint
      (``config.json``, tokenizer files, ``model.safetensors`` or a sharded
      ``model.safetensors.index.json``), or a Hugging Face Hub id: ``org/name`` (when no such
      local directory exists; recorded as ``hf://org/name``) or ``hf://org/name@revision``,
      resolved through huggingface_hub's cache (:mod:`engram_ray.hub`).
    - ``factory``: ``"pkg.module:callable"`` returning an ``nn.Module`` when called with
      ``**kwargs``; ``weights`` (path or URI of a ``.safetensors`` state dict) fills it in, or
      the factory's own initialization is kept when ``weights`` is None.
    """

    path: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.factory is None):
            raise ValueError("ModelSpec needs exactly one of `path` or `factory`")
        if self.path is not None:
            if not isinstance(self.path, str) or not self.path:
                raise TypeError(f"ModelSpec.path must be a non-empty str, got {self.path!r}")
            if self.kwargs or self.weights is not None:
                raise ValueError("ModelSpec: `kwargs` and `weights` go with `factory`, not `path`")
            self.path = hub.normalize_model_path(uris.normalize(self.path))
            if uris.is_remote(self.path):
                uris.check_scheme(self.path)  # gs:// without gcsfs: refused, naming it
        else:
            f = self.factory
            if not isinstance(f, str) or f.count(":") != 1 or not all(f.split(":")):
                raise ValueError(
                    f"ModelSpec.factory must look like 'pkg.module:callable', got {f!r}"
                )
            if not isinstance(self.kwargs, Mapping):
                raise TypeError(
                    f"ModelSpec.kwargs must be a dict, got {type(self.kwargs).__name__}"
                )
            self.kwargs = dict(self.kwargs)
            if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
                raise TypeError(f"ModelSpec.weights must be a non-empty str, got {self.weights!r}")
            if self.weights is not None and not self.weights.endswith(".safetensors"):
                raise ValueError(
                    f"ModelSpec.weights must be a .safetensors file, got {self.weights!r}"
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build from a config mapping; unknown keys are an error (typos never pass silently)."""
        known = {"path", "factory", "kwargs", "weights"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model key(s) {sorted(unknown)}; expected {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The fields as recorded (run.json, edit.json): credentials in URLs redacted."""
        out = {k: v for k, v in asdict(self).items() if v not in (None, {})}
        out.update({k: redact_text(out[k]) for k in ("path", "weights") if k in out})
        return out  # kwargs stay whole: a factory is rebuilt from them (num_tokens is no secret)

    def __repr__(self) -> str:
        return f"ModelSpec({self.to_dict()!r})"  # a URL's credentials never reach a log

    @property
    def name(self) -> str:
        """A short human-readable name (for logs and error messages)."""
        return self.path if self.path is not None else str(self.factory)


@dataclass(kw_only=True)
class DataConfig:
    """Where the rows are and how to turn one into model inputs; validated on construction."""

    paths: list[str]
    format: str | None = None
    concept_column: str = "concept"
    text_column: str | None = None
    prompt_column: str | None = None
    answer_column: str | None = None
    features_column: str | None = None
    max_length: int = 512
    batch_size: int = 8
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not self.paths or not all(isinstance(p, str) and p for p in self.paths):
            raise ValueError(f"paths: expected a non-empty list of paths, got {self.paths!r}")
        self.paths = list(self.paths)
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS} or None, got {self.format!r}")
        self._check_mode()
        for key in ("max_length", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive int, got {value!r}")
        self.storage_options = _check_options(self.storage_options, "data.storage_options",
                                              self.paths)
        if not self.concept_column:
            raise ValueError("concept_column: must be a non-empty column name")

    def _check_mode(self) -> None:
        prompt, answer = self.prompt_column, self.answer_column
        if (prompt is None) != (answer is None):
            missing = "answer_column" if answer is None else "prompt_column"
            raise ValueError(f"{missing}: prompt_column and answer_column must be set together")
        chosen = [k for k, v in (("text_column", self.text_column),
                                 ("prompt_column", prompt),
                                 ("features_column", self.features_column)) if v is not None]
        if len(chosen) != 1:
            names = "text_column | prompt_column+answer_column | features_column"
            got = ", ".join(chosen) or "none"
            raise ValueError(f"set exactly one of {names}; got {got}")

    def to_dict(self) -> dict[str, Any]:
        """The fields, credentials redacted (what run.json records)."""
        out = asdict(self)
        out["storage_options"] = redact(self.storage_options)
        return out

    @property
    def mode(self) -> str:
        """``"text"``, ``"prompt_answer"`` or ``"features"``."""
        if self.text_column is not None:
            return "text"
        if self.prompt_column is not None:
            return "prompt_answer"
        return "features"

    def data_columns(self) -> dict[str, str]:
        """Config key → column name for every column a row must have (concept included)."""
        keys = {"text": ("text_column",), "prompt_answer": ("prompt_column", "answer_column"),
                "features": ("features_column",)}[self.mode]
        cols = {k: getattr(self, k) for k in keys}
        cols["concept_column"] = self.concept_column
        return cols

    def needed_columns(self) -> list[str]:
        """The column names read from each file, deduplicated, in a fixed order."""
        return list(dict.fromkeys(self.data_columns().values()))


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    rtol: float | None = None
    condition_cap: float | None = None
    rank_fraction: float | None = None
    ridge: float | None = None

    def __post_init__(self) -> None:
        for key in ("rtol", "condition_cap", "ridge"):
            v = getattr(self, key)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"solver.{key} must be a positive finite number, got {v!r}")
        if self.condition_cap is not None and self.condition_cap < 1:
            raise ValueError(f"solver.condition_cap must be ≥ 1, got {self.condition_cap}")
        if self.rank_fraction is not None and not 0 < self.rank_fraction <= 1:
            raise ValueError(f"solver.rank_fraction must be in (0, 1], got {self.rank_fraction}")
        if self.ridge is not None and (
            self.rtol is not None or self.condition_cap is not None or self.rank_fraction
        ):
            raise ValueError("solver.ridge damps instead of cutting: do not combine it with "
                             "rtol, condition_cap or rank_fraction")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("rtol", "condition_cap", "rank_fraction", "ridge")}

    def updated(self, overrides: Mapping[str, Any]) -> SolverConfig:
        """These options with ``overrides`` (``{key: value}``, or ``"KEY=VALUE"`` strings as
        ``apply --solver`` gives them, values parsed as YAML) replacing theirs: an edit
        re-solves a run's stored spectrum with them. Unknown keys are errors naming the key."""
        if not isinstance(overrides, Mapping):
            overrides = dict(_key_value("--solver", item) for item in overrides)
        _reject_unknown(overrides, self.to_dict(), "solver.")
        overrides = {k: _number(f"solver.{k}", v) for k, v in overrides.items()}
        if "ridge" in overrides and overrides["ridge"] is not None:
            base = {}  # ridge damps instead of cutting: it replaces the run's cut options
        else:
            base = {k: v for k, v in self.to_dict().items() if k != "ridge"}
        return SolverConfig(**{**base, **overrides})


SCALE_NAMES = ("uniform", "weight_norm", "effective_rank")  # core/edit.py's per-layer scales
EDIT_FORMATS = ("full", "peft")


@dataclass(frozen=True, kw_only=True)
class EditSpec:
    """One edit, declared once: what the CLI's ``apply``, a batch request row and a scheduled
    tick's requests all build and pass whole to the one edit driver (``apply.apply``).

    ``forget``: the concepts U; ``out``: the output (local or a URI); ``alpha``: strength
    (negative amplifies); ``scale``: per-layer scaling (a name of :data:`SCALE_NAMES` or a
    product ``"weight_norm*effective_rank"``); ``modules``: PEFT-style selection (suffixes, or
    a regex string); ``format``: ``"full"`` (an edited checkpoint) or ``"peft"`` (a LoRA
    adapter) with ``adapter_rtol`` (truncation of dense updates), ``adapter_exact_dense`` and
    ``adapter_max_rank`` (vLLM serves LoRA ranks ≤ 512: a larger update is truncated by SVD and
    its error reported); ``solver``: overrides of the run's solver options, applied to its
    stored spectrum; ``eval``: an eval set scored before the output is written.

    Errors name the field (``'alpha' must be …``); a batch prefixes its file, row and
    request id. :meth:`digest` identifies what the output holds (not where it goes).
    """

    forget: tuple[str, ...]
    out: str
    alpha: float = 1.0
    scale: str = "uniform"
    modules: tuple[str, ...] | str | None = None
    format: str = "full"
    adapter_rtol: float | None = None
    adapter_exact_dense: bool = False
    adapter_max_rank: int | None = None
    solver: tuple[tuple[str, float | None], ...] | None = None
    eval: str | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("forget", _names("forget", self.forget))
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError(f"'out' must be a non-empty string, got {self.out!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not math.isfinite(alpha):
            raise ConfigError(f"'alpha' must be a number (finite), got {alpha!r}")
        set_("alpha", float(alpha))
        if not isinstance(self.scale, str) or not all(p in SCALE_NAMES
                                                      for p in self.scale.split("*")):
            raise ConfigError(f"'scale' must be one of {list(SCALE_NAMES)} or a product like "
                              f"'weight_norm*effective_rank', got {self.scale!r}")
        if self.modules is not None:
            set_("modules", _names("modules", self.modules, regex=True))
        self._check_adapter()
        if self.solver is not None:
            set_("solver", _solver_items(self.solver))
        if self.eval is not None and (not isinstance(self.eval, str) or not self.eval):
            raise ConfigError(f"'eval' must be a non-empty string (an eval set's URI), got "
                              f"{self.eval!r}")

    def _check_adapter(self) -> None:
        if self.format not in EDIT_FORMATS:
            raise ConfigError(f"'format' must be one of {list(EDIT_FORMATS)}, got "
                              f"{self.format!r}")
        rtol = self.adapter_rtol
        if rtol is not None:
            if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
                raise ConfigError(f"'adapter_rtol' must be a number, got {rtol!r}")
            if not 0 <= rtol < 1:
                raise ConfigError(f"'adapter_rtol' must be in [0, 1), got {rtol}")
            object.__setattr__(self, "adapter_rtol", float(rtol))
        if not isinstance(self.adapter_exact_dense, bool):
            raise ConfigError(f"'adapter_exact_dense' must be true or false, got "
                              f"{self.adapter_exact_dense!r}")
        rank = self.adapter_max_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                 or rank < 1):
            raise ConfigError(f"'adapter_max_rank' must be a positive integer, got {rank!r}")
        if self.format == "full" and (rtol is not None or self.adapter_exact_dense
                                      or rank is not None):
            raise ConfigError("'adapter_rtol', 'adapter_exact_dense' and 'adapter_max_rank' "
                              "need format 'peft'")

    @property
    def solver_overrides(self) -> dict[str, float | None] | None:
        return None if self.solver is None else dict(self.solver)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["forget"] = list(self.forget)
        out["modules"] = self.modules if not isinstance(self.modules, tuple) \
            else list(self.modules)
        out["solver"] = self.solver_overrides
        return out

    def digest(self) -> str:
        """sha256 of what the output holds: every field but ``out`` and ``eval`` (where it
        goes, and a report beside it), canonical JSON."""
        fields = {k: v for k, v in self.to_dict().items() if k not in ("out", "eval")}
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _names(field_name: str, value: Any, regex: bool = False) -> tuple[str, ...] | str:
    """A tuple of non-empty strings from a list (or one string: one concept; for ``modules``
    a regex, as ``apply --modules`` takes)."""
    if isinstance(value, str) and value:
        if regex:
            try:
                re.compile(value)
            except re.error as e:
                raise ConfigError(f"'{field_name}' is not a valid regex {value!r}: {e}") from None
            return value
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v
                                                          for v in value):
        return tuple(value)
    if field_name == "forget" and isinstance(value, (list, tuple)) and not value:
        raise ConfigError("nothing to forget: the concept list ('forget') is empty")
    raise ConfigError(f"'{field_name}' must be a string or a list of non-empty strings, got "
                      f"{value!r}")


def _solver_items(value: Any) -> tuple[tuple[str, float | None], ...]:
    """Solver overrides (a mapping, ``"KEY=VALUE"`` strings, or a whole
    :class:`SolverConfig`) as sorted, checked items: hashable, so an edit stays frozen."""
    if isinstance(value, SolverConfig):
        value = value.to_dict()
    elif isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        value = dict(value)
    elif isinstance(value, (list, tuple)):
        value = dict(_key_value("--solver", item) for item in value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"'solver' must be an object of solver options, got {value!r}")
    _reject_unknown(value, SolverConfig().to_dict(), "solver.")
    items = tuple(sorted((k, _number(f"solver.{k}", v)) for k, v in value.items()))
    SolverConfig().updated(dict(items))  # the combination itself must be valid
    return items


@dataclass(kw_only=True)
class SelectConfig:
    target_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    absorb_bias: bool = True
    share_inputs: bool = True
    gram_dtype: str = "float64"  # float32: half the cost, batching-dependent at ~1e-4
    # Keep concepts with ≤ D/2 tokens as raw rows (their Σ_c = XᵀX has rank n_c: the run stores
    # the rows and an edit forms rank-n_c updates; fewer flops and bytes); false: a dense Σ_c
    # block for every concept.
    low_rank: bool = True

    def __post_init__(self) -> None:
        if self.gram_dtype not in ("float32", "float64"):
            raise ConfigError(f"select.gram_dtype must be float32 or float64, got {self.gram_dtype!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"select.target_modules {self.target_modules!r} is not a "
                                  f"valid regular expression: {e}") from None


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
    # Where the model (or each stage's slice) and its Σ live: auto (CUDA when num_gpus > 0 and
    # a GPU is visible; on Ray, when Ray gave the actor one), cpu, cuda or cuda:N
    # (engram_ray/devices.py). On a GPU with slow float64, see select.gram_dtype.
    device: str = "auto"
    # CPUs an autoscaler may still add (e.g. KubeRay maxReplicas × worker CPUs): counted by the
    # schedulability check made before any actor starts (distributed/resources.py).
    autoscale_max_cpus: float = 0.0
    # The worker types an autoscaler may add (Ray's own autoscalers do not publish them):
    # {name: {CPU: n, GPU: m, <custom>: k, max_workers: N}}, as a cluster
    # YAML's available_node_types (docs/cluster.md). Each actor and task must fit one of them
    # or an alive node, else the run fails at once (distributed/resources.py).
    autoscale_node_types: dict[str, dict[str, float]] | None = None
    # Fail, naming the shortfall, when the reservation of the stage actors (or of the solver
    # slots) is still not placed after this long: an autoscaler that cannot add the nodes,
    # or another job holding them (None: wait forever).
    schedule_timeout_s: float | None = 600.0
    # Fail, naming it, when parallel.address (or RAY_ADDRESS) does not answer within this long.
    connect_timeout_s: float = 60.0
    # Fail with a diagnostic when no row has moved for this long (None: wait forever).
    stall_timeout_s: float | None = 600.0
    # Seconds between progress lines (rows, rates, ETA) on stderr, both drivers; None: none.
    progress_interval_s: float | None = 5.0

    def __post_init__(self) -> None:
        for key in ("stall_timeout_s", "progress_interval_s", "schedule_timeout_s"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0):
                raise ConfigError(f"parallel.{key} must be a number of seconds > 0 or null, "
                                  f"got {v!r}")
        v = self.connect_timeout_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"parallel.connect_timeout_s must be a number of seconds > 0, "
                              f"got {v!r}")
        _check_node_types(self.autoscale_node_types)
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
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?",
                                                                  self.device):
            raise ConfigError(f"parallel.device must be auto, cpu, cuda or cuda:N, "
                              f"got {self.device!r}")


def _check_node_types(types: Any) -> None:
    """``parallel.autoscale_node_types``: ``{name: {resource: amount ≥ 0, max_workers: int ≥
    0 (optional)}}``; an error names the full key."""
    key = "parallel.autoscale_node_types"
    if types is None:
        return
    if not isinstance(types, Mapping) or not types:
        raise ConfigError(f"{key} must be a non-empty mapping of node type names to resources "
                          f"({{name: {{CPU: 8, GPU: 1, max_workers: 4}}}}), got {types!r}")
    for name, spec in types.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key}.{name} must be a mapping of resources, got {spec!r}")
        for res, v in spec.items():
            ok = isinstance(v, int) if res == "max_workers" else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or v < 0 or (res != "max_workers"
                                                          and not math.isfinite(v)):
                what = "an integer ≥ 0" if res == "max_workers" else "a number ≥ 0"
                raise ConfigError(f"{key}.{name}.{res} must be {what}, got {v!r}")


@dataclass(kw_only=True)
class StoreConfig:
    uri: str = "runs"
    run_id: str | None = None  # None: a fresh time-stamped id
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    overwrite: bool = False
    keep_statistics: bool = False  # store Σ in the run so new shards can be merged in later
    # A committed run that kept its Σ: read only the shards it has not counted, merge, re-solve
    # (the new run keeps its Σ too, so it can be extended again).
    extend: str | None = None
    # Ray pipeline: feed the shards N at a time and checkpoint the Σ so far after each slice
    # under <uri>/_checkpoints/<run_id>; rerunning with the same run_id resumes (resume.py).
    checkpoint_shards: int | None = None
    # One writer per run: the writer holds <uri>/_leases/<run_id> while it works, renewed every
    # quarter of this by its heartbeat. A lease not renewed for this long is a crashed writer's
    # and is broken (one whose holder ran on this host and is gone is broken at once:
    # io/lease.py); break_lease breaks a live-looking one.
    lease_timeout_s: float = 60.0
    break_lease: bool = False
    # A local store.uri on a Ray cluster of several nodes is refused (each node would hold a
    # part of the run) unless it is one filesystem mounted on every node (NFS, EFS, Lustre…).
    shared_fs: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ConfigError("store.uri must be a non-empty path or URI")
        if not isinstance(self.shared_fs, bool):
            raise ConfigError(f"store.shared_fs must be true or false, got {self.shared_fs!r}")
        self.uri = absolute_uri(self.uri, "store.uri")
        if self.extend is not None:
            self.extend = absolute_uri(self.extend, "store.extend")
        if self.run_id is not None and (problem := run_id_problem(self.run_id)) is not None:
            raise ConfigError(f"store.run_id {problem}")
        self.storage_options = _check_options(self.storage_options, "store.storage_options",
                                              [self.uri])
        t = self.lease_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"store.lease_timeout_s must be a positive number of seconds, "
                              f"got {t!r}")
        if self.checkpoint_shards is not None and self.checkpoint_shards < 1:
            raise ConfigError(f"store.checkpoint_shards must be ≥ 1, got {self.checkpoint_shards}")
        if self.checkpoint_shards is not None and self.run_id is None:
            raise ConfigError("store.checkpoint_shards needs a fixed store.run_id: a rerun "
                              "finds its checkpoint by it")
        if self.checkpoint_shards is not None and self.extend is not None:
            raise ConfigError("store.checkpoint_shards and store.extend cannot be combined yet")

    def run_uri(self, run_id: str) -> str:
        return uris.join(self.uri, run_id)

    def to_dict(self) -> dict[str, Any]:
        """The fields, credentials redacted (what run.json records)."""
        out = asdict(self)
        out["storage_options"] = redact(self.storage_options)
        return out


@dataclass(kw_only=True)
class ExtractConfig:
    model: ModelSpec
    data: DataConfig
    select: SelectConfig = field(default_factory=SelectConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def model_storage_options(self) -> dict[str, Any] | None:
        """The options ``model.path`` (and a factory's ``model.weights``) is read with, by
        every step of an extraction (its check, the loaders, the stage actors, the record of
        its checkpoint): ``data.storage_options``, else ``store.storage_options``."""
        return self.data.storage_options or self.store.storage_options

    def to_dict(self) -> dict:
        """Every section as plain data, storage credentials redacted (``"***"``): this is what
        run.json records; the options themselves travel inside the config objects."""
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
        raise ConfigError(f"config section {name!r} must be a mapping, got a "
                          f"{type(values).__name__}")
    names = [f.name for f in dataclasses.fields(typ)]
    _reject_unknown(values, names, f"{name}.")
    try:
        return typ(**dict(values))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {name!r}: {e}") from e


def _number(key: str, value: Any) -> float | None:
    """A numeric option: a number, null, or a string spelling one (YAML 1.1 reads ``1e-3``,
    without a dot, as a string)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} must be a number or null, got {value!r}")


def _key_value(flag: str, item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a command-line flag, the value parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"{flag} expects key=value, got {item!r}")
    key, _, text = item.partition("=")
    try:
        return key.strip(), yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:  # e.g. an unclosed list: one line naming the key
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{flag} {key.strip()}: value {text!r} is not valid YAML "
                          f"({problem})") from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML: numbers, lists, null)."""
    for item in overrides:
        key, value = _key_value("--set", item)
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
        raw = yaml.safe_load(uris.read_text(path)) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    return ExtractConfig.from_dict(apply_overrides(raw, overrides))
