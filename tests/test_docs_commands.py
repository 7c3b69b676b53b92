"""Every command shown in README.md and docs/*.md still works at the argument level, so none of them rots.

Each line of a fenced code block that runs `python -m MODULE ...` (also `.venv/bin/python`, `python3`, after
`VAR=value` prefixes, `\\` continuations joined, `# comments` dropped) is checked without running it:
- the module exists;
- `experiments.run` (Hydra): every job the line would run composes through harness.compose (a `-m` sweep is
  expanded as the basic sweeper expands it, a `+sweep=` preset's own grid included), and its `hydra/...` and
  `hydra.*` overrides compose with Hydra's own config (launcher presets, their fields);
- `experiments.export` and `app.web`: their own argument parsing and config composition;
- every other module of the repository: its `main` is called with the line's arguments and stopped right after its
  argparse parser accepted them (a rejected argument exits 2, as on the command line); the Hydra overrides it passes
  on (`overrides`) compose where the module composes them as they stand;
- `make TARGET` names a target of the Makefile; `bash PATH` names a file of the repository.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHONS = {"python", "python3", ".venv/bin/python", "$(BIN)/python"}
SEPARATORS = {";", "&&", "||", "|"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FENCE = re.compile(r"^\s*(```|~~~)")
# modules whose positional `overrides` are composed as they stand (app.serve adds backend=lmdeploy first)
COMPOSES_OVERRIDES = {"app.chat": [], "app.serve": ["backend=lmdeploy"], "experiments.synthetic": []}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def fenced_lines(path: Path):
    """(line number, text) of each logical line inside a fenced block, continuations joined."""
    inside, pending, start = False, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def commands(path: Path) -> list[Command]:
    out = []
    for n, line in fenced_lines(path):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell (a Python or YAML block)
            continue
        part: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in SEPARATORS:
                part.append(tok)
                continue
            while part and ENV_ASSIGNMENT.match(part[0]):
                part.pop(0)
            if part and (part[0] in PYTHONS and part[1:2] == ["-m"] or part[0] in ("make", "bash")):
                out.append(Command(f"{path.relative_to(REPO)}:{n}", tuple(part)))
            part = []
    return out


ALL = [c for p in DOCS for c in commands(p)]


def test_docs_show_commands():
    """The collection itself works: the README's examples and the docs' commands are found."""
    readme = [c for c in ALL if c.where.startswith("README.md")]
    assert {("make", "demo"), ("make", "test")} <= {c.argv[:2] for c in readme}
    assert sum(c.argv[0] in PYTHONS for c in readme) >= 4
    assert len(ALL) >= 40


# ---- the checks -------------------------------------------------------------------------------------------------

class _Parsed(Exception):
    """Raised by the patched parse_args once a module's parser accepted its arguments."""


@lru_cache(maxsize=None)
def _makefile_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


def _import_quant() -> None:
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)


@lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]):
    from harness.compose import compose

    _import_quant()
    return compose(list(overrides))


def _is_hydra_setting(override: str) -> bool:
    return override.lstrip("+~").startswith("hydra")


def _hydra_config(overrides: list[str]):
    """The composed config with Hydra's own node (launcher, sweeper params), from the non-sweep overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.compose import CONF_DIR
    from harness.config import register_schemas

    _import_quant()
    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def check_experiments_run(args: list[str]) -> int:
    """Compose every job the command would run; returns how many."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, multirun, it = [], False, iter(args)
    for a in it:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("--cfg", "-c", "--package", "-p"):
            next(it, None)
        elif a.startswith("-"):
            raise AssertionError(f"experiments.run: flag {a} is not checked by this test")
        else:
            overrides.append(a)
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    sweeping = [o.input_line for o in parsed if o.is_sweep_override()]
    assert multirun or not sweeping, f"sweep values without -m: {sweeping}"
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = _hydra_config(plain)  # launcher presets and hydra.* fields, and the sweep preset's grid
    if not multirun:
        _compose(tuple(o for o in overrides if not _is_hydra_setting(o)))
        return 1
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    task = [o for o in overrides if not _is_hydra_setting(o)]
    jobs = [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(params + task), None) for job in batch]
    for job in jobs:
        _compose(tuple(job))
    return len(jobs)


