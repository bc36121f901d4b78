"""Edited outputs (checkpoints, adapters): exact or clean, never mixed, never wrongly skipped.

An edit's output is a directory (local) or prefix (any fsspec store) that one writer fills:

- *One writer.* The edit driver holds the output's lease (``io/store.held_lease``, the runs'
  mechanism: an exclusive create, a heartbeat, a dead same-host holder broken at once) from
  the output's inspection to its publication, so the check and the write are one step.
- *Staged, marker last.* Files are written into a stage (:func:`new_stage`: ``<out>.partial-
  <nonce>`` beside a local output, ``<cache>/staging/<hash of out>-<nonce>`` for a remote one)
  that starts with :data:`IN_PROGRESS` (the request's digest); a local stage is renamed into
  place whole, a remote one uploaded with :data:`IN_PROGRESS` first and the completion marker
  (``edit.json`` / ``adapter_meta.json``) last, then :data:`IN_PROGRESS` is removed.
- *Content-addressed markers.* The marker records the request's digest (the run's generation,
  the forget set, α, scale, modules, solver, format and options, the output format) and every
  file's size and sha256 (:func:`file_records`). :func:`inspect` trusts a marker only when its
  digest is this request's and every file verifies: then the output is ``complete`` (a batch
  skips it). A marker of another request is refused naming both; an output with
  :data:`IN_PROGRESS`, or a marker whose files do not verify, is ``incomplete`` (an earlier
  attempt killed mid-upload, or damaged since): it is cleared and redone under the lease.
  Anything else in the way is not ours and is refused, never removed.
- *Clean-up.* Under the lease, stale stages of dead writers of the same output are removed
  (:func:`remove_stale`); nothing is left in the system temp directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping

from engram_ray.io.storage import Storage

__all__ = ["IN_PROGRESS", "OUTPUT_FORMAT", "file_records", "inspect", "new_stage",
           "remove_stale", "stage_root", "start"]

IN_PROGRESS = "_INCOMPLETE.json"  # first into a stage, removed once the marker is out
OUTPUT_FORMAT = 2  # 2: markers name the request digest and every file's size and sha256
_CHUNK = 8 << 20


def stage_root() -> str:
    """Where remote outputs are staged: ``$ENGRAM_RAY_CACHE/staging`` (default
    ``~/.cache/engram_ray/staging``), never the system temp directory, so a killed writer's
    stage is found and removed by the next writer of the same output."""
    root = os.environ.get("ENGRAM_RAY_CACHE") or os.path.join("~", ".cache", "engram_ray")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "staging")


def _stage_prefix(dest: Storage) -> str:
    if not dest.remote:
        return f"{os.path.abspath(os.path.expanduser(dest.root)).rstrip(os.sep)}.partial-"
    digest = hashlib.sha256(dest.uri.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(stage_root(), f"{digest}-")


def new_stage(dest: Storage) -> str:
    """A fresh, empty local directory to write ``dest``'s files into (module docstring)."""
    stage = f"{_stage_prefix(dest)}{uuid.uuid4().hex[:12]}"
    os.makedirs(os.path.dirname(stage), exist_ok=True)
    os.mkdir(stage)
    return stage


def remove_stale(dest: Storage) -> list[str]:
    """Remove the stages dead writers of ``dest`` left (call under ``dest``'s lease: no live
    writer has one then); returns what was removed. Only names of the stage pattern."""
    prefix = _stage_prefix(dest)
    parent, head = os.path.dirname(prefix), os.path.basename(prefix)
    pattern = re.compile(re.escape(head) + r"[0-9a-f]{12}")
    gone = []
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        if pattern.fullmatch(name):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            gone.append(os.path.join(parent, name))
    return gone


def start(stage: str, digest: str) -> None:
    """Mark a stage as an attempt of the request ``digest`` (:data:`IN_PROGRESS`)."""
    with open(os.path.join(stage, IN_PROGRESS), "w") as f:
        json.dump({"request_digest": digest, "output_format": OUTPUT_FORMAT}, f)


