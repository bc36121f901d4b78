"""The ``engram-ray`` command: extract, apply, show, demo, eval.

Conventions: the result a script needs (a run URI, an output path) is the last line of stdout;
progress and logs go to stderr; bad input exits with status 2 and one line naming the culprit
(file, column, key, concept or module); nothing is committed or half-written on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, TypeError)


def _split(csv: str | None) -> list[str] | None:
    return [s.strip() for s in csv.split(",") if s.strip()] if csv else None


def _storage(items: list[str]) -> dict | None:
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        out[k] = v
    return out or None


def cmd_extract(args) -> str:
    from engram_ray.config import load_config

    overrides = list(args.set or []) + ([f"store.extend={args.extend}"] if args.extend else [])
    cfg = load_config(args.config, overrides)
    if args.local:
        from engram_ray.engine import extract_from_config

        return extract_from_config(cfg).uri
    from engram_ray.distributed.runner import run_extract

    return run_extract(cfg)


def cmd_apply(args) -> str:
    from engram_ray.apply import apply_run

    modules = args.modules
    if modules and "," in modules:
        modules = _split(modules)
    elif modules and not any(ch in modules for ch in "*.[]()|?+\\"):
        modules = [modules]  # a bare name is a suffix, like PEFT's list form
    return apply_run(
        args.run, _split(args.forget), alpha=args.alpha, scale=args.scale, modules=modules,
        out=args.out, model=args.model, storage_options=_storage(args.storage_option),
    )


def cmd_show(args) -> str:
    from engram_ray.io.store import open_run

    run = open_run(args.run, _storage(args.storage_option))
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


def cmd_demo(args) -> str:
    from pipelines.digits import run_demo

    return run_demo(args.out, stages=args.stages, quick=args.quick)


def cmd_eval(args) -> str:
    from engram_ray.distributed.search import eval_command

    return eval_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

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

    a = sub.add_parser("apply", help="write a model with concepts forgotten")
    a.add_argument("--run", required=True, help="committed run URI")
    a.add_argument("--forget", required=True, help="comma-separated concepts")
    a.add_argument("--alpha", type=float, default=1.0, help="edit strength (negative amplifies)")
    a.add_argument("--scale", default="uniform",
                   help="uniform | weight_norm | effective_rank | products like a*b")
    a.add_argument("--modules", default=None,
                   help="only these modules: comma-separated suffixes, or a regex")
    a.add_argument("--model", default=None, help="model dir/URI (default: the run's model)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    a.set_defaults(fn=cmd_apply)

    s = sub.add_parser("show", help="describe a committed run")
    s.add_argument("run")
    s.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_show)

    d = sub.add_parser("demo", help="class-wise unlearning on scikit-learn's digits, end to end")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--stages", type=int, default=2)
    d.add_argument("--quick", action="store_true", help="fewer α values and classes (tests)")
    d.set_defaults(fn=cmd_demo)

    v = sub.add_parser("eval", help="TOFU-protocol evaluation of an edit (and an α search)")
    v.add_argument("--run", required=True)
    v.add_argument("--model", default=None)
    v.add_argument("--gold", required=True, help="retain-only model directory")
    v.add_argument("--forget-set", required=True)
    v.add_argument("--retain-set", required=True)
    v.add_argument("--holdout-set", required=True)
    v.add_argument("--forget", required=True, help="comma-separated concepts to forget")
    v.add_argument("--alphas", default="1.0", help="comma-separated α values to try in parallel")
    v.add_argument("--scale", default="uniform")
    v.add_argument("--out", required=True)
    v.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"engram-ray {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # a Ray task error wraps the user error: unwrap its message
        cause = getattr(e, "cause", None)
        if isinstance(cause, USER_ERRORS):
            print(f"engram-ray {args.command}: error: {cause}", file=sys.stderr)
            return 2
        raise
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
