"""``ray job submit`` entrypoint writing edited models from committed runs.

One edit (the arguments of ``engram-ray apply``)::

    ray job submit --address http://HEAD:8265 -- python jobs/apply.py \
        --run s3://bucket/runs/run-… --forget author-17,author-42 --alpha 1.0 --out s3://bucket/edited

A batch of edits (one extraction serves every subset: forget several subsets in one job)::

    python jobs/apply.py --batch edits.yaml        # a local path or an s3:// URI

where ``edits.yaml`` holds defaults for every edit and the list of edits, each key an
``engram-ray apply`` flag (``storage_option`` a mapping)::

    run: s3://bucket/engram-runs/run-…
    alpha: 1.0
    edits:
      - {forget: [author-17, author-42], out: s3://bucket/edited/17-42}
      - {forget: author-3, alpha: 0.8, scale: weight_norm, out: s3://bucket/edited/3}

Every edit is parsed before the first one runs (a typo fails the job before any work); the
edits then run in order and the job stops at the first that fails. Each written output is a
line of stdout, the last edit's last.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import fsspec
import yaml

from engram_ray.cli import build_parser, main

EDIT_KEYS = ("run", "forget", "alpha", "scale", "modules", "model", "out", "storage_option")


def edit_argv(defaults: Mapping, edit: Mapping) -> list[str]:
    """The ``engram-ray apply`` arguments of one edit (``edit`` overrides ``defaults``)."""
    merged = {**defaults, **edit}
    unknown = sorted(set(merged) - set(EDIT_KEYS))
    if unknown:
        raise ValueError(f"unknown edit key(s) {unknown}; expected {list(EDIT_KEYS)}")
    argv = ["apply"]
    for key in EDIT_KEYS:
        value = merged.get(key)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "storage_option":
            for k, v in dict(value).items():
                argv += [flag, f"{k}={v}"]
        elif isinstance(value, list | tuple):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def batch_argvs(spec: Mapping) -> list[list[str]]:
    """Every edit's ``apply`` arguments, each checked by the CLI's own parser."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("edits"), list) or not spec["edits"]:
        raise ValueError("a batch file needs a non-empty list 'edits' (and optional defaults)")
    defaults = {k: v for k, v in spec.items() if k != "edits"}
    argvs = [edit_argv(defaults, edit) for edit in spec["edits"]]
    parser = build_parser()
    for argv in argvs:
        parser.parse_args(argv)  # exits 2 naming the flag, before any edit runs
    return argvs


def read_batch(uri: str) -> list[list[str]]:
    with fsspec.open(uri, "r") as f:
        return batch_argvs(yaml.safe_load(f))


def run(argv: list[str]) -> int:
    if argv[:1] != ["--batch"]:
        return main(["apply", *argv])
    if len(argv) != 2:
        print("usage: jobs/apply.py --batch EDITS.yaml", file=sys.stderr)
        return 2
    try:
        argvs = read_batch(argv[1])
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"engram-ray apply --batch: error: {e}", file=sys.stderr)
        return 2
    for i, edit in enumerate(argvs):
        print(f"[engram-ray] edit {i + 1}/{len(argvs)}: {' '.join(edit[1:])}", file=sys.stderr)
        rc = main(edit)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
