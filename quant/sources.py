"""Which source files decide a method's numbers (its code version: harness.environment.code_version), derived from
its imports, never listed by hand: from the file that defines the method, every `quant.*` module it imports (at the
top or inside a function) is followed, transitively, within quant/; every `harness.*` module those import is a source
too, as a leaf. Left out: modules that never change a result (NOT_RESULT_SOURCES). A change to any other file a
method imports marks its records stale and moves its quantized-cache key."""
from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

from harness.assets import REPO_ROOT

FOLLOWED = ("quant",)  # packages whose modules are followed to their own imports
LEAVES = ("harness",)  # packages whose modules count but are not followed (harness imports only harness)

# imported by methods, yet bit-identical results either way: the package entry point (it imports every method), this
# file, where blocks compute and rest (tests/quant/test_onload.py), the quantized-weight cache, configs' schema and
# validation (a config's values are in the run_id), registries, logging, labels, files and their hashes (a resumed
# run is bit-identical: tests/quant/test_resume.py)
NOT_RESULT_SOURCES = frozenset({
    "quant/__init__.py", "quant/sources.py", "quant/onload.py", "quant/quantized_cache.py",
    "harness/config.py", "harness/registry.py", "harness/log.py", "harness/labels.py", "harness/assets.py",
    "harness/integrity.py",
})


def imported_files(path: Path, root: Path) -> set[str]:
    """Repository files (relative to `root`) of the quant.* / harness.* modules one source file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # a name may be a module
        else:
            continue
        for name in names:
            if name.split(".")[0] not in FOLLOWED + LEAVES:
                continue
            rel = name.replace(".", "/")
            out.update(c for c in (f"{rel}.py", f"{rel}/__init__.py") if (root / c).is_file())
    return out


def file_sources(start: str, root: Path = REPO_ROOT) -> list[str]:
    """`start` (a file relative to `root`) and every file it imports, as the module docstring says, sorted."""
    seen, todo = set(), [start]
    while todo:
        rel = todo.pop()
        if rel in seen or rel in NOT_RESULT_SOURCES:
            continue
        seen.add(rel)
        if rel == start or rel.split("/")[0] in FOLLOWED:
            todo.extend(imported_files(root / rel, root))
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def module_sources(module: str) -> tuple[str, ...]:
    """The sources of the module `module` (a dotted name, imported): file_sources of its file."""
    path = Path(sys.modules[module].__file__).resolve()
    return tuple(file_sources(path.relative_to(REPO_ROOT).as_posix()))
