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
    adapter_max_rank     int | null     peft: truncate larger updates to this rank (vLLM: 512)
    solver      object | null      overrides of the run's solver options ({"rtol": 1e-5})
    eval        str | null         an eval set (local or s3://, Parquet or JSON lines) with the
                                   run's own data columns: the edit's eval summary (below)

Each request is one ``apply``: an edited checkpoint written tensor by tensor with ``edit.json``
last, or a PEFT adapter with ``adapter_meta.json`` last (the output's completion marker and
provenance); its output equals the single ``engram-ray apply`` of the same request.

Requests that edit the same run are done together (``apply.apply``, the one edit driver), because that is what
lets them share their reads: each module's engrams are read once for the union of their forget
sets and every output is made from them, module by module — the full checkpoints in one pass
over the base checkpoint (each tensor read once, N outputs written in lockstep), the adapters
in one pass over the modules, the per-layer scales (``weight_norm``, …) of all of them in one
more. A batch of N edits of a run therefore reads the run a fixed number of times (at most 3
passes), not N times. On Ray (the default) each run's requests are one Ray task (``--local``:
this process): the issue asked for one task per request, but tasks do not share memory, so a
task per request would re-read the engrams per request; runs are spread over the cluster, the
requests of one run are not (its outputs are written by one task, one after another in
lockstep). Requests are independent: one that fails is recorded and the others go on. Every
row is validated before the first request runs (a bad value fails the batch at once, naming
the row, the request_id and the column). A re-run skips the requests whose output is complete,
so a batch killed half way resumes. The summary table (Parquet) has one row per request:
status (``done`` | ``skipped`` | ``failed``), output, seconds (a shared pass split evenly) and
the error's one-line message.

