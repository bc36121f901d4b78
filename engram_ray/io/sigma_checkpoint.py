"""Resumable extraction: the Σ counted so far, checkpointed every ``store.checkpoint_shards``.

A long extraction (hours over a corpus in object storage, on preemptible nodes) should not start
over after a kill. With ``store.checkpoint_shards: N`` the driver feeds the shards in slices of
N; after every slice but the last it reduces each input group's Σ so far and writes it, tagged
with the shards it covers, under ``<store.uri>/_checkpoints/<run_id>/`` as a new *generation*:
the group blobs first, then ``state.json`` pointing at the generation (one object write: the
checkpoint's own commit marker; a kill in between leaves the previous generation in force).

Rerunning the same config with the same ``run_id`` finds ``state.json``, skips the shards it
covers, and merges the checkpoint's Σ into each group at solve time exactly as an extension
merges its base run's (``Moments.merge`` refuses a shard counted twice), so every row is counted
exactly once across the kill. The state names the model fingerprint and a digest of the config
that shapes Σ (model, data, select); a rerun with anything else is refused. Committing the run
removes the checkpoint. Credentials are no part of the digest (see :func:`config_digest`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from engram_ray.core.moments import Moments
from engram_ray.io.storage import Location, Storage, as_storage, join, location_uri

__all__ = ["CHECKPOINT_DIR", "Generation", "SigmaCheckpoint", "config_digest", "restrict", "slices"]

CHECKPOINT_DIR = "_checkpoints"
STATE = "state.json"


def config_digest(cfg) -> str:
    """sha256 of the config sections that decide what Σ holds (not parallelism, not storage).

    Of ``data.storage_options`` only the endpoint counts (it decides what the data paths name);
    credentials, retries and the like do not, so rotating a key never blocks a resume."""
    shaping = {k: v for k, v in cfg.to_dict().items() if k in ("model", "data", "select")}
    if "data" in shaping:
        shaping["data"] = {**shaping["data"],
                           "storage_options": _endpoint(cfg.data.storage_options)}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()


def _endpoint(options: Mapping | None) -> dict | None:
    """The part of storage options that says where data lives (``None`` when nothing does)."""
    options = options or {}
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url")
    return {"endpoint_url": endpoint} if endpoint else None


@dataclass(frozen=True)
class Generation:
    """One written checkpoint generation: ``group_statistics(g)`` reads a group's Σ."""

    uri: str
    storage_options: Mapping | None = None
    # The checkpoint's child, sharing its filesystems (None: built from ``uri`` on first use,
    # as after unpickling in a Ray task: once per process).
    location: Storage | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def storage(self) -> Storage:
        return self.location if self.location is not None \
            else Storage(self.uri, self.storage_options)

    @property
    def name(self) -> str:
        """``gen-…``: the generation's directory name (what ``state.json`` points at)."""
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def group_statistics(self, group: str) -> Moments:
        rel = f"{group}.safetensors"
        with self.storage.open(rel, "rb") as f:
            return Moments.from_bytes(f.read(), what=f"{self.uri}/{rel}")

    def write_group(self, group: str, moments: Moments) -> None:
        self.storage.write_bytes(f"{group}.safetensors", moments.to_bytes())


class SigmaCheckpoint:
    """``<store.uri>/_checkpoints/<run_id>``: its generations, and the state found on opening.

    ``sources``, ``summaries`` and ``generation`` describe what this process resumes from (the
    state at opening); :meth:`commit` moves the state on disk forward without changing them.
    """

    def __init__(self, store_uri: Location, run_id: str, storage_options=None) -> None:
        store = as_storage(store_uri, storage_options)  # the run's store (a Storage: as is)
        self.uri = join(location_uri(store_uri), CHECKPOINT_DIR, run_id)
        self.storage_options = store.options
        self._storage = store.child(CHECKPOINT_DIR, run_id)
        self.state: dict | None = self._read_state()  # as found on opening

    @property
    def sources(self) -> frozenset[str]:
        return frozenset(self.state["sources"]) if self.state else frozenset()

    @property
    def generation(self) -> Generation | None:
        if not self.state:
            return None
        name = self.state["generation"]
        return Generation(join(self.uri, name), self.storage_options, self._storage.child(name))

    def check(self, digest: str) -> None:
        """A checkpoint from another config cannot be resumed: name it and the way out."""
        if self.state and self.state["config_digest"] != digest:
            raise ValueError(
                f"checkpoint {self.uri} was written by a different config (model, data or "
                "select changed); rerun with the original config, or delete the checkpoint / "
                "choose another store.run_id to start over")

    def check_model(self, fingerprint: str) -> None:
        if self.state and self.state["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {self.uri} was counted with other model weights; "
                             "delete it or choose another store.run_id to start over")

    def summaries(self) -> dict[str, tuple[int, dict[str, int]]]:
        """(tokens, tokens per concept) per group counted by the checkpoint."""
        if not self.state:
            return {}
        return {g: (n, dict(c)) for g, (n, c) in self.state["summaries"].items()}

    def new_generation(self) -> Generation:
        name = f"gen-{secrets.token_hex(4)}"
        self._storage.makedirs(name)
        return Generation(join(self.uri, name), self.storage_options, self._storage.child(name))

    def commit(self, gen: Generation, *, sources, summaries, fingerprint: str, digest: str,
               keep: Generation | None = None) -> None:
        """Make ``gen`` the checkpoint in force (one write of state.json), then drop every
        other generation but ``keep`` (the one this process resumed from, still merged in)."""
        state = {"generation": gen.name,
                 "sources": sorted(sources), "summaries": summaries,
                 "fingerprint": fingerprint, "config_digest": digest}
        self._storage.write_bytes(STATE, json.dumps(state, sort_keys=True).encode())
        wanted = {gen.name} | ({keep.name} if keep is not None else set())
        for name in self._storage.ls():
            if name.startswith("gen-") and name not in wanted:
                self._storage.rm(name)

    def remove(self) -> None:
        if self._storage.exists():
            self._storage.rm()

    def _read_state(self) -> dict | None:
        if not self._storage.exists(STATE):
            return None
        return self._storage.read_json(STATE)


def slices(files: list[str], size: int | None) -> list[list[str]]:
    """The files in order, ``size`` at a time (all at once without checkpoints)."""
    if not size:
        return [files]
    return [files[i:i + size] for i in range(0, len(files), size)]


def restrict(cfg, files: list[str]):
    """``cfg`` reading only ``files``."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=list(files)))
