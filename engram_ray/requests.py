"""Batch unlearning: many edits of committed runs from one table of requests.

Cloud unlearning comes in batches (one edit per tenant, takedown request or jurisdiction), so
``engram-ray batch REQUESTS`` reads a Parquet or JSON-lines file with one request per row::

    request_id  str, unique        a name for the request (the summary's key)
    run         str                a committed run's URI
    concepts    list[str] | str    the concepts to forget (a string is one concept)
    out         str                where the edited model goes (local or s3://)
    alpha       float = 1.0        edit strength
    scale       str = "uniform"    per-layer scaling (see core/edit.py)
    modules     list[str] | str | null   only these modules (PEFT-style selection)
    format      str = "full"       "full" (an edited checkpoint) or "peft" (a LoRA adapter)
    adapter_rtol         float | null   peft: truncation tolerance for dense engrams
    adapter_exact_dense  bool = false   peft: dense engrams as full deltas, not truncated

Each request is one ``apply``: an edited checkpoint written tensor by tensor with ``edit.json``
last, or a PEFT adapter with ``adapter_meta.json`` last (the output's completion marker and
provenance). Requests that edit the same run are done together, one Ray task per run
(``--local``: here): the full-checkpoint ones in one pass over the base checkpoint, reading
each module's engrams once for all of them (``apply.apply_many``), so a batch of N edits of a
run costs one read of the model and of the engrams plus N writes. Requests are independent:
one that fails is recorded and the others go on. A re-run skips the requests whose output is
complete, so a batch killed half way resumes. The summary table (Parquet) has one row per
request: status (``done`` | ``skipped`` | ``failed``), output, seconds and the error's
one-line message.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engram_ray.io.storage import Storage

__all__ = ["EditRequest", "read_requests", "run_batch", "run_group", "run_request",
           "write_summary"]

REQUIRED = ("request_id", "run", "concepts", "out")
OPTIONAL = {"alpha": 1.0, "scale": "uniform", "modules": None, "format": "full",
            "adapter_rtol": None, "adapter_exact_dense": False}
# Written last by apply: an output holding its format's marker is complete.
COMPLETE = {"full": "edit.json", "peft": "adapter_meta.json"}


@dataclass(frozen=True)
class EditRequest:
    """One validated request row."""

    request_id: str
    run: str
    concepts: tuple[str, ...]
    out: str
    alpha: float = 1.0
    scale: str = "uniform"
    modules: tuple[str, ...] | str | None = None
    format: str = "full"
    adapter_rtol: float | None = None
    adapter_exact_dense: bool = False


def read_requests(uri: str, storage_options: Mapping | None = None,
                  default_run: str | None = None) -> list[EditRequest]:
    """Read and validate a requests file; errors name the file, the row and the column.
    ``default_run`` fills rows that name no run (a scheduled queue's current run)."""
    data = Storage(uri, storage_options).read_bytes()
    try:
        if uri.endswith((".parquet", ".pq")):
            rows = pq.read_table(pa.BufferReader(data)).to_pylist()
        else:
            rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"requests file {uri} cannot be read: {e}") from None
    if not rows:
        raise ValueError(f"requests file {uri} holds no requests")
    if default_run is not None:
        rows = [{"run": default_run, **r} if isinstance(r, Mapping) and not r.get("run") else r
                for r in rows]
    out = [_request(uri, i, row) for i, row in enumerate(rows)]
    seen: set[str] = set()
    for r in out:
        if r.request_id in seen:
            raise ValueError(f"requests file {uri}: request_id {r.request_id!r} appears twice")
        seen.add(r.request_id)
    return out