def file_records(stage: str, marker: str) -> dict[str, dict]:
    """``{relative name: {"size", "sha256"}}`` of every file in ``stage`` but the marker and
    :data:`IN_PROGRESS`: what the marker vouches for."""
    out = {}
    for d, _, files in os.walk(stage):
        for f in files:
            name = os.path.relpath(os.path.join(d, f), stage).replace(os.sep, "/")
            if name in (marker, IN_PROGRESS):
                continue
            h, size = hashlib.sha256(), 0
            with open(os.path.join(d, f), "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            out[name] = {"size": size, "sha256": h.hexdigest()}
    return dict(sorted(out.items()))


def inspect(dest: Storage, marker: str, digest: str) -> tuple[str, str]:
    """``(state, why)`` of an output for the request ``digest``: ``absent``, ``complete`` (its
    marker is this request's and every file verifies) or ``incomplete`` (an earlier attempt,
    or damaged). Raises ``FileExistsError`` for another request's output or foreign files."""
    names = _names(dest)
    if not names:
        return "absent", ""
    if marker in names:
        found = dest.read_json(marker)
        theirs = found.get("request_digest") if isinstance(found, Mapping) else None
        if theirs is not None and theirs != digest:
            raise FileExistsError(
                f"output {dest.uri} holds another edit (request {theirs[:12]}: concepts "
                f"{found.get('concepts') or found.get('forget')}, alpha {found.get('alpha')}); "
                f"this request is {digest[:12]}: choose another output")
        problem = _unverified(dest, found, names, marker) if theirs else \
            "its marker names no request digest (written by an older engram-ray)"
        return ("incomplete", problem) if problem else ("complete", "")
    if IN_PROGRESS in names:
        return "incomplete", "an earlier attempt stopped before its marker was written"
    kind = "directory" if not dest.remote else "prefix"
    raise FileExistsError(f"output {kind} {dest.uri} exists and is not empty (it holds "
                          f"{sorted(names)[:5]}); an edit is never merged with other files: "
                          "choose an empty output")


def _names(dest: Storage) -> set[str]:
    """Relative names of every file under ``dest`` (empty: absent or empty)."""
    if not dest.remote:
        if os.path.exists(dest.root) and not os.path.isdir(dest.root):
            raise FileExistsError(f"output {dest.uri} is an existing file, not a directory")
        if not os.path.isdir(dest.root):
            return set()
        return {os.path.relpath(os.path.join(d, f), dest.root).replace(os.sep, "/")
                for d, _, fs in os.walk(dest.root) for f in fs}
    try:
        with dest.errors("checking the output"):
            info = dest.fs.info(dest.root)
    except FileNotFoundError:
        return set()
    if info.get("type") != "directory":
        raise FileExistsError(f"output {dest.uri} is an existing object, not a prefix")
    with dest.errors("listing the output"):
        found = dest.fs.find(dest.root)
    root = dest.fs._strip_protocol(dest.root).rstrip("/")
    return {p[len(root):].lstrip("/") for p in found}


def _unverified(dest: Storage, marker: Mapping, names: set[str], marker_name: str) -> str:
    """Why the files of a marked output do not match its marker ('' when they all do)."""
    files = marker.get("files")
    if not isinstance(files, Mapping) or not files:
        return "its marker lists no files"
    extra = sorted(names - set(files) - {marker_name, IN_PROGRESS})
    if extra:
        return f"it holds files its marker does not list ({extra[:3]})"
    for name, want in files.items():
        if name not in names:
            return f"{name} is missing"
        h, size = hashlib.sha256(), 0
        with dest.open(name, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        if size != want.get("size") or h.hexdigest() != want.get("sha256"):
            return f"{name} does not match its marker (size {size}, expected {want.get('size')})"
    return ""
