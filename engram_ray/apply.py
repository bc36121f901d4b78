"""The one edit driver: a committed run and :class:`EditSpec` s in, edited models out.

``apply(run, specs)`` serves ``engram-ray apply`` (:func:`apply_run`, the batch of one), batch
requests and scheduled ticks alike, so every guarantee below lives here once. HF models
(``model.path``) become an HF directory (config, tokenizer, safetensors) written tensor by
tensor (``io/export.py``); factory models become ``OUT/model.safetensors``; ``format="peft"``
edits become LoRA adapters (``io/adapter.py``). Every output ends with its marker
(``edit.json`` / ``adapter_meta.json``), written last: the run, the edit, its request digest,
the solver options used, the base model, every file's size and sha256.

Refused before anything is written: a run whose model is a ``factory`` other than the
built-in ones (:data:`BUILTIN_FACTORIES`) unless the caller consents (``trust_factory=True``,
``--trust-factory``, or the model given again: importing a factory runs its code); a base
model whose weights differ from the run's (``runs.py``; ``--allow-other-weights`` with
``--model`` edits such a copy knowingly); an output holding another request's edit or
foreign files; an α that is not finite or overflows float32, and any edit whose weights would
not be finite.

Outputs (``io/outputs.py``): one writer each (the output's lease, held from inspection to
publication), staged and published marker last; an output that already holds this very
request, verified file by file, is skipped by a batch; an incomplete earlier attempt is redone.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TextIO

from engram_ray.config import EditSpec
from engram_ray.core.edit import EditPlan, SharedEngrams, apply_edit, plan_edits
from engram_ray.io.export import (
    MARKER,
    publish_stage,
    upload_dir,
    write_edited_files_many,
)
from engram_ray.io.outputs import (
    IN_PROGRESS,
    OUTPUT_FORMAT,
    file_records,
    inspect,
    new_stage,
    remove_stale,
    start,
)
from engram_ray.io.storage import Location, Storage, StorageError, as_storage
from engram_ray.io.store import held_lease
from engram_ray.models.loading import ModelSpec, build_empty, load_model, model_dir, tied_aliases
from engram_ray.runinfo import VERSION
from engram_ray.runs import (
    BUILTIN_FACTORIES,
    bind_module,
    check_trusted,
    model_at,
    open_run,
    recorded_checkpoint,
    run_dtype,
    run_model_spec,
)

__all__ = ["BUILTIN_FACTORIES", "MARKER", "MARKERS", "SKIPPED", "EditSpec", "apply", "apply_run",
           "check_trusted", "request_digest", "run_model_spec", "write_peft_adapter"]

# Each output format's completion marker, written last (an output with it is complete).
MARKERS = {"full": MARKER, "peft": "adapter_meta.json"}
SKIPPED = "skipped"  # the outcome of an edit whose output already holds it, verified


def apply_run(
    run_uri: Location,
    forget: Sequence[str],
    *,
    out: str,
    model: str | None = None,
    storage_options=None,
    trust_factory: bool = False,
    allow_other_weights: bool = False,
    device: str = "cpu",
    **edit,
) -> str:
    """Write the model with ``forget`` edited out of it to ``out``; returns ``out``: the
    driver's batch of one (:func:`apply`). ``edit`` holds the rest of the :class:`EditSpec`
    (``alpha``, ``scale``, ``modules``, ``format``, ``adapter_*``, ``solver``, ``eval``).

    ``format="peft"`` writes the edit as a PEFT LoRA adapter instead (``io/adapter.py``).
    ``solver``: overrides of the run's solver options (``{"rtol": 1e-4}``, ``["rtol=1e-4"]``),
    applied to its stored spectrum. ``allow_other_weights``: edit ``model`` although its
    weights differ from the run's (recorded in ``edit.json``); otherwise refused."""
    spec = EditSpec(forget=tuple(forget) if not isinstance(forget, str) else forget, out=out,
                    **edit)
    [error] = apply(run_uri, [spec], model=model, storage_options=storage_options,
                    trust_factory=trust_factory, allow_other_weights=allow_other_weights,
                    device=device)
    if error is not None:
        raise error
    return out


