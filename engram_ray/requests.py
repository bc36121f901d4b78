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

Each request is one ``apply`` (an edited checkpoint written tensor by tensor, ``edit.json``
last: the output's completion marker and provenance). Requests are independent: one that fails
is recorded and the others go on. A re-run skips the requests whose output is complete, so a
batch killed half way resumes. The summary table (Parquet) has one row per request: status
(``done`` | ``skipped`` | ``failed``), output, seconds and the error's one-line message.
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

__all__ = ["EditRequest", "read_requests", "run_batch", "run_request", "write_summary"]

REQUIRED = ("request_id", "run", "concepts", "out")
OPTIONAL = {"alpha": 1.0, "scale": "uniform", "modules": None}
COMPLETE = "edit.json"  # written last by apply: an output with it is complete


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
                       str(values["out"]), alpha, str(values["scale"]), modules)


def run_request(request: EditRequest, storage_options: Mapping | None = None,
                trust_factory: bool = False) -> dict:
    """Run one request (or skip it when its output is complete): one summary row; an error is
    recorded, never raised, so one bad request never stops the others."""
    from engram_ray.apply import apply_run

    t0 = time.time()
    row = {"request_id": request.request_id, "out": request.out, "error": None}
    try:
        if Storage(request.out, storage_options).exists(COMPLETE):
            return {**row, "status": "skipped", "seconds": 0.0}
        apply_run(request.run, list(request.concepts), alpha=request.alpha,
                  scale=request.scale, modules=_modules(request.modules), out=request.out,
                  storage_options=storage_options, **_trust(trust_factory))
        return {**row, "status": "done", "seconds": time.time() - t0}
    except Exception as e:  # noqa: BLE001 - recorded in the summary, the batch goes on
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {**row, "status": "failed", "seconds": time.time() - t0,
                "error": f"{type(e).__name__}: {msg}"}


def _modules(modules):
    return list(modules) if isinstance(modules, tuple) else modules


def _trust(trust_factory: bool) -> dict:
    """Pass ``trust_factory`` only to an apply that knows it (factory models run code)."""
    import inspect

    from engram_ray.apply import apply_run

    params = inspect.signature(apply_run).parameters
    return {"trust_factory": trust_factory} if "trust_factory" in params else {}


def run_batch(requests: Sequence[EditRequest], *, storage_options: Mapping | None = None,
              trust_factory: bool = False,
              map_fn: Callable[[Callable, Iterable], list] | None = None) -> list[dict]:
    """Every request's summary row, in request order. ``map_fn(fn, items)`` runs them
    (default: one after another here; the CLI passes Ray's one-task-per-request map)."""
    items = [(r, storage_options, trust_factory) for r in requests]
    if map_fn is None:
        return [_run_item(x) for x in items]
    return map_fn(_run_item, items)


def _run_item(item: tuple) -> dict:
    return run_request(*item)


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
