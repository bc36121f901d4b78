"""Incremental extraction: add new shards to a run's Σ without re-reading the old ones.

A run extracted with ``store.keep_statistics: true`` keeps every input group's Σ tagged with the
shards it covers (``Moments.sources``). Extending it (``store.extend: <run>``) reads only the
shards of the new config that the base has not counted; the extraction core merges their Σ into
the base's group by group (``extraction.merge_base``) —
``Moments.merge`` is an exact sum and refuses a shard counted twice — and solves again, so

    extend(base over A, data A ∪ B)  ==  one pass over A ∪ B

for the engrams of every concept (new concepts, and more data for old ones). The model must be
the very one the base was extracted from (same weight fingerprint), or the two Σ would describe
different activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from engram_ray.core.moments import merge_summaries
from engram_ray.io.store import Run, open_run

__all__ = ["Extension", "prepare_extension"]


@dataclass
class Extension:
    """A base run and the config restricted to the shards it has not counted."""

    base: Run
    config: object  # the ExtractConfig over the new shards only, keep_statistics on
    new_files: list[str]
    old_sources: frozenset[str]
    inputs: dict = field(default_factory=dict, repr=False)  # new file → its Storage (resolved)

    @property
    def fingerprint(self) -> str | None:
        return self.base.info.get("model", {}).get("fingerprint")

    def check_model(self, fingerprint: str) -> None:
        if self.fingerprint != fingerprint:
            raise ValueError(
                f"store.extend: the model's weights differ from those run {self.base.uri} was "
                f"extracted from (fingerprint {fingerprint[:12]}… vs {str(self.fingerprint)[:12]}…); "
                "engrams of two models cannot share one Σ")

    def check_modules(self, names) -> None:
        """The new pass must capture exactly the base run's modules."""
        diff = sorted(set(names) ^ set(self.base.modules))
        if diff:
            raise ValueError(f"store.extend: the selected modules differ from run "
                             f"{self.base.uri}'s, e.g. {diff[:5]} (select.* must match the base)")

    def merge_summaries(self, summaries: Mapping[str, tuple[int, Mapping[str, int]]]) -> dict:
        """(tokens, tokens per concept) per group over base + new (for run.json and checks)."""
        base = {g: (i["tokens"], i["concept_tokens"])
                for g, i in self.base.info.get("groups", {}).items()}
        return merge_summaries(base, summaries)


def prepare_extension(cfg) -> Extension | None:
    """``None`` without ``store.extend``; else the base run (committed, with its Σ kept) and a
    config over only the shards it has not counted. No new shard is an error naming them."""
    from engram_ray.io.data import resolve_files

    if cfg.store.extend is None:
        return None
    base = open_run(cfg.store.extend, cfg.store.storage_options)
    modules = base.info.get("modules", {})
    if not modules:
        raise ValueError(f"store.extend: run {base.uri} lists no modules")
    first_group = sorted({d["group"] for d in modules.values()})[0]
    old = base.group_statistics(first_group).sources  # every group covers the same shards
    found = {f.uri: f for f in resolve_files(cfg.data)}
    files = list(found)
    new = [f for f in files if f not in old]
    if not new:
        raise ValueError(f"store.extend: all {len(files)} shard(s) of data.paths are already "
                         f"counted in run {base.uri}; nothing to add")
    restricted = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, paths=new),
        store=dataclasses.replace(cfg.store, keep_statistics=True))
    return Extension(base=base, config=restricted, new_files=new, old_sources=old,
                     inputs={f: found[f] for f in new})
