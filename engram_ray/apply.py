"""``apply``: turn a committed run into an edited model, published whole or not at all.

HF models (``model.path``) become an HF directory (config, tokenizer, safetensors) written
tensor by tensor (``io/export.py``); factory models become ``OUT/model.safetensors`` holding the
edited state dict. Every output ends with ``edit.json`` (:data:`~engram_ray.io.export.MARKER`),
written last: the run, concepts, α, scale, modules, the base model's fingerprint and the
engram-ray version. An output without it is not a complete edit.

What is refused, before anything is written:

- a run whose model is a ``factory`` (``"pkg.module:callable"``), unless the caller consents:
  ``trust_factory=True`` (``--trust-factory``) or the model given again (``model=``,
  ``--model``). A factory is imported and called, so running the one a run names would run
  whatever code its ``run.json`` says; the factories shipped in :mod:`engram_ray.models`
  (:data:`BUILTIN_FACTORIES`, constructors of plain modules) are the exception;
- an output that is an existing file or a non-empty directory or ``s3://`` prefix;
- an α that is not finite or overflows float32, and any edit whose weights would not be finite.

A local output is written under ``<out>.partial-<nonce>`` and renamed into place; an ``s3://``
output is written to a local temporary directory, uploaded with the marker last (what was
uploaded is removed if the upload fails), and the temporary directory is removed either way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engram_ray.config import SolverConfig
from engram_ray.core.edit import EditPlan, SharedEngrams, apply_edit, plan_edit, plan_edits
from engram_ray.io.export import (
    MARKER,
    check_output,
    new_stage,
    publish_stage,
    staged_local,
    upload_dir,
    write_edited_files,
    write_edited_files_many,
)
from engram_ray.io.storage import Storage
from engram_ray.models.loading import ModelSpec, build_empty, load_model, model_dir, tied_aliases
from engram_ray.runinfo import VERSION
from engram_ray.runs import (
    BUILTIN_FACTORIES,
    bind_module,
    check_trusted,
    open_run,
    run_dtype,
    run_model_spec,
)

__all__ = ["BUILTIN_FACTORIES", "MARKER", "Edit", "apply_many", "apply_run", "check_trusted",
           "run_model_spec"]

def apply_run(
    run_uri: str,
    forget: Sequence[str],
    *,
    alpha: float = 1.0,
    scale: str = "uniform",
    modules=None,
    out: str,
    model: str | None = None,
    storage_options=None,
    trust_factory: bool = False,
    format: str = "full",
    adapter_rtol: float | None = None,
    adapter_exact_dense: bool = False,
    solver: SolverConfig | Mapping | Sequence[str] | None = None,
    allow_other_weights: bool = False,
) -> str:
    """Write the model with ``forget`` edited out of it to ``out``; returns ``out``.

    ``format="peft"`` writes the edit as a PEFT LoRA adapter instead (``io/adapter.py``):
    exact for low-rank engrams, a truncated SVD within ``adapter_rtol`` for dense ones.
    ``solver``: other solver options than the run's (a :class:`SolverConfig`, or overrides
    of the run's own such as ``["rtol=1e-4"]``), applied to its stored spectrum.
    ``allow_other_weights``: edit ``model`` although its weights differ from the run's
    (recorded in ``edit.json``); by default such a model is refused, naming the module."""
    if format not in ("full", "peft"):
        raise ValueError(f"format must be 'full' or 'peft', got {format!r}")
    dest = Storage(out, storage_options)
    check_output(dest)
    run = open_run(run_uri, storage_options, model=model, solver=solver,
                   trust_factory=trust_factory, allow_other_weights=allow_other_weights)
    spec = run_model_spec(run, model)
    check_trusted(spec, run.uri, given=model is not None, trust_factory=trust_factory)
    net = None
    if spec.path is None and format == "full":  # a factory model: built once, edited in memory
        net = load_model(spec, storage_options, dtype=run_dtype(run))
        bind_module(run, net, f"factory {spec.factory}").weights.allow_other = allow_other_weights
    if format == "peft":
        from engram_ray.io.adapter import write_peft_adapter

        write_peft_adapter(run, list(forget or []), alpha=alpha, scale=scale, modules=modules,
                           out=out, base_model_dir_or_spec=spec, rtol=adapter_rtol,
                           exact_dense=adapter_exact_dense, storage_options=storage_options,
                           trust_factory=True)  # consent was checked just above
        return out
    plan = plan_edit(run, forget or [], alpha=alpha, scale=scale, modules=modules)
    provenance = _provenance(run, spec, plan, scale, modules)
    if not dest.remote:
        with staged_local(out) as stage:
            _write(stage, spec, plan, provenance, storage_options, net)
        return out
    tmp = tempfile.mkdtemp(prefix="engram-apply-")
    try:
        _write(tmp, spec, plan, provenance, storage_options, net)
        check_output(dest)  # again: someone may have written there meanwhile
        upload_dir(tmp, dest, MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(stage: str, spec: ModelSpec, plan: EditPlan, provenance: dict,
           storage_options, net=None) -> None:
    """The edited model into the empty directory ``stage``, then ``edit.json`` last; ``net``:
    the factory model built already (the one the run is bound to)."""
    if spec.path is not None:
        src = model_dir(spec.path, storage_options)
        aliases = tied_aliases(build_empty(spec, storage_options))
        write_edited_files(src, stage, plan, aliases)
    else:
        _write_factory_model(stage, net if net is not None else load_model(spec, storage_options),
                             plan)
    _write_marker(stage, plan, provenance)


@dataclass(frozen=True)
class Edit:
    """One edit of a batch (``apply_many``): forget ``concepts`` at ``alpha`` into ``out``,
    as an edited checkpoint (``format="full"``) or a PEFT adapter (``"peft"``, with
    ``adapter_rtol`` and ``adapter_exact_dense`` as in :func:`apply_run`). ``eval``: an eval
    set whose summary goes into the output's marker (``eval/edit_scores.py``)."""

    concepts: tuple[str, ...]
    out: str
    alpha: float = 1.0
    scale: str = "uniform"
    modules: tuple[str, ...] | str | None = None
    format: str = "full"
    adapter_rtol: float | None = None
    adapter_exact_dense: bool = False
    eval: str | None = None
    solver: SolverConfig | None = None


