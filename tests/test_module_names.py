"""No helper module the tests put on sys.path shadows an installed package or the stdlib.

The tests prepend bench/ and the test folders to sys.path, and pytest prepends each test
file's folder. A module there named like an installed distribution's top-level package
wins over it for every later import in the run: bench/kernels.py once broke transformers,
whose integrations import the `kernels` package when it is installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _folders_on_sys_path() -> list[Path]:
    tests = ROOT / "tests"
    folders = [ROOT / "bench", tests]
    folders += [p for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    return folders


def _module_names(folder: Path) -> set[str]:
    """Names importable from the folder that would beat an installed package: modules and
    regular packages (a folder without __init__.py is a namespace package, which loses)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.parent.name for p in folder.glob("*/__init__.py")}
    return names


def test_no_helper_module_shadows_an_installed_or_stdlib_module() -> None:
    installed = set(importlib.metadata.packages_distributions())
    reserved = installed | set(sys.stdlib_module_names)
    assert "torch" in installed  # the lookup sees this environment's packages
    shadowing = {
        f"{folder.relative_to(ROOT)}/{name}": name
        for folder in _folders_on_sys_path()
        for name in _module_names(folder)
        if name in reserved and name != "conftest"
    }
    assert not shadowing, f"rename these: they shadow installed or stdlib modules: {shadowing}"


def test_installed_packages_win_over_the_repository_root() -> None:
    """The root is on sys.path for training/, behind the installed packages: its kernels/ is
    named like the hub package that transformers imports when it is installed."""
    installed = set(importlib.metadata.packages_distributions())
    clashing = sorted(_module_names(ROOT) & installed)
    for name in clashing:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        mine = {ROOT / f"{name}.py", ROOT / name / "__init__.py"}
        assert Path(spec.origin).resolve() not in mine, (name, spec.origin)
    assert str(ROOT) in sys.path  # training/ still imports
