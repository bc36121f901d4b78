"""The ``engram-ray`` command: extract, apply, show, demo, eval.

Conventions: the result a script needs (a run URI, an output path) is the last line of stdout;
progress and logs go to stderr; bad input exits with status 2 and one line naming the culprit
(file, column, key, concept or module); nothing is committed or half-written on failure.

This module owns every subcommand's arguments: comma-separated lists are parsed here, once
(:func:`_csv`), and the work is handed to plain functions with typed arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["build_parser", "main"]

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, TypeError)
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


def _storage(items: list[str] | None) -> dict | None:
    """Repeated ``--storage-option KEY=VALUE`` flags as fsspec storage options."""
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
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
    """Write the edited model; returns ``--out``."""
    from engram_ray.apply import apply_run

    return apply_run(
        args.run, _csv(args.forget), alpha=args.alpha, scale=args.scale,
        modules=_modules(args.modules), out=args.out, model=args.model,
        storage_options=_storage(args.storage_option),
    )


def cmd_show(args) -> str:
    """Describe a committed run on stderr; returns its URI."""
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
        forget=_csv(args.forget), alphas=_csv(args.alphas, float), scale=args.scale,
        out=args.out,
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


def _add_show(sub) -> None:
    s = sub.add_parser("show", help="describe a committed run")
    s.add_argument("run")
    s.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_show)


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
    v.add_argument("--forget", required=True, help="comma-separated concepts to forget")
    v.add_argument("--alphas", default="1.0", help="comma-separated α values to try in parallel")
    v.add_argument("--scale", default="uniform")
    v.add_argument("--out", required=True)
    v.set_defaults(fn=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    """The ``engram-ray`` parser: one subparser per subcommand, each bound to its ``cmd_*``."""
    p = argparse.ArgumentParser(prog="engram-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_extract, _add_apply, _add_show, _add_demo, _add_eval):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand: prints its result as stdout's last line; user errors exit 2."""
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