def apply_many(run_uri: str, edits: Sequence[Edit], *, storage_options=None,
               trust_factory: bool = False) -> list[BaseException | None]:
    """Every edit of one run, each output exactly what :func:`apply_run` writes for it, with
    the reads shared: every module's engrams are read through one
    :class:`~engram_ray.core.edit.SharedEngrams` over the union of the forget sets, and the
    work goes module by module for all edits at once — the per-layer scales of every edit in
    one pass (``core.edit.plan_edits``), the full checkpoints in one lockstep pass over the base
    checkpoint (each base tensor read once, ``export.write_edited_files_many``), the adapters
    in one pass over the modules (``adapter.write_peft_adapters``). So the reads of a batch do
    not grow with its number of edits. Returns each edit's error (None: written); one failed
    edit never stops the others. Full edits of factory models (built in memory) go one by
    one. An edit with an ``eval`` set is scored before anything is written and its summary
    goes into its marker (:func:`_evaluate`); an eval that fails fails that edit only."""
    run = open_run(run_uri, storage_options, trust_factory=trust_factory)
    spec = run_model_spec(run)
    check_trusted(spec, run.uri, given=False, trust_factory=trust_factory)
    errors: list[BaseException | None] = [None] * len(edits)
    todo = list(range(len(edits)))
    if spec.path is None:  # a factory model: full edits are built in memory, one by one
        todo = [i for i in todo if edits[i].format != "full" or edits[i].eval]
        for i in set(range(len(edits))) - set(todo):
            errors[i] = _one(run_uri, edits[i], storage_options, trust_factory)
    plans = {}
    for solver in dict.fromkeys(edits[i].solver for i in todo):  # one source per solver
        shared = SharedEngrams(run.with_solver(solver))
        group = [i for i in todo if edits[i].solver == solver]
        plans.update(_plans(shared, edits, group, errors, storage_options))
    evals = _evaluate(run, spec, edits, plans, errors, storage_options)
    full = {i: p for i, p in plans.items() if edits[i].format == "full"}
    peft = {i: p for i, p in plans.items() if edits[i].format == "peft"}
    if full:
        _write_full(run, spec, edits, full, errors, storage_options, evals)
    if peft:
        _write_adapters(run, spec, edits, peft, errors, storage_options, evals)
    return errors


