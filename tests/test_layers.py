"""The layout's one rule: a lower layer never imports a higher one (docs/layout.md). Every import in every module,
also those inside functions, is read from the source with `ast`; an import of a higher layer fails the test, naming
the file and line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness.assets import REPO_ROOT

# lowest first; a package may import its own layer and every layer below it
LAYERS = ["harness", "quant", "eval", "backends", "report", "experiments", "app", "benchmarks"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def upward_imports(root: Path) -> list[str]:
    bad = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            for line, pkg in imported_packages(path):
                if pkg in RANK and RANK[pkg] > RANK[layer]:
                    bad.append(f"{path.relative_to(root)}:{line} ({layer}) imports {pkg}")
    return bad


def test_every_package_is_a_layer():
    """A new top-level package must be placed in LAYERS (else its imports would go unchecked)."""
    packages = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS), f"place {sorted(packages - set(LAYERS))} in LAYERS (or remove {sorted(set(LAYERS) - packages)})"


def test_no_layer_imports_a_higher_one():
    assert upward_imports(REPO_ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "quant" / "ok.py").write_text("import torch\nfrom harness.config import RunConfig\n")
    (tmp_path / "harness" / "bad.py").write_text("def f():\n    from report.tables import Table\n")
    assert upward_imports(tmp_path) == ["harness/bad.py:2 (harness) imports report"]


@pytest.mark.parametrize("pkg", LAYERS)
def test_each_layer_imports(pkg):
    """Every module of every layer imports (no import left pointing at a moved file)."""
    import importlib

    for path in sorted((REPO_ROOT / pkg).rglob("*.py")):
        mod = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if mod.endswith("__main__"):
            continue
        importlib.import_module(mod)
