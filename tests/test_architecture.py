"""The architecture, checked: layers import downwards only, Ray stays in ``distributed/``, there
is no import cycle, functions stay short, and the public API names only what users call.

These read the source with ``ast`` (nothing is imported), so a violation names the file and
line instead of failing somewhere at run time.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "engram_ray"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: pathlib.Path, *, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every import; ``top_level_only`` skips function bodies
    (deferred imports cannot form a cycle at import time)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names
                    if f"{node.module}.{a.name}" in MODULES]
            if len(subs) < len(node.names):  # names from the module itself, not submodules
                out.append((node.module, node.lineno))
            out += [(m, node.lineno) for m in subs]
    return out


def test_ray_is_imported_only_in_distributed():
    bad = [f"{p.relative_to(PKG.parent)}:{line}" for name, p in MODULES.items()
           if not name.startswith("engram_ray.distributed")
           for mod, line in _imports(p, top_level_only=False)
           if mod == "ray" or mod.startswith("ray.")]
    assert not bad, f"ray imported outside engram_ray/distributed/: {bad}"


def test_distributed_uses_only_the_neutral_layers():
    """distributed/ reaches the single-process driver's modules only through the core."""
    banned = ("engram_ray.local", "engram_ray.apply", "engram_ray.incremental", "engram_ray.cli")
    bad = [f"{p.relative_to(PKG.parent)}:{line} imports {mod}" for name, p in MODULES.items()
           if name.startswith("engram_ray.distributed")
           for mod, line in _imports(p, top_level_only=False) if mod.startswith(banned)]
    assert not bad, bad


def test_core_does_no_io():
    banned = ("engram_ray.io", "engram_ray.distributed", "engram_ray.models", "fsspec", "s3fs",
              "pyarrow", "ray")
    bad = [f"{p.relative_to(PKG.parent)}:{line} imports {mod}" for name, p in MODULES.items()
           if name.startswith("engram_ray.core")
           for mod, line in _imports(p, top_level_only=False)
           if mod.startswith(banned)]
    assert not bad, bad


def test_no_import_cycle():
    """Deferred imports count too: a cycle hidden in a function body is still a cycle."""
    graph = {name: {m for m, _ in _imports(p, top_level_only=False) if m in MODULES and m != name}
             for name, p in MODULES.items()}
    # importing a submodule runs its package's __init__ first (the root's is the public API)
    for name in list(graph):
        for m in list(graph[name]):
            pkg = m.rpartition(".")[0]
            if pkg in MODULES and pkg not in ("engram_ray", name) and not name.startswith(pkg + "."):
                graph[name].add(pkg)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_functions_are_short():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                # the docstring does not count: it is what makes a function readable
                if body and isinstance(body[0], ast.Expr) and isinstance(
                        getattr(body[0], "value", None), ast.Constant):
                    body = body[1:] or body
                n = node.end_lineno - body[0].lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} "
                                f"({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_public_api_is_what_users_call():
    import engram_ray

    assert set(engram_ray.__all__) == {
        "__version__", "extract", "open_run", "plan_edit", "apply_edit", "load_config",
        "Run", "ExtractConfig", "ModelSpec", "DataConfig", "SelectConfig", "SolverConfig",
        "ParallelConfig", "StoreConfig", "Batch", "EditPlan",
    }
    for name in engram_ray.__all__:
        assert hasattr(engram_ray, name), name