A request with ``eval`` is scored before its output is written (``eval/edit_scores.py``): the
mean per-token NLL and next-token accuracy of the base and of the edited model on the set's
counted tokens (the answer tokens of a prompt/answer run), on its ``forget`` rows (concept in
the request's forget set) and its ``retain`` rows (the others). The summary goes into the
output's marker under ``"eval"`` (so an output that looks complete has its eval) and into the
summary table as :data:`EVAL_COLUMNS` (null without ``eval``; a skipped request's read back from
its marker). For a ``peft`` request the scored model is the dense edit (``"model": "dense
edit"``). An eval set that cannot be read or lacks a column, or a run whose model has no tokens
to score (a factory model, a ``features_column`` run), fails that request only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engram_ray.config import EditSpec
from engram_ray.io.storage import Location, Storage, as_storage, location_uri

__all__ = ["EVAL_COLUMNS", "EditRequest", "read_requests", "run_batch", "run_group",
           "write_summary"]

REQUIRED = ("request_id", "run", "concepts", "out")
# Every column but ``request_id`` and ``run`` is a field of :class:`EditSpec` (``concepts`` is
# its ``forget``), whose defaults are the only ones.
OPTIONAL = ("alpha", "scale", "modules", "format", "adapter_rtol", "adapter_exact_dense",
            "adapter_max_rank", "solver", "eval")
# Written last by apply: an output holding its format's marker is complete.
COMPLETE = {"full": "edit.json", "peft": "adapter_meta.json"}
# The summary table's eval columns (null for a request without eval) and their types.
_EVAL_STATS = {"rows": pa.int64(), "tokens": pa.int64(), "loss_base": pa.float64(),
               "loss_edited": pa.float64(), "acc_base": pa.float64(), "acc_edited": pa.float64()}
EVAL_COLUMNS = {"eval_model": pa.string(),
                **{f"{split}_{k}": t for split in ("forget", "retain")
                   for k, t in _EVAL_STATS.items()}}


@dataclass(frozen=True)
class EditRequest:
    """One validated request row: which run, and the edit (:class:`EditSpec`)."""

    request_id: str
    run: str
    spec: EditSpec

    @property
    def concepts(self) -> tuple[str, ...]:
        return self.spec.forget

    @property
    def out(self) -> str:
        return self.spec.out

    @property
    def format(self) -> str:
        return self.spec.format

    @property
    def eval(self) -> str | None:
        return self.spec.eval


def read_requests(uri: Location, storage_options: Mapping | None = None,
                  default_run: str | None = None) -> list[EditRequest]:
    """Read and validate a requests file; errors name the file, the row and the column.
    ``default_run`` fills rows that name no run (a scheduled queue's current run)."""
    data = as_storage(uri, storage_options).read_bytes()
    uri = location_uri(uri)
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
    outs: dict[str, str] = {}
    for r in out:
        if r.request_id in seen:
            raise ValueError(f"requests file {uri}: request_id {r.request_id!r} appears twice")
        seen.add(r.request_id)
        key = r.out.rstrip("/")
        if key in outs:
            raise ValueError(f"requests file {uri}: requests {outs[key]!r} and "
                             f"{r.request_id!r} share the output {r.out}: one writer per output")
        outs[key] = r.request_id
    return out


def _request(uri: str, i: int, row: Any) -> EditRequest:
    """One row, validated: every error names the file, the row, the request_id (once known)
    and the column, so a typo in a batch of thousands is found without a debugger."""
    where = f"requests file {uri}, row {i}"
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with columns {list(REQUIRED)}")
    missing = [c for c in REQUIRED if row.get(c) in (None, "", [])]
    if missing:
        raise ValueError(f"{where}: column {missing[0]!r} is missing or empty")
    where = f"{where} (request_id {str(row['request_id'])!r})"
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown column {unknown[0]!r} (known: "
                         f"{list(REQUIRED) + list(OPTIONAL)})")
    values = {k: v for k, v in row.items() if v is not None}
    for col in ("request_id", "run", "out"):
        if not isinstance(values[col], (str, int)) or isinstance(values[col], bool):
            raise ValueError(f"{where}: column {col!r} must be a string, got {values[col]!r}")
    fields = {k: v for k, v in values.items() if k in OPTIONAL}
    try:
        spec = EditSpec(forget=values["concepts"], out=str(values["out"]), **fields)
    except ValueError as e:  # EditSpec names the field: here it is a column
        text = str(e).replace("'forget'", "'concepts'")
        raise ValueError(f"{where}: {'column ' if text.startswith(chr(39)) else ''}{text}") \
            from None
    return EditRequest(str(values["request_id"]), str(values["run"]), spec)


def run_group(requests: Sequence[EditRequest], storage_options: Mapping | None = None,
              trust_factory: bool = False, run: Location | None = None) -> list[dict]:
    """The summary rows of the requests of one run, in request order, all through the one
    edit driver (``apply.apply``, module docstring: the work shared by all of them, full
    checkpoints and adapters alike): a request whose output already holds it — its marker
    names this very request and every file verifies — is skipped, an incomplete earlier
    attempt redone, another request's output refused. Errors are recorded, never raised; the
    seconds of the shared pass are split evenly among the requests it wrote. ``run``: the
    requests' run as a Storage the caller already built (default: built from its URI)."""
    from engram_ray.apply import SKIPPED, apply

    t0 = time.time()
    outs: dict[int, Storage] = {}  # each output's Storage, as the driver built it
    try:
        outcomes = apply(requests[0].run if run is None else run, [r.spec for r in requests],
                         storage_options=storage_options, trust_factory=trust_factory,
                         skip_complete=True, outputs=outs)
    except Exception as e:  # noqa: BLE001 - the run itself failed: every request of it
        outcomes = [e] * len(requests)
    written = [o for o in outcomes if o != SKIPPED]
    each = (time.time() - t0) / max(1, len(written))
    rows = []
    for i, (r, outcome) in enumerate(zip(requests, outcomes)):
        out = outs.get(i) or r.out
        if outcome == SKIPPED:
            try:
                rows.append(_row(r, "skipped", 0.0,
                                 evaluation=_marker_eval(r, out, storage_options)))
            except Exception as e:  # noqa: BLE001 - complete; only its eval is unreadable
                rows.append(_row(r, "skipped", 0.0, e))
        else:
            rows.append(_written_row(r, out, each, outcome, storage_options))
    return rows


def _written_row(request: EditRequest, out: Location, seconds: float,
                 error: BaseException | None, storage_options: Mapping | None) -> dict:
    """The row of a request ``apply.apply`` ran: failed, or done with its marker's eval (an
    eval that cannot be read back is reported as the done request's error)."""
    if error is not None:
        return _row(request, "failed", seconds, error)
    try:
        return _row(request, "done", seconds,
                    evaluation=_marker_eval(request, out, storage_options))
    except Exception as e:  # noqa: BLE001 - written; only its eval summary is unreadable
        return _row(request, "done", seconds, e)


def _marker_eval(request: EditRequest, out: Location,
                 storage_options: Mapping | None) -> dict | None:
    """The eval summary a complete output's marker holds (None: the request names no eval
    set); the table reports what the output carries, whether written now or before. ``out``:
    the request's output (its Storage when the driver built one)."""
    if request.eval is None:
        return None
    marker = as_storage(out, storage_options).read_json(COMPLETE[request.format])
    return marker.get("eval") if isinstance(marker, Mapping) else None


def _row(request: EditRequest, status: str, seconds: float, error: BaseException | None = None,
         evaluation: Mapping | None = None) -> dict:
    msg = None
    if error is not None:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        msg = f"{type(error).__name__}: {text}"
    return {"request_id": request.request_id, "out": request.out, "status": status,
            "seconds": seconds, "error": msg, **_eval_columns(evaluation)}


def _eval_columns(evaluation: Mapping | None) -> dict:
    """An eval summary as the summary table's :data:`EVAL_COLUMNS` (all null without one)."""
    evaluation = evaluation or {}
    out = dict.fromkeys(EVAL_COLUMNS)
    out["eval_model"] = evaluation.get("model")
    for split in ("forget", "retain"):
        for k in _EVAL_STATS:
            out[f"{split}_{k}"] = (evaluation.get(split) or {}).get(k)
    return out


def run_batch(requests: Sequence[EditRequest], *, storage_options: Mapping | None = None,
              trust_factory: bool = False,
              map_fn: Callable[[Callable, Iterable], list] | None = None,
              runs: Mapping[str, Location] | None = None) -> list[dict]:
    """Every request's summary row, in request order. Requests are grouped by run
    (:func:`run_group`); ``map_fn(fn, items)`` runs the groups (default: one after another
    here; the CLI passes Ray's one-task-per-item map). ``runs``: run URI → its Storage, for
    runs the caller already built (a tick's new run): used instead of building them again."""
    by_run: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_run.setdefault(r.run, []).append(i)
    items = [([requests[i] for i in idx], storage_options, trust_factory,
              (runs or {}).get(run)) for run, idx in by_run.items()]
    results = [_run_item(x) for x in items] if map_fn is None else map_fn(_run_item, items)
    rows: dict[int, dict] = {}
    for idx, group_rows in zip(by_run.values(), results):
        rows.update(zip(idx, group_rows))
    return [rows[i] for i in range(len(requests))]


def _run_item(item: tuple) -> list[dict]:
    return run_group(*item)


def write_summary(rows: Sequence[dict], uri: Location, requests: Sequence[EditRequest],
                  storage_options: Mapping | None = None) -> str:
    """The summary table: one row per request with its status, output, seconds and error,
    plus the request itself (concepts, α, scale, eval set) so the table stands on its own, and
    the eval columns (:data:`EVAL_COLUMNS`, typed even when every value is null)."""
    by_id = {r.request_id: r for r in requests}
    table = pa.Table.from_pylist([
        {**row, "run": by_id[row["request_id"]].run,
         "concepts": list(by_id[row["request_id"]].spec.forget),
         "alpha": by_id[row["request_id"]].spec.alpha,
         "scale": by_id[row["request_id"]].spec.scale,
         "eval": by_id[row["request_id"]].spec.eval}
        for row in rows])
    for name, typ in {**EVAL_COLUMNS, "eval": pa.string()}.items():
        if name in table.column_names and pa.types.is_null(table.schema.field(name).type):
            table = table.set_column(table.column_names.index(name), name,
                                     table.column(name).cast(typ))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    as_storage(uri, storage_options).write_bytes("", sink.getvalue().to_pybytes())
    return location_uri(uri)
