"""No module imports from a layer above it: kernels < model < engine < server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["kernels", "model", "engine", "server"]


def _imported_layers(path: Path) -> set[str]:
    """Layers a module imports, from absolute palm_serve.X imports and relative ones."""
    package = path.relative_to(ROOT).parts[:-1]  # e.g. ("kernels", "triton")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("palm_serve."):
                found.add(node.module.split(".")[1])
            elif node.level > 0:
                base = package[: len(package) - node.level + 1]
                target = list(base) + (node.module.split(".") if node.module else [])
                if target:
                    found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("palm_serve."):
                    found.add(alias.name.split(".")[1])
    return found & set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_no_upward_imports(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_layers(path) & above)
        for path in (ROOT / layer).rglob("*.py")
        if _imported_layers(path) & above
    }
    assert not offenders, f"{layer}/ imports from a layer above it: {offenders}"


# ---- import cycles ---------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["palm_serve", *parts])


def _served_modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Served modules this file imports anywhere: at the top, inside functions (lazy) and
    under `if TYPE_CHECKING:` alike; a cycle hidden by any of them is still a cycle."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # submodules
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_lazy_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_the_served_packages() -> None:
    modules = _served_modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    # A package's __init__ re-exports its modules; a module importing its own package
    # (from . import x) is not a cycle of code, so edges into a package __init__ from
    # inside that package are dropped.
    for name, targets in graph.items():
        graph[name] = {
            t
            for t in targets
            if not (modules[t].name == "__init__.py" and name.startswith(t + "."))
        }
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"
