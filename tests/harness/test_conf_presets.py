"""Every conf/ preset composes to the config it composed to when tests/harness/conf_snapshot.json was taken: the
resolved config (every field, interpolations resolved) and its run_id (harness.records.run_id). So conf/ can be
rewritten (presets inheriting from presets, defaults the dataclasses hold left out) without renaming a committed
record. The cases: every option of quant, kv, eval, data, model, backend, experiment, web; every job of every sweep.

A preset changed on purpose (a new result): write the snapshot again and commit it with the change,
    .venv/bin/python -m tests.harness.test_conf_presets --write
A preset added after the snapshot is not compared (it has no earlier config); a field added to a config dataclass
after it is not either (a late field keeps the run_id; harness.config.LATE_FIELDS).

And conf/ states each value once: a preset writes only what differs from its parent (its dataclass's defaults, or the
preset it inherits), no two quant presets write the same calibration block, and presets one or two fields apart are
written one as the other plus those fields (awq_w3 = awq_w4 + w_bit: 3)."""
from __future__ import annotations

import dataclasses
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
NOT_SNAPSHOTTED = ("model/*moe*",)


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


# ---- no restatement: a preset writes only what differs from its parent ---------------------------------------------
# (conf/quant: the schema's dataclass or the preset it inherits; one value lives in one file). `name` and `method` say
# which option a file is and stay written. Presets other work owns (NOT_SNAPSHOTTED) are left to it.
RESTATE_GROUPS = ("quant", "kv", "eval", "data", "model", "backend")
NAMING = ("name", "method")
# groups whose near-duplicate presets must inherit from each other; kv, data, model and backend options are two to
# four fields that each describe a different thing (int8 and fp8_e4m3 share bits: 8, and neither is the other plus a
# field), so only restating a default is refused there
INHERITING_GROUPS = ("quant", "eval")


def _raw(group: str, option: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}


def _parents(group: str, option: str) -> list[str]:
    """The presets of the same group this one inherits (its `defaults` entries that name a sibling option)."""
    return [d for d in _raw(group, option).get("defaults", []) if isinstance(d, str) and d != "_self_"
            and not d.startswith("/")]


def _ancestors(group: str, option: str) -> set[str]:
    out = set()
    for p in _parents(group, option):
        out |= {p} | _ancestors(group, p)
    return out


def _schema_defaults(group: str, option: str) -> dict:
    """What a preset with no parent preset starts from: its dataclass at its defaults."""
    from omegaconf import OmegaConf

    import quant  # noqa: F401
    from harness.config import QUANT_CONFIGS, RunConfig

    if group == "quant":
        schema = next(d["/quant_schema@_here_"] for d in _raw(group, option)["defaults"]
                      if isinstance(d, dict) and "/quant_schema@_here_" in d)
        node = OmegaConf.structured(QUANT_CONFIGS.get(schema))
    else:
        node = OmegaConf.structured(RunConfig)[group]
    return OmegaConf.to_container(node)


@lru_cache(maxsize=None)
def _composed(group: str, option: str) -> dict:
    return resolved("config", [f"{group}={option}"])["config"][group]


def _leaves(d: dict, path: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, path + (k,)))
        else:
            out[path + (k,)] = v
    return out


@pytest.mark.parametrize("group", RESTATE_GROUPS)
def test_no_preset_restates_what_its_parent_gives(group):
    restated = []
    for option in _options(group):
        raw = {k: v for k, v in _raw(group, option).items() if k != "defaults"}
        parents = _parents(group, option)
        base = _composed(group, parents[-1]) if parents else _schema_defaults(group, option)
        given = _leaves(base)
        for path, value in _leaves(raw).items():
            if path[0] in NAMING:
                continue
            if path in given and given[path] == value and type(given[path]) is type(value):
                where = f"conf/{group}/{parents[-1]}.yaml" if parents else "its dataclass's default"
                restated.append(f"conf/{group}/{option}.yaml: {'.'.join(path)}: {value!r} is already {where}")
    assert not restated, "\n".join(restated)


def test_no_two_quant_presets_write_the_same_calibration_block():
    """The calibration set is CalibConfig's (harness/config.py) unless a preset says otherwise, in one file that the
    others with the same set inherit (awq_w4_pileval)."""
    from harness.config import CalibConfig

    blocks = {o: _raw("quant", o)["calib"] for o in _options("quant") if "calib" in _raw("quant", o)}
    default = dataclasses.asdict(CalibConfig())
    assert not [o for o, b in blocks.items() if all(default.get(k) == v for k, v in b.items())], blocks
    same = [(a, b) for a in blocks for b in blocks if a < b and blocks[a] == blocks[b]]
    assert not same, f"the same calib block in conf/quant/{same[0][0]}.yaml and {same[0][1]}.yaml: inherit one"


@pytest.mark.parametrize("group", INHERITING_GROUPS)
def test_presets_one_or_two_fields_apart_inherit(group):
    """Two presets whose configs differ in at most two fields are one written as the other plus those fields: one
    inherits the other, or both inherit the preset they share, or one is its dataclass's defaults (then the other,
    written against the dataclass, is already only its difference)."""
    options = _options(group)
    apart = []
    for i, a in enumerate(options):
        for b in options[i + 1:]:
            la, lb = _leaves(_composed(group, a)), _leaves(_composed(group, b))
            if la.get(("method",)) != lb.get(("method",)):
                continue  # another method: another schema
            diff = [p for p in set(la) | set(lb) if p[0] not in NAMING and la.get(p, ...) != lb.get(p, ...)]
            if len(diff) > 2:
                continue
            anc_a, anc_b = _ancestors(group, a), _ancestors(group, b)
            bare = [o for o in (a, b) if not _parents(group, o)
                    and not [k for k in _raw(group, o) if k not in NAMING + ("defaults",)]]
            if a in anc_b or b in anc_a or anc_a & anc_b or bare:
                continue
            apart.append(f"conf/{group}/{a}.yaml and {b}.yaml differ only in "
                         f"{', '.join('.'.join(p) for p in sorted(diff))}: write one as the other plus that")
    assert not apart, "\n".join(apart)


def test_the_three_bit_presets_are_the_four_bit_ones_at_three_bits():
    """Every w3 quant preset (the demo runs each) is its w4 sibling plus `w_bit: 3` (gptq_w3_mse: gptq_w4_mse's)."""
    pairs = [(o, o.replace("_w3", "_w4")) for o in _options("quant") if "_w3" in o]
    assert len(pairs) >= 10
    for w3, w4 in pairs:
        assert _parents("quant", w3) == [w4]
        assert {k: v for k, v in _raw("quant", w3).items() if k != "defaults"} == {"w_bit": 3}


def test_the_awq_search_written_twice_is_awq_w4s():
    """AWQ->GPTQ's own schema cannot inherit awq_w4 (one schema per option), so its AWQ search is written out; it is
    awq_w4's, in the method preset and in the recipe's AWQ step alike."""
    awq = _composed("quant", "awq_w4")
    knobs = [k for k in _raw("quant", "awq_gptq_w4") if k not in NAMING + ("defaults",)]
    assert knobs and {k: _composed("quant", "awq_gptq_w4")[k] for k in knobs} == {k: awq[k] for k in knobs}
    step = _composed("quant", "recipe_awq_gptq_w4")["steps"][0]
    assert {k: v for k, v in step.items() if k != "method"} == {k: awq[k] for k in step if k != "method"}