def _evaluate(run, spec: ModelSpec, edits: Sequence[Edit], plans: dict[int, EditPlan],
              errors: list, storage_options) -> dict[int, dict]:
    """The eval summary of every planned edit with an ``eval`` set, before any is written (the
    run's model loaded once, each set's base scores computed once: ``EditEvaluator``). An edit
    whose eval fails gets the error and leaves ``plans``: nothing of it is written."""
    wanted = [i for i in plans if edits[i].eval]
    if not wanted:
        return {}
    from engram_ray.eval.edit_scores import EditEvaluator

    evaluator, out = EditEvaluator(run, spec, storage_options), {}
    for i in wanted:
        label = "edited checkpoint" if edits[i].format == "full" else "dense edit"
        try:
            out[i] = evaluator.summary(edits[i].eval, plans[i], label)
        except Exception as ex:  # noqa: BLE001 - this edit fails, the batch goes on
            errors[i] = ex
            del plans[i]
    return out


def _plans(shared: SharedEngrams, edits: Sequence[Edit], todo: Sequence[int], errors: list,
           storage_options) -> dict[int, EditPlan]:
    """The plans of the edits ``todo`` (module-major, ``plan_edits``); an edit whose output is
    taken or whose format is unknown fails here, before any work."""
    ok = []
    for i in todo:
        try:
            if edits[i].format not in ("full", "peft"):
                raise ValueError(f"format must be 'full' or 'peft', got {edits[i].format!r}")
            check_output(Storage(edits[i].out, storage_options))
            ok.append(i)
        except Exception as ex:  # noqa: BLE001 - this edit fails, the batch goes on
            errors[i] = ex
    planned = plan_edits(shared, [(edits[i].concepts, edits[i].alpha, edits[i].scale,
                                   _listed(edits[i].modules)) for i in ok])
    plans = {}
    for i, plan in zip(ok, planned):
        if isinstance(plan, BaseException):
            errors[i] = plan
        else:
            plans[i] = plan
    return plans


def _write_full(run, spec: ModelSpec, edits: Sequence[Edit], plans: dict[int, EditPlan],
                errors: list, storage_options, evals: dict[int, dict]) -> None:
    """The full checkpoints of ``plans``, in lockstep over the base checkpoint (one read of
    each tensor), each published whole with ``edit.json`` last (holding ``evals[i]``)."""
    stages = {i: new_stage(edits[i].out) if not Storage(edits[i].out).remote
              else tempfile.mkdtemp(prefix="engram-apply-") for i in plans}
    try:
        src = model_dir(spec.path, storage_options)
        aliases = tied_aliases(build_empty(spec, storage_options))
        done = write_edited_files_many(src, [stages[i] for i in plans],
                                       list(plans.values()), aliases)
        for i, err in zip(list(plans), done):
            errors[i] = err or _finish(run, spec, plans[i], edits[i], stages[i],
                                       storage_options, evals.get(i))
    finally:
        for stage in stages.values():
            shutil.rmtree(stage, ignore_errors=True)


def _write_adapters(run, spec: ModelSpec, edits: Sequence[Edit], plans: dict[int, EditPlan],
                    errors: list, storage_options, evals: dict[int, dict]) -> None:
    """The adapters of ``plans``, in one pass over the modules (``write_peft_adapters``), each
    ``adapter_meta.json`` holding ``evals[i]``."""
    from engram_ray.io.adapter import AdapterJob, write_peft_adapters

    jobs = [AdapterJob(p, edits[i].out, edits[i].scale, edits[i].adapter_rtol,
                       edits[i].adapter_exact_dense,
                       {"eval": evals[i]} if i in evals else None) for i, p in plans.items()]
    try:
        results = write_peft_adapters(run, jobs, base_model_dir_or_spec=spec,
                                      storage_options=storage_options,
                                      trust_factory=True)  # consent was checked by the caller
    except Exception as ex:  # noqa: BLE001 - the base model failed: every adapter of it
        results = [ex] * len(jobs)
    for i, result in zip(plans, results):
        errors[i] = result if isinstance(result, BaseException) else None


