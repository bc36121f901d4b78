"""The ``engram-ray`` command: extract, apply, show, demo, eval.

Conventions: the result a script needs (a run URI, an output path) is the last line of stdout;
progress and logs go to stderr; bad input exits with status 2 and one line naming the culprit
(file, column, key, concept or module); a failure of the cluster or the storage (an actor or
node died, S3 unreachable) exits with status 1 and one line; nothing is committed or
half-written on failure. Ray's wrapped errors are unwrapped to their cause first
(:func:`engram_ray.distributed.errors.unwrap`), so ``--local`` and the Ray pipeline report the
same bad input the same way. ``ENGRAM_RAY_TRACEBACK=1`` re-raises instead (for debugging).

This module owns every subcommand's arguments: comma-separated lists are parsed here, once
(:func:`_csv`), and the work is handed to plain functions with typed arguments. Concept names
may hold commas or spaces: ``--forget @FILE`` or ``--forget-file FILE`` reads them one a line,
exactly (:func:`_concepts`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from engram_ray.runinfo import VERSION

__all__ = ["build_parser", "main"]

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, TypeError,
               PermissionError)
# Failures of the environment, not of the input: one line, exit 1 (a traceback is for bugs):
# these classes, and whatever a storage client raises (botocore, s3fs, aiohttp, pyarrow).
RUN_ERRORS = (OSError, RuntimeError, TimeoutError)
CLIENT_PACKAGES = frozenset({"botocore", "aiobotocore", "s3fs", "aiohttp", "fsspec", "pyarrow"})
REGEX_CHARS = "*.[]()|?+\\"

T = TypeVar("T")


def _csv(text: str | None, cast: Callable[[str], T] = str) -> list[T]:
    """The items of a comma-separated flag value, stripped, blanks dropped, each ``cast``."""
    return [cast(s.strip()) for s in (text or "").split(",") if s.strip()]


def _modules(text: str | None) -> list[str] | str | None:
    """``--modules``: a comma-separated list or a bare name (a suffix, like PEFT's list form)
    become a list; anything with regex characters stays a regex string."""
    if text and ("," in text or not any(ch in text for ch in REGEX_CHARS)):
        return _csv(text)
    return text


def _concepts(text: str | None, path: str | None, storage_options: dict | None = None
              ) -> list[str]:
    """The concepts of ``--forget`` (comma-separated, or ``@FILE``) or ``--forget-file``.

    A file holds one concept a line, kept exactly (commas, inner and outer spaces: a concept
    named ``"Smith, John "`` is that string); only the line break is dropped, and blank lines
    are ignored. A comma-separated value cannot express such names: its items are stripped.
    """
    if text is not None and text.startswith("@"):
        path = text[1:]
    elif text is not None:
        return _csv(text)
    from engram_ray.io.storage import Storage

    data = Storage(path, storage_options).read_bytes()
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"concepts file {path}, line {line}: not UTF-8 text (byte "
                         f"{data[e.start]:#04x}); save it as UTF-8") from None
    return [ln for ln in raw.splitlines() if ln.strip()]


def _storage(items: list[str] | None) -> dict | None:
    """Repeated ``--storage-option KEY=VALUE`` flags as fsspec storage options; a VALUE that
    is a JSON object is parsed (``config_kwargs={"retries": {"max_attempts": 3}}``)."""
    out: dict = {}
    for it in items or []:
        k, _, v = it.partition("=")
        if v.lstrip().startswith("{"):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ValueError(f"--storage-option {k}: not valid JSON ({e})") from None
        out[k] = v
    return out or None


def cmd_extract(args) -> str:
    """Extract with the Ray pipeline (or ``--local``, single process); returns the run URI."""
    from engram_ray.config import load_config

    overrides = list(args.set or []) + ([f"store.extend={args.extend}"] if args.extend else [])
    cfg = load_config(args.config, overrides)
    if args.local:
        from engram_ray.local import extract_from_config

        return extract_from_config(cfg).uri
    from engram_ray.distributed.runner import run_extract

    return run_extract(cfg)


def cmd_apply(args) -> str:
    """Write the edited model; returns ``--out``, absolute (as ``store.uri`` is)."""
    from engram_ray.apply import apply_run
    from engram_ray.config import absolute_uri

    storage = _storage(args.storage_option)
    return apply_run(
        args.run, _concepts(args.forget, args.forget_file, storage), alpha=args.alpha,
        scale=args.scale, modules=_modules(args.modules), out=absolute_uri(args.out, "--out"),
        model=args.model,
        storage_options=storage, trust_factory=args.trust_factory, format=args.format,
        adapter_rtol=args.adapter_rtol, adapter_exact_dense=args.adapter_exact_dense,
        adapter_max_rank=args.adapter_max_rank, solver=args.solver or None,
        allow_other_weights=args.allow_other_weights, device=args.device,
    )


def cmd_show(args) -> str:
    """Describe a committed run on stderr (``--json``: as JSON on stdout); returns its URI."""
    from engram_ray.io.catalog import describe_run
    from engram_ray.io.store import open_run

    run = open_run(args.run, _storage(args.storage_option))
    if args.json:
        return json.dumps(describe_run(run), sort_keys=True)
    print(f"run       {run.uri}", file=sys.stderr)
    print(f"concepts  {len(run.concepts)}: {', '.join(run.concepts[:20])}", file=sys.stderr)
    print(f"modules   {len(run.modules)}", file=sys.stderr)
    forms = run.manifest.column("form").to_pylist()
    ranks = sorted(r for r in run.manifest.column("rank").to_pylist() if r is not None)
    line = f"engrams   {forms.count('dense')} dense, {len(ranks)} low-rank factored"
    if ranks:
        line += f" (rank median {ranks[len(ranks) // 2]}, max {ranks[-1]})"
    print(line, file=sys.stderr)
    if "extends" in run.info:
        print(f"extends   {run.info['extends']}", file=sys.stderr)
    timings = run.info.get("timings", {})
    print(f"timings   {json.dumps(timings)}", file=sys.stderr)
    return run.uri


def cmd_list(args) -> str:
    """The committed runs of a store, oldest first (``--json``: one JSON list); returns the
    store URI (or the JSON). A run that fails its checks is listed last, marked ``BAD`` with
    its reason (``error`` in the JSON); the good runs are listed all the same."""
    from engram_ray.io.catalog import list_runs

    runs = list_runs(args.store, _storage(args.storage_option))
    if args.json:
        return json.dumps(runs, sort_keys=True)
    for r in runs:
        if r["error"]:
            print(f"{r['run_id']}  BAD: {r['error']}  {r['uri']}", file=sys.stderr)
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["committed_at"] or 0))
        print(f"{r['run_id']}  {when}  {len(r['concepts'])} concepts  {r['modules']} modules  "
              f"model {str(r['model_fingerprint'])[:12]}  {r['uri']}", file=sys.stderr)
    return args.store


def cmd_batch(args) -> str:
    """Run every request of a requests file (one Ray task per run, or here with ``--local``);
    writes the summary table and returns its URI. Failed requests make the exit status 1."""
    from engram_ray.io.storage import as_storage
    from engram_ray.requests import read_requests, run_batch, write_summary

    storage = _storage(args.storage_option)
    requests = read_requests(args.requests, storage)
    summary = (as_storage(args.summary, storage) if args.summary
               else default_summary(args.requests, storage))  # checked now, written last
    rows = run_batch(requests, storage_options=storage, trust_factory=args.trust_factory,
                     map_fn=None if args.local else _ray_map(args.num_cpus))
    summary = write_summary(rows, summary, requests)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in rows:
        print(f"{r['request_id']}: {r['status']} {r['error'] or r['out']}", file=sys.stderr)
    if failed:
        raise BatchFailed(f"{len(failed)} of {len(rows)} request(s) failed (see {summary})")
    return summary


def cmd_tick(args) -> str:
    """One scheduled tick of a queue (see ``engram_ray.schedule``); returns the current run."""
    from engram_ray.schedule import tick

    def extract(cfg) -> str:
        if args.local:
            from engram_ray.local import extract_from_config

            return extract_from_config(cfg).uri
        from engram_ray.distributed.runner import run_extract

        return run_extract(cfg)

    result = tick(args.queue, extract=extract, storage_options=_storage(args.storage_option),
                  map_fn=None if args.local else _ray_map(1.0),
                  lease_timeout_s=args.lease_timeout_s, break_lease=args.break_lease)
    print(f"[engram-ray] {result.message}", file=sys.stderr)
    return result.run or ""


def cmd_queue_init(args) -> str:
    """Create a queue (``engram_ray.schedule.init_queue``); returns the queue's URI."""
    from engram_ray.schedule import init_queue

    spec = init_queue(args.queue, args.config, args.run, trust_factory=args.trust_factory,
                      force=args.force, storage_options=_storage(args.storage_option))
    if args.trust_factory and spec.trust_factory is None:
        print("[engram-ray] --trust-factory: the config names no factory to trust; nothing "
              "recorded", file=sys.stderr)
    elif spec.trust_factory:
        print(f"[engram-ray] ticks of this queue may import and run {spec.trust_factory}",
              file=sys.stderr)
    print(f"[engram-ray] queue {args.queue}: run {spec.run}, config {spec.config}; drop "
          "request files into requests/ and shards into shards/", file=sys.stderr)
    return args.queue


def cmd_gc(args) -> str:
    """Delete (``--delete``; default: only list) the committed runs of a store that newer
    committed runs extend, beyond the newest ``--keep`` of each lineage (``retention.py``);
    returns the decision as one JSON line."""
    from engram_ray.retention import gc

    result = gc(args.store, args.keep, delete=args.delete, queues=args.queue or (),
                storage_options=_storage(args.storage_option))
    verb = "would delete" if result.dry_run else "deleted"
    for uri in result.delete:
        print(f"{verb} {uri}", file=sys.stderr)
    for uri, why in result.skipped.items():
        print(f"skipped {uri}: {why}", file=sys.stderr)
    if result.dry_run and result.delete:
        print("[engram-ray] dry run: nothing deleted (--delete deletes)", file=sys.stderr)
    return result.to_json()


def default_summary(requests: str, storage_options: dict | None = None):
    """``batch``'s summary when ``--summary`` is not given: ``STEM.summary.parquet`` beside
    the requests file (``reqs.jsonl`` → ``reqs.summary.parquet``; ``./reqs`` →
    ``./reqs.summary.parquet``, never a name in the parent directory). Decided before any
    request runs: an existing file there is replaced only if it is a batch summary (a re-run's
    table); anything else is refused, naming it. Returns its ``Storage`` (the writer's)."""
    from engram_ray.io.storage import Storage

    folder, _, name = requests.rstrip("/").rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    uri = f"{folder}/{stem}.summary.parquet" if folder else f"{stem}.summary.parquet"
    dest = Storage(uri, storage_options)
    if dest.exists() and not _is_summary(dest):
        raise FileExistsError(f"the default summary {uri} exists and is not a batch summary; "
                              "pass --summary to name another file")
    return dest


def _is_summary(dest) -> bool:
    """Whether ``dest`` is a Parquet table with the summary's key columns."""
    import pyarrow.parquet as pq

    try:
        with dest.open() as f:
            names = set(pq.read_schema(f).names)
    except (OSError, ValueError):  # a directory, not Parquet, unreadable
        return False
    return {"request_id", "status", "out", "error"} <= names


class BatchFailed(RuntimeError):
    """Some requests of a batch failed (each is recorded in the summary)."""


def _ray_map(num_cpus: float):
    """One Ray task per item (``distributed/sweep.py``), Ray joined or started on first use."""
    def map_fn(fn, items):
        from engram_ray.distributed.cluster import ensure_ray
        from engram_ray.distributed.sweep import parallel_map

        ensure_ray(None)
        return parallel_map(fn, list(items), num_cpus=num_cpus)

    return map_fn


def cmd_demo(args) -> str:
    """Run the ``--pipeline`` found in the :mod:`pipelines` registry; returns its report path."""
    from pipelines import get_pipeline

    return get_pipeline(args.pipeline)(args.out, stages=args.stages, quick=args.quick)


def cmd_eval(args) -> str:
    """Score every ``--alphas`` value as a Ray task; returns the path of ``eval.json``."""
    from engram_ray.apply import run_model_spec
    from engram_ray.distributed.search import alpha_search
    from engram_ray.eval.search_report import run_alpha_eval
    from engram_ray.io.store import open_run

    spec = run_model_spec(open_run(args.run), args.model)
    if spec.path is None:
        raise ValueError("eval needs an HF causal LM (model.path), not a factory model")
    return run_alpha_eval(
        alpha_search, run_uri=args.run, model_path=spec.path, gold_dir=args.gold,
        split_paths=(args.forget_set, args.retain_set, args.holdout_set),
        forget=_concepts(args.forget, args.forget_file), alphas=_csv(args.alphas, float), scale=args.scale,
        out=args.out,
    )


def _retain_logs(items: list[str] | None, splits: list[str]) -> dict[str, str]:
    """``--retain-logs SPLIT=PATH`` (one per split), or a bare PATH with a single ``--split``."""
    out: dict[str, str] = {}
    for item in items or []:
        split, eq, path = item.partition("=")
        if not eq or "/" in split or not split.startswith("forget"):
            if len(splits) != 1:
                raise ValueError(f"--retain-logs {item}: with several --split give SPLIT=PATH")
            split, path = splits[0], item
        if split in out:
            raise ValueError(f"--retain-logs: {split} given twice")
        out[split] = path
    return out


def _template_args(value: str | None, storage: dict | None) -> dict | None:
    """``--template-args``: JSON text, or a YAML/JSON file (local or a URI) holding OpenUnlearning's
    ``template_args`` or a model config with a ``template_args`` key."""
    if not value:
        return None
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise ValueError(f"--template-args: not valid JSON ({e})") from None
    else:
        import yaml

        from engram_ray.io.storage import Storage

        try:
            parsed = yaml.safe_load(Storage(value, storage).read_bytes().decode())
        except yaml.YAMLError as e:
            raise ValueError(f"--template-args {value}: not valid YAML ({e})") from None
    if isinstance(parsed, dict) and isinstance(parsed.get("template_args"), dict):
        parsed = parsed["template_args"]  # an OpenUnlearning model config
    if not isinstance(parsed, dict):
        raise ValueError(f"--template-args {value}: expected a mapping")
    return parsed


def cmd_tofu(args) -> str:
    """TOFU end to end in OpenUnlearning's format (``pipelines/tofu.py``); returns the report."""
    from pipelines.tofu import run_tofu

    splits = args.split or ["forget10"]
    template_args = _template_args(args.template_args, _storage(args.storage_option))
    return run_tofu(
        args.data, args.model, args.out, splits=splits, alphas=args.alpha or [1.0],
        retain_logs=_retain_logs(args.retain_logs, splits), template_args=template_args,
        local=args.local, overrides=args.set or [], storage_options=_storage(args.storage_option),
        eval_only=args.eval_only, keep_models=args.keep_models, scale=args.scale,
        max_length=args.max_length, batch_size=args.batch_size, gen_margin=args.gen_margin,
        device=args.device, dtype=args.dtype, tokens=args.tokens,
        validation_rows=args.validation_rows, utility_tolerance=args.utility_tolerance,
    )


def _add_extract(sub) -> None:
    e = sub.add_parser("extract", help="compute engrams for every concept of a dataset")
    e.add_argument("config", help="YAML config (local path or s3:// URI)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set parallel.stages=2")
    e.add_argument("--local", action="store_true",
                   help="run the single-process engine instead of the Ray pipeline")
    e.add_argument("--extend", metavar="RUN",
                   help="add the shards RUN has not counted to its kept Σ and re-solve "
                        "(= --set store.extend=RUN; RUN needs store.keep_statistics)")
    e.set_defaults(fn=cmd_extract)


def _add_apply(sub) -> None:
    a = sub.add_parser("apply", help="write a model with concepts forgotten")
    a.add_argument("--run", required=True, help="committed run URI")
    _add_forget(a)
    a.add_argument("--alpha", type=float, default=1.0, help="edit strength (negative amplifies)")
    a.add_argument("--scale", default="uniform",
                   help="uniform | weight_norm | effective_rank | products like a*b")
    a.add_argument("--modules", default=None,
                   help="only these modules: comma-separated suffixes, or a regex")
    a.add_argument("--model", default=None,
                   help="model dir/URI, or a factory pkg.module:callable replacing the run's "
                        "(default: the run's model)")
    a.add_argument("--format", choices=("full", "peft"), default="full",
                   help="full: an edited checkpoint; peft: a LoRA adapter for the base model")
    a.add_argument("--adapter-rtol", type=float, default=None,
                   help="peft: relative error allowed when truncating dense edits (1e-3)")
    a.add_argument("--adapter-exact-dense", action="store_true",
                   help="peft: write dense edits exactly (full rank) instead of truncating")
    a.add_argument("--device", default="cpu",
                   help="where the edit is formed: cpu, cuda, cuda:N, or auto (a GPU when "
                        "torch sees one); float64 either way")
    a.add_argument("--adapter-max-rank", type=int, default=None,
                   help="peft: truncate updates of larger rank to this one by SVD (vLLM serves "
                        "LoRA ranks up to 512); the error is in adapter_meta.json")
    a.add_argument("--solver", action="append", metavar="KEY=VALUE", default=[],
                   help="re-solve the run's stored spectrum with this solver option (rtol, "
                        "condition_cap, rank_fraction, ridge; repeatable; default the run's)")
    a.add_argument("--allow-other-weights", action="store_true",
                   help="with --model: edit it although its weights differ from those the run "
                        "was extracted from (e.g. a float16 copy); recorded in edit.json")
    a.add_argument("--trust-factory", action="store_true",
                   help="import and run the model factory the run names (it runs code: only "
                        "for runs whose config you trust)")
    a.add_argument("--out", required=True,
                   help="output directory or s3:// prefix; must be absent or empty")
    a.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    a.set_defaults(fn=cmd_apply)


def _add_forget(p) -> None:
    """``--forget LIST|@FILE`` or ``--forget-file FILE``: exactly one is required."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--forget", help="comma-separated concepts, or @FILE: one concept a line")
    g.add_argument("--forget-file", metavar="FILE",
                   help="concepts to forget, one a line, kept exactly (commas, spaces)")


def _add_show(sub) -> None:
    s = sub.add_parser("show", help="describe a committed run")
    s.add_argument("run")
    s.add_argument("--json", action="store_true", help="print the description as JSON")
    s.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_show)


def _add_list(sub) -> None:
    s = sub.add_parser("list", help="the committed runs of a store")
    s.add_argument("store", help="a store URI (the store.uri of extractions)")
    s.add_argument("--json", action="store_true", help="print the runs as JSON on stdout")
    s.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_list)


def _add_batch(sub) -> None:
    b = sub.add_parser("batch", help="run a file of edit requests (one edited model each)")
    b.add_argument("requests", help="Parquet or JSON lines: request_id, run, concepts, out, "
                                    "[alpha, scale, modules, format (full|peft), "
                                    "adapter_rtol, adapter_exact_dense, eval (an eval set: "
                                    "forget/retain loss of the base and edited model)]")
    b.add_argument("--summary", default=None,
                   help="summary table (default: REQUESTS with .summary.parquet)")
    b.add_argument("--local", action="store_true",
                   help="run the requests here instead of one Ray task per run")
    b.add_argument("--num-cpus", type=float, default=1.0,
                   help="CPUs per Ray task (one task writes every request of one run)")
    b.add_argument("--trust-factory", action="store_true",
                   help="allow factory models named in the runs (they run code)")
    b.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    b.set_defaults(fn=cmd_batch)


def _add_tick(sub) -> None:
    t = sub.add_parser("tick", help="one scheduled tick of an edit queue (extend Σ, run "
                                    "pending requests); safe to run on a timer")
    t.add_argument("queue", help="the queue prefix (local or s3://)")
    t.add_argument("--local", action="store_true", help="extract and apply in this process")
    t.add_argument("--lease-timeout-s", type=float, default=60.0,
                   help="the tick's lease lives this long unless renewed (its heartbeat "
                        "renews it every quarter of that); a tick killed on this host frees "
                        "it at once, one lost with its node after this long")
    t.add_argument("--break-lease", action="store_true",
                   help="remove another tick's lease first (only when that tick is known to "
                        "be gone)")
    t.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    t.set_defaults(fn=cmd_tick)


def _add_queue(sub) -> None:
    q = sub.add_parser("queue", help="manage scheduled edit queues (see tick)")
    actions = q.add_subparsers(dest="action", required=True)
    i = actions.add_parser("init", help="create a queue: queue.yaml, requests/, shards/")
    i.add_argument("queue", help="the queue prefix (local or s3://)")
    i.add_argument("--config", required=True,
                   help="the extraction config each tick extends with (local or s3://)")
    i.add_argument("--run", required=True, help="the committed run the first tick extends")
    i.add_argument("--trust-factory", action="store_true",
                   help="let ticks import and run the model factory the config names (it "
                        "runs code: only for a config you trust); recorded in queue.yaml")
    i.add_argument("--force", action="store_true",
                   help="replace an existing queue.yaml (state, requests, results kept)")
    i.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    i.set_defaults(fn=cmd_queue_init)


def _add_gc(sub) -> None:
    g = sub.add_parser("gc", help="delete superseded runs of a store (dry run unless "
                                  "--delete)")
    g.add_argument("store", help="a store URI (the store.uri of extractions)")
    g.add_argument("--keep", type=int, required=True, metavar="N",
                   help="keep the newest N runs of each lineage (N ≥ 1); older runs that a "
                        "newer committed run extends are deleted")
    g.add_argument("--delete", action="store_true",
                   help="delete (default: a dry run that only lists what would go)")
    g.add_argument("--queue", action="append", metavar="QUEUE",
                   help="never delete the run this queue's next tick extends (repeatable)")
    g.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    g.set_defaults(fn=cmd_gc)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="class-wise unlearning on scikit-learn's digits, end to end")
    d.add_argument("--pipeline", default="digits", metavar="NAME",
                   help="a pipeline of the pipelines registry (default: digits)")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--stages", type=int, default=2)
    d.add_argument("--quick", action="store_true", help="fewer α values and classes (tests)")
    d.set_defaults(fn=cmd_demo)


def _add_eval(sub) -> None:
    v = sub.add_parser("eval", help="TOFU-protocol evaluation of an edit (and an α search)")
    v.add_argument("--run", required=True)
    v.add_argument("--model", default=None)
    v.add_argument("--gold", required=True, help="retain-only model directory")
    v.add_argument("--forget-set", required=True)
    v.add_argument("--retain-set", required=True)
    v.add_argument("--holdout-set", required=True)
    _add_forget(v)
    v.add_argument("--alphas", default="1.0", help="comma-separated α values to try in parallel")
    v.add_argument("--scale", default="uniform")
    v.add_argument("--out", required=True)
    v.set_defaults(fn=cmd_eval)


def _add_tofu(sub) -> None:
    t = sub.add_parser("tofu", help="TOFU end to end: extract, edit, evaluate in "
                                    "OpenUnlearning's TOFU_EVAL.json / TOFU_SUMMARY.json")
    t.add_argument("--data", required=True, help="directory (or s3:// prefix) of TOFU's files")
    t.add_argument("--model", required=True, help="HF checkpoint directory or s3:// URI")
    t.add_argument("--split", action="append", metavar="forgetXX",
                   help="forget split, repeatable (default forget10)")
    t.add_argument("--alpha", action="append", type=float,
                   help="edit strength, repeatable: an α sweep (default 1.0)")
    t.add_argument("--retain-logs", action="append", metavar="[SPLIT=]PATH",
                   help="the retain model's TOFU_EVAL.json for a split (forget quality)")
    t.add_argument("--out", required=True, help="output directory (new or empty)")
    t.add_argument("--template-args", default=None,
                   help="OpenUnlearning template_args: JSON, or a YAML/JSON file (a model "
                        "config with a template_args key is accepted)")
    t.add_argument("--eval-only", action="store_true",
                   help="evaluate --model as it is (e.g. to write a retain model's log)")
    t.add_argument("--local", action="store_true",
                   help="extract in this process instead of on Ray")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override an extraction config key, e.g. --set parallel.stages=2")
    t.add_argument("--scale", default="uniform")
    t.add_argument("--tokens", choices=("answer", "all"), default="answer",
                   help="tokens Σ counts: the answers' (default) or every token of a QA row")
    t.add_argument("--validation-rows", type=int, default=0, metavar="N",
                   help="with several --alpha: pick each split's α on its first N forget and "
                        "retain_perturbed rows, evaluate only that one in full")
    t.add_argument("--utility-tolerance", type=float, default=0.05,
                   help="a selected α keeps ≥ (1 - this) × the unedited validation utility")
    t.add_argument("--keep-models", action="store_true", help="keep the edited checkpoints")
    t.add_argument("--max-length", type=int, default=512)
    t.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    t.add_argument("--gen-margin", type=int, default=32,
                   help="greedy answers get |answer| + this many new tokens (ROUGE)")
    t.add_argument("--device", default=None, help="evaluation device (default cuda if any)")
    t.add_argument("--dtype", default="float32", help="evaluation dtype")
    t.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    t.set_defaults(fn=cmd_tofu)


def build_parser() -> argparse.ArgumentParser:
    """The ``engram-ray`` parser: one subparser per subcommand, each bound to its ``cmd_*``."""
    p = argparse.ArgumentParser(prog="engram-ray", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"engram-ray {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_extract, _add_apply, _add_show, _add_list, _add_batch, _add_tick, _add_queue,
                _add_gc, _add_demo, _add_eval, _add_tofu):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand: prints its result as stdout's last line; bad input exits 2, a
    failed cluster or store exits 1, each with one line on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        _locations(args)
        result = args.fn(args)
    except Exception as e:  # noqa: BLE001 - reported in one line, or re-raised below
        rc = _report(args.command, e)
        if rc is None or os.environ.get("ENGRAM_RAY_TRACEBACK"):
            raise
        return rc
    print(result)
    return 0


_LOCATION_ARGS = ("run", "store", "queue", "out", "config", "requests", "summary", "model",
                  "extend", "gold", "forget_file")


def _locations(args) -> None:
    """Every location argument that is a URL checked before any work (a ``gs://`` without
    gcsfs is refused naming the package, never written to a local ``gs:`` folder) and a
    ``file://`` URL made its local path (``engram_ray.uris``)."""
    from engram_ray.uris import check_scheme, normalize

    for name in _LOCATION_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and "://" in value:
            check_scheme(value)
            setattr(args, name, normalize(value))


def _report(command: str, exc: Exception) -> int | None:
    """Print ``exc`` (unwrapped from Ray's wrappers) as one line; the exit status, or
    ``None`` for an unexpected error (a bug: its traceback is worth more than a line)."""
    from engram_ray.redaction import redact_text  # no URL password or token in any message

    inner = _unwrap(exc)
    if isinstance(inner, USER_ERRORS):
        msg = inner.args[0] if isinstance(inner, KeyError) and inner.args else inner
        print(f"engram-ray {command}: error: {redact_text(str(msg))}", file=sys.stderr)
        return 2
    from_client = type(inner).__module__.split(".")[0] in CLIENT_PACKAGES
    if inner is exc and not isinstance(inner, RUN_ERRORS) and not from_client:
        return None
    lines = redact_text(str(inner)).strip().splitlines() or [""]
    print(f"engram-ray {command}: error: {type(inner).__name__}: {lines[0]}", file=sys.stderr)
    return 1


def _unwrap(exc: BaseException) -> BaseException:
    """Ray's wrappers removed; Ray is imported only by ``distributed/`` and only if it is
    already loaded (a ``--local`` run never pays for importing it here)."""
    if "ray" not in sys.modules:
        return exc
    from engram_ray.distributed.errors import unwrap

    return unwrap(exc)


def run(argv: list[str] | None = None,
        entry: Callable[[list[str] | None], int] | None = None) -> NoReturn:
    """The process entry point (``engram-ray``, ``python -m engram_ray.cli``, the ``jobs/``
    scripts that Ray jobs run): :func:`main`, then an exit that skips the interpreter's
    teardown.

    Why: about 1 in 15 ``engram-ray apply`` processes (4 of 48 in a loop, 1 of 40 in another)
    aborted after the command had finished, its output written and its result printed, with
    ``terminate called without an active exception`` and exit status 134: a native thread of
    an extension (torch's or pyarrow's pools) still joinable when C++ static destructors ran.
    A script, a Ray job or a Kubernetes Job reads 134 as a failed edit. So the process ends
    as a normal exit would up to that point (non-daemon threads joined, ``atexit`` handlers
    such as Ray's shutdown and logging's flush run, stdout and stderr flushed) and then with
    ``os._exit``, which runs no C++ destructors. Unexpected errors still print their
    traceback (exit 1); ``--help`` and usage errors keep argparse's status.
    """
    import atexit
    import threading
    import traceback

    try:
        code = (entry or main)(argv)  # entry: a jobs/ script's main (it calls this one's)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a bug: its traceback, as the interpreter prints it
        traceback.print_exc()
        code = 1
    # What the interpreter's exit does first: threading's own exit hooks (they wake idle
    # ThreadPoolExecutor workers, which would otherwise wait forever), then the join of every
    # non-daemon thread; CPython's private hook, with a plain join where it is missing.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