def apply(run_uri: Location, specs: Sequence[EditSpec], *, model: str | None = None,
          storage_options=None, trust_factory: bool = False, allow_other_weights: bool = False,
          skip_complete: bool = False, log: TextIO | None = None, device: str = "cpu",
          outputs: dict[int, Storage] | None = None) -> list[BaseException | str | None]:
    """The one edit driver: every :class:`EditSpec` of one run (``apply``, a batch's requests,
    a tick's), each output exactly what it would be alone, with the work shared: each input
    group's half of each union is formed once (``core.solve.union_right``, through one
    :class:`~engram_ray.core.edit.SharedEngrams` per solver option set), the per-layer scales
    of every edit in one pass (``core.edit.plan_edits``), the full checkpoints in one lockstep
    pass over the base checkpoint (each base tensor read once), the adapters in one pass over
    the modules.

    Each output is written by one writer (its lease is held from inspection to publication,
    ``io/outputs.py``): an output holding this very request, verified, is :data:`SKIPPED` with
    ``skip_complete`` (a batch, a tick) and refused otherwise; another request's output is
    refused naming both; an earlier attempt's incomplete output is redone. Returns each edit's
    outcome: None (written), :data:`SKIPPED`, or its error; one failed edit never stops the
    others. An edit with an ``eval`` set is scored before anything is written (its summary
    goes into its marker); an eval that fails fails that edit only. ``device``: where the
    updates are formed (``runs.edit_device``: ``cpu``, ``cuda[:N]`` or ``auto``).
    ``outputs``: a dict to fill with each edit's output :class:`Storage` (by index), so that a
    caller reading an output back (a batch's summary) does not build it again."""
    run = open_run(run_uri, storage_options, model=model, trust_factory=trust_factory,
                   allow_other_weights=allow_other_weights, device=device)
    base = run_model_spec(run, model)
    check_trusted(base, run.uri, given=model is not None, trust_factory=trust_factory)
    # The base model folder as the run's binder reads it: the writers read it through the same
    # location (a remote folder's one Storage).
    at = None if base.path is None else model_at(run, base.path, storage_options)
    results: list[BaseException | str | None] = [None] * len(specs)
    outs: dict[int, Storage] = {} if outputs is None else outputs  # built once, by _claim
    with contextlib.ExitStack() as held:
        todo = _claim(run, specs, results, outs, storage_options, held, skip_complete, log)
        net = None
        if base.path is None and any(specs[i].format == "full" for i in todo):
            # A factory model is edited in memory: built once, bound, and copied per edit.
            net = load_model(base, storage_options, dtype=run_dtype(run))
            bind_module(run, net, f"factory {base.factory}").weights.allow_other = \
                allow_other_weights
        plans: dict[int, EditPlan] = {}
        for solver in dict.fromkeys(specs[i].solver for i in todo):  # a source per solver
            source = run.with_solver(None if solver is None
                                     else run.run_solver.updated(dict(solver)))
            group = [i for i in todo if specs[i].solver == solver]
            plans.update(_plans(SharedEngrams(source), specs, group, results))
        evals = _evaluate(run, base, at, specs, plans, results, storage_options)
        full = {i: p for i, p in plans.items() if specs[i].format == "full"}
        peft = {i: p for i, p in plans.items() if specs[i].format == "peft"}
        if full:
            _write_full(run, base, at, specs, full, results, outs, storage_options, evals, net)
        if peft:
            _write_adapters(run, base, at, specs, peft, results, outs, storage_options, evals)
    return results