def _one(run_uri: str, e: Edit, storage_options, trust_factory: bool) -> BaseException | None:
    try:
        apply_run(run_uri, list(e.concepts), alpha=e.alpha, scale=e.scale,
                  modules=_listed(e.modules), out=e.out, storage_options=storage_options,
                  trust_factory=trust_factory, format=e.format, adapter_rtol=e.adapter_rtol,
                  adapter_exact_dense=e.adapter_exact_dense, solver=e.solver)
    except Exception as ex:  # noqa: BLE001 - returned: the batch goes on
        return ex
    return None


def _finish(run, spec: ModelSpec, plan: EditPlan, e: Edit, stage: str,
            storage_options, evaluation: dict | None = None) -> BaseException | None:
    """``edit.json`` (with ``evaluation`` as its ``"eval"``) into a written ``stage``, then
    publish it to ``e.out``; the error, if any."""
    try:
        provenance = _provenance(run, spec, plan, e.scale, _listed(e.modules))
        if evaluation is not None:
            provenance["eval"] = evaluation
        _write_marker(stage, plan, provenance)
        dest = Storage(e.out, storage_options)
        if dest.remote:
            check_output(dest)  # again: someone may have written there meanwhile
            upload_dir(stage, dest, MARKER)
        else:
            publish_stage(stage, e.out)
    except Exception as ex:  # noqa: BLE001 - this edit fails, the batch goes on
        return ex
    return None


def _source_run(source):
    """The run behind a plan's source (a :class:`SharedEngrams` wraps one)."""
    return getattr(source, "source", source)


def _listed(modules):
    return list(modules) if isinstance(modules, tuple) else modules


def _write_marker(stage: str, plan: EditPlan, provenance: dict) -> None:
    """``edit.json`` (the provenance, what the write noted, the files' sizes), last."""
    provenance["notes"] = list(plan.notes)  # what the write noted (tied weights edited once)
    provenance["files"] = {name: os.path.getsize(os.path.join(stage, name))
                           for name in sorted(os.listdir(stage))}
    with open(os.path.join(stage, MARKER), "w") as f:
        json.dump(provenance, f, indent=1, sort_keys=True)


def _write_factory_model(stage: str, net, plan: EditPlan) -> None:
    """A factory model, edited in memory, as ``stage/model.safetensors`` (tied tensors once)."""
    from safetensors.torch import save_file

    apply_edit(net, plan)
    state, seen = {}, set()
    for k, v in net.state_dict().items():
        if v.data_ptr() in seen:  # tied tensors are stored once, like HF does
            continue
        seen.add(v.data_ptr())
        state[k] = v.contiguous()
    save_file(state, os.path.join(stage, "model.safetensors"))


def _provenance(run, spec: ModelSpec, plan: EditPlan, scale, modules) -> dict:
    """What ``edit.json`` says: which run, which edit, which base model, which software."""
    return {
        "run": run.uri,
        "concepts": list(plan.forget),
        "alpha": plan.alpha,
        "scale": scale if isinstance(scale, str) else getattr(scale, "__name__", repr(scale)),
        "modules_requested": modules if modules is None or isinstance(modules, str)
        else list(modules),
        "modules": {m: plan.scales[m] for m in sorted(plan.scales)},
        "base_model": {"spec": spec.to_dict(),
                       "fingerprint": (run.info.get("model") or {}).get("fingerprint")},
        "solver": _source_run(plan.source).solver.to_dict(),
        "allow_other_weights": bool(getattr(_source_run(plan.source).weights, "allow_other",
                                            False)),
        "engram_ray_version": VERSION,
    }
