"""Which modules an extraction or an edit touches: PEFT's selection rules, written once.

``target_modules`` as a list matches dotted-name suffixes (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``), as a string it is a regex over the full name, and
``"all-linear"`` is every supported module but the model's output layer; ``layers_to_transform``
keeps decoder layers by index. The same matcher serves :func:`select_modules` (live modules, at
extraction) and :func:`match_modules` (module names of a committed run, at edit time).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence

from torch import nn

from engram_ray.core.layers import check_supported, module_kind

__all__ = ["layer_index", "match_modules", "matches", "module_regex", "select_modules"]

# Decoder-block containers across families: Llama/Mistral/Qwen "layers", GPT-2 "h",
# many vision/other models "blocks"/"layer".
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Decoder-layer index parsed from a dotted name (``model.layers.3.mlp`` → 3)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def matches(name: str, target: str | Sequence[str] | None) -> bool:
    """Whether module ``name`` is selected: a list matches dotted suffixes, a string is a
    regex that must match the whole name (a bad regex is a ``ValueError`` naming it)."""
    if target is None:
        return True
    if isinstance(target, str):
        return module_regex(target).fullmatch(name) is not None
    return any(name == key or name.endswith("." + key) for key in target)


@functools.lru_cache(maxsize=64)
def module_regex(pattern: str) -> re.Pattern:
    """``pattern`` compiled, or a ``ValueError`` naming it (``--modules``, ``target_modules``
    and a request's ``modules`` are user input: a typo is bad input, not a traceback)."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"module selection {pattern!r} is not a valid regular expression: "
                         f"{e}") from None

def match_modules(names: Sequence[str], selection: str | Sequence[str] | None) -> list[str]:
    """PEFT-style selection over module names (a run's): list = dotted suffixes, str = regex."""
    if selection is None:
        return list(names)
    target = selection if isinstance(selection, str) else list(selection)
    picked = [n for n in names if matches(n, target)]
    if not picked:
        raise ValueError(f"module selection {selection!r} matches none of the run's modules "
                         f"(e.g. {list(names)[:6]})")
    return picked


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    *,
    allow_empty: bool = False,
) -> dict[str, nn.Module]:
    """The named modules to capture, by PEFT's rules; an empty selection is an error.

    ``None`` selects every supported module (lm_head included); ``"all-linear"`` every
    supported module except the model's output layer, like PEFT. ``allow_empty`` is for one
    pipeline stage, whose slice may hold none of the targets (the union is checked instead).
    """
    named = list(model.named_modules())
    candidates = [(n, m) for n, m in named if n and module_kind(m) is not None]
    if target_modules == "all-linear":
        out = _output_layer_name(model)
        picked = [(n, m) for n, m in candidates if n != out]
    elif target_modules is None:
        picked = candidates
    else:
        if isinstance(target_modules, str):
            picked = [(n, m) for n, m in named if n and matches(n, target_modules)]
        else:
            picked = [(n, m) for n, m in named if n and matches(n, list(target_modules))]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(
            layers_to_transform
        )
        picked = [(n, m) for n, m in picked if layer_index(n) in wanted]
    if not picked:
        if allow_empty:
            return {}
        raise ValueError(_no_match_message(target_modules, layers_to_transform, candidates))
    # A target that names a module explicitly must be supported; reject rather than skip it.
    if target_modules not in (None, "all-linear"):
        picked = [(n, m) for n, m in picked if not _is_container(m)]
        for n, m in picked:
            check_supported(n, m)
    else:
        for n, m in picked:
            check_supported(n, m)
    return dict(picked)


def _is_container(module: nn.Module) -> bool:
    # A regex may also match a parent block (``.*attn``); only leaves can be layers.
    return module_kind(module) is None and any(True for _ in module.children())


def _output_layer_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for n, m in model.named_modules():
        if out is not None and m is out:
            return n
    return None


def _no_match_message(target, layers, candidates) -> str:
    names = [n for n, _ in candidates]
    suffixes = sorted({n.split(".")[-1] for n in names})
    keys = [target] if isinstance(target, str) else list(target or [])
    close = []
    for k in keys:
        close += difflib.get_close_matches(str(k).split(".")[-1], suffixes, n=3, cutoff=0.5)
    msg = f"target_modules={target!r} layers_to_transform={layers!r} matched no supported module"
    if close:
        msg += f"; did you mean {sorted(set(close))}?"
    msg += f" Supported module names end in: {suffixes[:20]}"
    return msg


