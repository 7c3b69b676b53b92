"""Every conf/ preset composes to the config it composed to when tests/harness/conf_snapshot.json was taken: the
resolved config (every field, interpolations resolved) and its run_id (harness.records.run_id). So conf/ can be
rewritten (presets inheriting from presets, defaults the dataclasses hold left out) without renaming a committed
record. The cases: every option of quant, kv, eval, data, model, backend, experiment, web; every job of every sweep.

A preset changed on purpose (a new result): write the snapshot again and commit it with the change,
    .venv/bin/python -m tests.harness.test_conf_presets --write
A preset added after the snapshot is not compared (it has no earlier config); a field added to a config dataclass
after it is not either (a late field keeps the run_id; harness.config.LATE_FIELDS)."""
from __future__ import annotations

import fnmatch
import json
import sys
from functools import lru_cache
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).with_name("conf_snapshot.json")
CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("quant", "kv", "eval", "data", "model", "backend", "experiment")
# presets other work was writing when the snapshot was taken (FP4 formats, AutoRound, MoE models): left to it
NOT_SNAPSHOTTED = ("quant/*fp4*", "quant/autoround*", "model/*moe*")


def _skipped(group: str, option: str) -> bool:
    return any(fnmatch.fnmatchcase(f"{group}/{option}", p) for p in NOT_SNAPSHOTTED)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not _skipped(group, p.stem))


def _hydra_compose(config_name: str, overrides: list[str], hydra_node: bool = False):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)
    from harness.config import register_schemas

    register_schemas()
    if config_name == "web":
        from app.web_config import WebRunConfig

        ConfigStore.instance().store(name="web_schema", node=WebRunConfig)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_node)


def sweep_jobs(name: str) -> list[list[str]]:
    """The overrides of every job `python -m experiments.run -m +sweep=<name>` runs (Hydra's basic sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    node = _hydra_compose("config", [f"+sweep={name}"], hydra_node=True)
    params = [f"{k}={v}" for k, v in (node.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params + [f"+sweep={name}"]), None)
    return [list(job) for batch in batches for job in batch]


def cases() -> dict[str, tuple[str, list[str]]]:
    """Case name -> (root config, overrides)."""
    out = {}
    for group in GROUPS:
        for option in _options(group):
            key = f"+experiment={option}" if group == "experiment" else f"{group}={option}"
            out[key] = ("config", [key])
    for option in _options("web"):
        out[f"web:web={option}"] = ("web", [f"web={option}"])
    for name in _options("sweep"):
        for job in sweep_jobs(name):
            out[" ".join(job)] = ("config", job)
    return out


def resolved(config_name: str, overrides: list[str]) -> dict:
    """The composed config as plain data (interpolations resolved), and for a run its run_id."""
    from omegaconf import OmegaConf, open_dict

    node = _hydra_compose(config_name, overrides)
    out = {"config": OmegaConf.to_container(node, resolve=True)}
    if config_name == "config":
        from harness.config import to_run_config
        from harness.records import run_id

        with open_dict(node):
            node.pop("hydra", None)
        out["run_id"] = run_id(to_run_config(node))
    return out


@lru_cache(maxsize=1)
def snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def _differences(old, new, path: str = "") -> list[str]:
    """Where `new` differs from `old`; keys `old` lacks are allowed (fields added since, at their defaults)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k, v in old.items():
            if k not in new:
                out.append(f"{path}{k}: gone (was {v!r})")
            else:
                out += _differences(v, new[k], f"{path}{k}.")
        return out
    return [] if old == new and type(old) is type(new) else [f"{path.rstrip('.')}: {old!r} -> {new!r}"]


_CASES = cases()


def test_every_snapshotted_case_still_exists():
    """A preset or sweep job removed (or renamed) is a decision to make on purpose: records and docs name them."""
    gone = sorted(set(snapshot()) - set(_CASES))
    assert not gone, f"cases in {SNAPSHOT.name} no longer composed: {gone}"


@pytest.mark.parametrize("case", sorted(_CASES))
def test_preset_composes_as_in_the_snapshot(case):
    if case not in snapshot():
        pytest.skip(f"{case}: added after the snapshot")
    config_name, overrides = _CASES[case]
    now, before = resolved(config_name, overrides), snapshot()[case]
    assert now.get("run_id") == before.get("run_id"), (
        f"{case}: run_id {before.get('run_id')} -> {now.get('run_id')}: "
        + "; ".join(_differences(before["config"], now["config"]) or ["(identity-only change)"]))
    diff = _differences(before["config"], now["config"])
    assert not diff, f"{case}: " + "; ".join(diff)


def write_snapshot() -> None:
    data = {case: resolved(*_CASES[case]) for case in sorted(_CASES)}
    SNAPSHOT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{SNAPSHOT}: {len(data)} cases")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    write_snapshot()
