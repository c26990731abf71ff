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