def _request(uri: str, i: int, row: Any) -> EditRequest:
    where = f"requests file {uri}, row {i}"
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with columns {list(REQUIRED)}")
    missing = [c for c in REQUIRED if row.get(c) in (None, "", [])]
    if missing:
        raise ValueError(f"{where}: column {missing[0]!r} is missing or empty")
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown column {unknown[0]!r} (known: "
                         f"{list(REQUIRED) + list(OPTIONAL)})")
    values = {**OPTIONAL, **{k: v for k, v in row.items() if v is not None}}
    concepts = values["concepts"]
    concepts = (concepts,) if isinstance(concepts, str) else tuple(str(c) for c in concepts)
    try:
        alpha = float(values["alpha"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: alpha must be a number, got {values['alpha']!r}") from None
    if not math.isfinite(alpha):
        raise ValueError(f"{where}: alpha must be finite, got {alpha}")
    modules = values["modules"]
    if modules is not None and not isinstance(modules, str):
        modules = tuple(str(m) for m in modules)
    return EditRequest(str(values["request_id"]), str(values["run"]), concepts,
                       str(values["out"]), alpha, str(values["scale"]), modules,
                       *_adapter_columns(where, values))


def _adapter_columns(where: str, values: Mapping) -> tuple[str, float | None, bool]:
    """(format, adapter_rtol, adapter_exact_dense) of a row, validated."""
    fmt = values["format"]
    if fmt not in COMPLETE:
        raise ValueError(f"{where}: format must be one of {sorted(COMPLETE)}, got {fmt!r}")
    rtol = values["adapter_rtol"]
    if rtol is not None:
        try:
            rtol = float(rtol)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: adapter_rtol must be a number, got {rtol!r}") from None
        if not 0 <= rtol < 1:
            raise ValueError(f"{where}: adapter_rtol must be in [0, 1), got {rtol}")
    exact = values["adapter_exact_dense"]
    if not isinstance(exact, bool):
        raise ValueError(f"{where}: adapter_exact_dense must be true or false, got {exact!r}")
    if fmt == "full" and (rtol is not None or exact):
        raise ValueError(f"{where}: adapter_rtol and adapter_exact_dense need format 'peft'")
    return fmt, rtol, exact


def run_request(request: EditRequest, storage_options: Mapping | None = None,
                trust_factory: bool = False) -> dict:
    """Run one request alone (or skip it when its output is complete): one summary row; an
    error is recorded, never raised, so one bad request never stops the others."""
    from engram_ray.apply import apply_run

    t0 = time.time()
    try:
        if _complete(request, storage_options):
            return _row(request, "skipped", 0.0)
        apply_run(request.run, list(request.concepts), alpha=request.alpha,
                  scale=request.scale, modules=_modules(request.modules), out=request.out,
                  storage_options=storage_options, trust_factory=trust_factory,
                  format=request.format, adapter_rtol=request.adapter_rtol,
                  adapter_exact_dense=request.adapter_exact_dense)
        return _row(request, "done", time.time() - t0)
    except Exception as e:  # noqa: BLE001 - recorded in the summary, the batch goes on
        return _row(request, "failed", time.time() - t0, e)


def run_group(requests: Sequence[EditRequest], storage_options: Mapping | None = None,
              trust_factory: bool = False) -> list[dict]:
    """The requests of one run (module docstring): full checkpoints together through
    ``apply.apply_many`` (one read of the model and of each module's engrams), adapters one
    by one; summary rows in request order. Seconds of the shared pass are split evenly."""
    from engram_ray.apply import Edit, apply_many

    rows: dict[int, dict] = {}
    full = []
    for i, r in enumerate(requests):
        if r.format != "full":
            rows[i] = run_request(r, storage_options, trust_factory)
            continue
        try:
            if _complete(r, storage_options):
                rows[i] = _row(r, "skipped", 0.0)
                continue
        except Exception as e:  # noqa: BLE001 - recorded, the batch goes on
            rows[i] = _row(r, "failed", 0.0, e)
            continue
        full.append(i)
    if full:
        t0 = time.time()
        try:
            errors = apply_many(requests[full[0]].run, [
                Edit(requests[i].concepts, requests[i].out, requests[i].alpha, requests[i].scale,
                     requests[i].modules) for i in full],
                storage_options=storage_options, trust_factory=trust_factory)
        except Exception as e:  # noqa: BLE001 - the run itself failed: every request of it
            errors = [e] * len(full)
        each = (time.time() - t0) / len(full)
        for i, err in zip(full, errors):
            rows[i] = _row(requests[i], "failed" if err else "done", each, err)
    return [rows[i] for i in range(len(requests))]


def _complete(request: EditRequest, storage_options: Mapping | None) -> bool:
    return Storage(request.out, storage_options).exists(COMPLETE[request.format])


def _row(request: EditRequest, status: str, seconds: float, error: BaseException | None = None
         ) -> dict:
    msg = None
    if error is not None:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        msg = f"{type(error).__name__}: {text}"
    return {"request_id": request.request_id, "out": request.out, "status": status,
            "seconds": seconds, "error": msg}


def _modules(modules):
    return list(modules) if isinstance(modules, tuple) else modules


def run_batch(requests: Sequence[EditRequest], *, storage_options: Mapping | None = None,
              trust_factory: bool = False,
              map_fn: Callable[[Callable, Iterable], list] | None = None) -> list[dict]:
    """Every request's summary row, in request order. Requests are grouped by run
    (:func:`run_group`); ``map_fn(fn, items)`` runs the groups (default: one after another
    here; the CLI passes Ray's one-task-per-item map)."""
    by_run: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_run.setdefault(r.run, []).append(i)
    items = [([requests[i] for i in idx], storage_options, trust_factory)
             for idx in by_run.values()]
    results = [_run_item(x) for x in items] if map_fn is None else map_fn(_run_item, items)
    rows: dict[int, dict] = {}
    for idx, group_rows in zip(by_run.values(), results):
        rows.update(zip(idx, group_rows))
    return [rows[i] for i in range(len(requests))]


def _run_item(item: tuple) -> list[dict]:
    return run_group(*item)


def write_summary(rows: Sequence[dict], uri: str, requests: Sequence[EditRequest],
                  storage_options: Mapping | None = None) -> str:
    """The summary table: one row per request with its status, output, seconds and error,
    plus the request itself (concepts, α, scale) so the table stands on its own."""
    by_id = {r.request_id: asdict(r) for r in requests}
    table = pa.Table.from_pylist([
        {**row, "run": by_id[row["request_id"]]["run"],
         "concepts": list(by_id[row["request_id"]]["concepts"]),
         "alpha": by_id[row["request_id"]]["alpha"], "scale": by_id[row["request_id"]]["scale"]}
        for row in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    Storage(uri, storage_options).write_bytes("", sink.getvalue().to_pybytes())
    return uri