def parse_only(module: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """Call `module`'s main with `args` and stop once its argparse parser has accepted them."""
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # a package run with -m: its __main__
        mod = importlib.import_module(f"{module}.__main__")
    main = getattr(mod, "main", None)
    assert callable(main), f"{module} has no main() to parse arguments with"
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, a=None, namespace=None):
        raise _Parsed(original(self, a, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        main(list(args)) if inspect.signature(main).parameters else main()
    except _Parsed as p:
        return p.args[0]
    except SystemExit as e:
        raise AssertionError(f"{module} refused the arguments {args} (exit {e.code})") from None
    raise AssertionError(f"{module}.main returned without parsing its arguments with argparse")


def check_python_module(module: str, args: list[str], monkeypatch) -> None:
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    top = module.split(".")[0]
    if not (REPO / top).is_dir():  # a tool's module (pytest, pip): only that it exists, and the paths it is given
        for a in args:
            if a.startswith("tests/"):
                assert (REPO / a.split("::")[0]).exists(), f"{a} does not exist"
        return
    if module == "experiments.run":
        check_experiments_run(args)
    elif module == "experiments.export":
        from experiments.export import compose_config, parse_args

        overrides, _out, _force, _fmt = parse_args(args)
        compose_config(overrides)
    elif module == "app.web":
        from app.web_config import compose_web

        compose_web(args)
    else:
        ns = parse_only(module, args, monkeypatch)
        if module in COMPOSES_OVERRIDES:
            _compose(tuple(COMPOSES_OVERRIDES[module] + list(getattr(ns, "overrides", []))))


@pytest.mark.parametrize("cmd", ALL, ids=[c.where for c in ALL])
def test_command(cmd: Command, monkeypatch):
    argv = list(cmd.argv)
    if argv[0] == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
        missing = [t for t in targets if t not in _makefile_targets()]
        assert targets and not missing, f"{cmd}: no Makefile target {missing}"
    elif argv[0] == "bash":
        assert (REPO / argv[1]).is_file(), f"{cmd}: {argv[1]} is not a file of the repository"
    else:
        try:
            check_python_module(argv[2], argv[3:], monkeypatch)
        except Exception as e:  # noqa: BLE001 (name the doc line that broke)
            raise AssertionError(f"{cmd}\n  -> {type(e).__name__}: {e}") from e


def test_readme_excerpt_is_generated_from_the_committed_table():
    """The README's table excerpt is what `python -m report.readme_excerpt` writes from results/tables/paper.md."""
    from report.readme_excerpt import BEGIN, END, README, TABLE, rewrite

    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert rewrite(text, TABLE.read_text(encoding="utf-8")) == text, \
        "README.md's excerpt is stale: run python -m report.readme_excerpt (make demo does) and commit README.md"


def test_readme_excerpt_takes_header_and_first_rows():
    from report.readme_excerpt import BEGIN, END, block, rewrite

    rows = "\n".join(f"| r{i} | {i} |" for i in range(9))
    table = f"### Table 1: m on d\n\n| config | PPL |\n|:---|---:|\n{rows}\n\n- a note\n"
    out = block(table)
    assert out.splitlines()[2:] == ["| config | PPL |", "|:---|---:|", *[f"| r{i} | {i} |" for i in range(6)]]
    assert "Table 1: m on d: first 6 of 9 rows" in out.splitlines()[0]
    readme = f"# x\n\nbefore\n{BEGIN}\nold text\n{END}\nafter\n"
    new = rewrite(readme, table)
    assert new.startswith(f"# x\n\nbefore\n{BEGIN}\n") and new.endswith(f"\n{END}\nafter\n") and "old text" not in new
    assert rewrite(new, table) == new  # idempotent
    with pytest.raises(ValueError):
        rewrite("# no markers\n", table)
    with pytest.raises(ValueError):
        block("no table here\n")


def test_readme_is_a_front_door():
    """At most 150 lines; names no file outside the repository and no issue number."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for path in DOCS:
        body = path.read_text(encoding="utf-8")
        assert "../shared" not in body and "TARGETS.md" not in body, path
        assert not re.search(r"\bissue \d+|#\d+\b", body, re.I), f"{path}: names an issue number"


# ---- links and paths --------------------------------------------------------------------------------------------

TOP_DIRS = ("harness/", "quant/", "eval/", "backends/", "report/", "experiments/", "app/", "benchmarks/", "conf/",
            "results/", "tests/", "notebooks/", "docs/", ".ci/")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), re.M)}


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_links_and_paths_exist(path: Path):
    """Every relative link (and its #anchor) and every repository path named in backticks exists."""
    text = path.read_text(encoding="utf-8")
    broken = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target, _, anchor = m.group(1).partition("#")
        if "://" in target:
            continue
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            broken.append(m.group(1))
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(m.group(1))
    for m in re.finditer(r"`([\w./-]+)`", text):
        name = m.group(1).split("::")[0]
        if name.startswith(TOP_DIRS) and not (REPO / name).exists():
            broken.append(name)
    assert not broken, f"{path.relative_to(REPO)}: {broken}"