def request_digest(run, spec: EditSpec) -> str:
    """What an output's marker must name to be this request's: the edit (``spec.digest``),
    the run's committed generation (its manifest's sha256) and the output format."""
    blob = json.dumps({"edit": spec.digest(), "run": run.uri, "output_format": OUTPUT_FORMAT,
                       "run_manifest": run.marker["manifest_sha256"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _claim(run, specs: Sequence[EditSpec], results: list, outs: dict[int, Storage],
           storage_options, held, skip_complete: bool, log: TextIO | None) -> list[int]:
    """Take each output's lease (held until the driver ends) and inspect it: the edits still
    to write. A complete output of the same request is skipped (or refused), an incomplete
    one of an earlier attempt cleared, stale stages of dead writers removed. Each output's
    Storage goes into ``outs`` (the writers use it: one per output)."""
    todo = []
    for i, spec in enumerate(specs):
        try:
            dest = outs[i] = as_storage(spec.out, storage_options)
            try:
                held.enter_context(held_lease(dest, what=f"output {dest.uri}"))
            except StorageError as e:  # name the output the user gave, not the lease file
                raise StorageError(f"output {dest.uri}: {e}") from e.__cause__
            state, why = inspect(dest, MARKERS[spec.format], request_digest(run, spec))
            if state == "complete":
                if not skip_complete:
                    raise FileExistsError(f"output {dest.uri} already holds this very edit "
                                          "(complete, every file verified)")
                results[i] = SKIPPED
                continue
            if state == "incomplete":
                print(f"[engram-ray] output {dest.uri} is incomplete ({why}): redoing it",
                      file=log or sys.stderr, flush=True)
                dest.rm()
            remove_stale(dest)
            todo.append(i)
        except Exception as ex:  # noqa: BLE001 - this edit fails, the batch goes on
            results[i] = ex
    return todo


def write_peft_adapter(run, forget: Sequence[str], *, out: str, alpha: float = 1.0,
                       scale="uniform", modules=None, base_model_dir_or_spec=None,
                       rtol: float | None = None, exact_dense: bool = False, dtype=None,
                       storage_options=None, trust_factory: bool = False,
                       max_rank: int | None = None) -> dict:
    """One PEFT adapter of ``run`` (a :class:`~engram_ray.io.store.Run` or its URI) for an
    in-memory plan, without the driver's output lease: the Python API's way to write an
    adapter for a live module (``base_model_dir_or_spec``: an HF directory or URI, a
    ``ModelSpec`` or its dict, or an ``nn.Module``; default the run's model). ``rtol``,
    ``exact_dense`` and ``max_rank`` as in ``io/adapter.py``; ``dtype``: of the stored factors
    (default each module's weight dtype). Returns ``adapter_meta.json``'s content."""
    from engram_ray.core.edit import plan_edit
    from engram_ray.io.adapter import AdapterJob, write_peft_adapters
    from engram_ray.runs import adapter_base

    if isinstance(run, str):
        run = open_run(run, storage_options, trust_factory=trust_factory)
    plan = plan_edit(run, forget, alpha=alpha, scale=scale, modules=modules)
    name = scale if isinstance(scale, str) else getattr(scale, "__name__", repr(scale))
    base = adapter_base(run, base_model_dir_or_spec, storage_options,
                        trust_factory=trust_factory)
    [meta] = write_peft_adapters(run, [AdapterJob(plan, out, name, rtol, exact_dense,
                                                  max_rank=max_rank)],
                                 base=base, dtype=dtype, storage_options=storage_options)
    if isinstance(meta, BaseException):
        raise meta
    return meta


def _evaluate(run, spec: ModelSpec, at: Location | None, edits: Sequence[EditSpec],
              plans: dict[int, EditPlan], errors: list, storage_options) -> dict[int, dict]:
    """The eval summary of every planned edit with an ``eval`` set, before any is written (the
    run's model loaded once, each set's base scores computed once: ``EditEvaluator``). An edit
    whose eval fails gets the error and leaves ``plans``: nothing of it is written."""
    wanted = [i for i in plans if edits[i].eval]
    if not wanted:
        return {}
    from engram_ray.eval.edit_scores import EditEvaluator

    evaluator, out = EditEvaluator(run, spec, storage_options, location=at), {}
    for i in wanted:
        label = "edited checkpoint" if edits[i].format == "full" else "dense edit"
        try:
            out[i] = evaluator.summary(edits[i].eval, plans[i], label)
        except Exception as ex:  # noqa: BLE001 - this edit fails, the batch goes on
            errors[i] = ex
            del plans[i]
    return out


def _plans(shared: SharedEngrams, specs: Sequence[EditSpec], todo: Sequence[int],
           results: list) -> dict[int, EditPlan]:
    """The plans of the edits ``todo`` (module-major, ``plan_edits``); an edit that cannot be
    planned gets its error."""
    planned = plan_edits(shared, [(specs[i].forget, specs[i].alpha, specs[i].scale,
                                   _listed(specs[i].modules)) for i in todo])
    plans = {}
    for i, plan in zip(todo, planned):
        if isinstance(plan, BaseException):
            results[i] = plan
        else:
            plans[i] = plan
    return plans


def _write_full(run, base: ModelSpec, at: Location | None, specs: Sequence[EditSpec],
                plans: dict[int, EditPlan],
                errors: list, outs: dict[int, Storage], storage_options,
                evals: dict[int, dict], net=None) -> None:
    """The full checkpoints of ``plans``, in lockstep over the base checkpoint (one read of
    each tensor), each published whole with ``edit.json`` last (holding ``evals[i]``). A
    factory model (``net``, the one the run is bound to) is copied and edited per edit."""
    stages = {}
    for i in plans:
        stages[i] = new_stage(outs[i])
        start(stages[i], request_digest(run, specs[i]))
    try:
        if base.path is not None:
            src = model_dir(at, storage_options)
            recorded = recorded_checkpoint(run)
            aliases = recorded["checkpoint"].get("aliases") or {} if recorded is not None \
                else tied_aliases(build_empty(base, storage_options, location=at))
            done = write_edited_files_many(src, [stages[i] for i in plans],
                                           list(plans.values()), aliases)
        else:
            done = [_factory_edit(stages[i], net, plans[i]) for i in plans]
        for i, err in zip(list(plans), done):
            errors[i] = err or _finish(run, base, plans[i], specs[i], stages[i], outs[i],
                                       evals.get(i))
    finally:
        for stage in stages.values():
            shutil.rmtree(stage, ignore_errors=True)


def _factory_edit(stage: str, net, plan: EditPlan) -> BaseException | None:
    try:
        _write_factory_model(stage, copy.deepcopy(net), plan)
    except Exception as ex:  # noqa: BLE001 - this edit fails, the batch goes on
        return ex
    return None


def _write_adapters(run, base: ModelSpec, at: Location | None, specs: Sequence[EditSpec],
                    plans: dict[int, EditPlan], errors: list, outs: dict[int, Storage],
                    storage_options, evals: dict[int, dict]) -> None:
    """The adapters of ``plans``, in one pass over the modules (``write_peft_adapters``), each
    ``adapter_meta.json`` holding ``evals[i]`` and the solver used."""
    from engram_ray.io.adapter import AdapterJob, write_peft_adapters
    from engram_ray.runs import adapter_base

    jobs = [AdapterJob(p, outs[i], specs[i].scale, specs[i].adapter_rtol,
                       specs[i].adapter_exact_dense,
                       {"solver": _source_run(p.source).solver.to_dict(),
                        "edit_digest": specs[i].digest(),
                        "request_digest": request_digest(run, specs[i]),
                        **({"eval": evals[i]} if i in evals else {})},
                       max_rank=specs[i].adapter_max_rank) for i, p in plans.items()]
    try:
        results = write_peft_adapters(run, jobs, storage_options=storage_options,
                                      base=adapter_base(run, base, storage_options,
                                                        location=at))
    except Exception as ex:  # noqa: BLE001 - the base model failed: every adapter of it
        results = [ex] * len(jobs)
    for i, result in zip(plans, results):
        errors[i] = result if isinstance(result, BaseException) else None


def _finish(run, base: ModelSpec, plan: EditPlan, spec: EditSpec, stage: str, dest: Storage,
            evaluation: dict | None = None) -> BaseException | None:
    """``edit.json`` (with ``evaluation`` as its ``"eval"``) into a written ``stage``, then
    publish it to ``dest`` (``spec.out``'s Storage); the error, if any."""
    try:
        provenance = _provenance(run, base, plan, spec)
        if evaluation is not None:
            provenance["eval"] = evaluation
        _write_marker(stage, plan, provenance)
        if dest.remote:
            upload_dir(stage, dest, MARKER)  # the attempt's note first, the marker last
        else:
            os.remove(os.path.join(stage, IN_PROGRESS))  # a local output appears whole
            publish_stage(stage, spec.out)
    except Exception as ex:  # noqa: BLE001 - this edit fails, the batch goes on
        return ex
    return None


def _source_run(source):
    """The run behind a plan's source (a :class:`SharedEngrams` wraps one)."""
    return getattr(source, "source", source)


def _listed(modules):
    return list(modules) if isinstance(modules, tuple) else modules


def _write_marker(stage: str, plan: EditPlan, provenance: dict) -> None:
    """``edit.json`` (the provenance, what the write noted, every file's size and sha256:
    what a later batch verifies before it skips the output), last."""
    provenance["notes"] = list(plan.notes)  # what the write noted (tied weights edited once)
    provenance["files"] = file_records(stage, MARKER)
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


def _provenance(run, base: ModelSpec, plan: EditPlan, spec: EditSpec) -> dict:
    """What ``edit.json`` says: which run, which edit (and its digest), which base model,
    which solver options, which software."""
    source = _source_run(plan.source)
    return {
        "run": run.uri,
        "concepts": list(plan.forget),
        "alpha": plan.alpha,
        "scale": spec.scale,
        "modules_requested": _listed(spec.modules),
        "modules": {m: plan.scales[m] for m in sorted(plan.scales)},
        "base_model": {"spec": base.to_dict(),
                       "fingerprint": (run.info.get("model") or {}).get("fingerprint")},
        "solver": source.solver.to_dict(),
        "allow_other_weights": bool(getattr(source.weights, "allow_other", False)),
        "edit_digest": spec.digest(),
        "request_digest": request_digest(run, spec),
        "output_format": OUTPUT_FORMAT,
        "engram_ray_version": VERSION,
    }
