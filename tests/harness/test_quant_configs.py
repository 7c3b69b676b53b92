"""One config dataclass per method (issue 16): composition picks the method's schema, unknown keys name the method's
fields, and a run's identity holds only the chosen method's fields, so adding a method or a field renames no record."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from harness.assets import REPO_ROOT
from harness.compose import compose
from harness.config import (LEGACY_QUANT_METHODS, LEGACY_QUANT_VIEW, QUANT_CONFIGS, ConfigError, WeightQuantConfig,
                            quant_config, to_run_config)
from harness.records import identity, quant_identity, run_id


def _committed_records():
    """Every pipeline record committed under results/ (runs/ and the GPU result folders)."""
    for p in sorted((REPO_ROOT / "results").rglob("*.json")):
        rec = json.loads(p.read_text())
        if isinstance(rec, dict) and rec.get("record_version") and "run_id" in rec and "config" in rec:
            yield p, rec


def test_every_committed_record_keeps_its_run_id():
    recs = list(_committed_records())
    assert len(recs) >= 6 and any("gpu" in str(p) for p, _ in recs)
    for p, rec in recs:
        assert run_id(to_run_config(OmegaConf.create(rec["config"]))) == rec["run_id"], p


def test_each_option_selects_its_methods_config():
    for option in sorted(p.stem for p in (REPO_ROOT / "conf" / "quant").glob("*.yaml")):
        q = compose([f"quant={option}"]).quant
        assert type(q) is QUANT_CONFIGS.get(q.method), option
    assert not hasattr(compose(["quant=rtn_w4"]).quant, "n_grid")  # rtn carries no AWQ field


def test_legacy_methods_hash_exactly_the_old_flat_view():
    """fp16/rtn/awq at their defaults hash the flat dict every earlier record hashed; a new field of theirs must be a
    late field (else this fails, naming it)."""
    for m in LEGACY_QUANT_METHODS:
        q = QUANT_CONFIGS.get(m)()
        assert quant_identity(q) == {**LEGACY_QUANT_VIEW, "method": m}, m


def test_a_late_field_enters_the_identity_only_off_its_default():
    base = compose(["quant=rtn_w4"])
    over = compose(["quant=rtn_w4", "quant.layer_overrides=[{pattern:'*.down_proj',w_bit:8}]"])
    assert "layer_overrides" not in identity(base)["quant"]
    assert identity(over)["quant"]["layer_overrides"] == [{"pattern": "*.down_proj", "w_bit": 8, "group_size": None,
                                                          "skip": False}]
    assert run_id(over) != run_id(base)


@pytest.fixture
def toy_method(monkeypatch):
    """A method registered for the test only (the registry is restored afterwards)."""
    monkeypatch.setattr(QUANT_CONFIGS, "_items", dict(QUANT_CONFIGS._items))

    @quant_config("toy")
    @dataclass
    class ToyConfig(WeightQuantConfig):
        method: str = "toy"
        damp: float = 0.01
        late_knob: int = 3
        late_fields = WeightQuantConfig.late_fields + ("late_knob",)

    return ToyConfig


def test_a_new_method_hashes_only_its_own_fields_and_renames_nothing(toy_method):
    before = {o: run_id(compose([f"quant={o}"])) for o in ("fp16", "rtn_w4", "awq_w4")}
    q = toy_method()
    assert quant_identity(q) == {"method": "toy", "w_bit": 4, "group_size": 64, "zero_point": True,
                                 "group_fallback": "error", "damp": 0.01}
    assert quant_identity(dataclasses.replace(q, late_knob=4))["late_knob"] == 4
    assert {o: run_id(compose([f"quant={o}"])) for o in before} == before
    # a record of it reads back through its own schema
    rec = {"quant": {"method": "toy", "damp": 0.5}, "data": {"name": "x", "splits": ["milton"]},
           "model": {"name": "m", "path": "embedded:smollm2-135m-instruct"}, "eval": {"name": "e"}}
    assert to_run_config(OmegaConf.create(rec)).quant == toy_method(damp=0.5)


def test_registering_a_config_checks_its_method_name():
    with pytest.raises(TypeError, match="must default to 'other'"):
        @quant_config("other")
        @dataclass
        class Wrong(WeightQuantConfig):
            method: str = "wrong"


@pytest.mark.parametrize("overrides, message", [
    (["quant=rtn_w4", "+quant.n_grid=3"], r"^quant\.n_grid: 3 — not a field of quant \(method rtn\); known: method, "
                                          r"w_bit, group_size, zero_point, group_fallback, layer_overrides, format — n_grid is "
                                          r"a field of awq"),
    (["+quant.wbit=3"], r"^quant\.wbit: 3 — not a field of quant \(method fp16\); known: method — w_bit is a field "
                        r"of ([a-z_]+, )*rtn"),
    (["quant=rtn_w4", "quant.method=awq"], r"^quant\.method: awq — the quant option chose RTNConfig, not AWQConfig"),
])
def test_keys_are_checked_against_the_methods_own_fields(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        compose(overrides)
    assert "\n" not in str(e.value)


def test_a_sweep_over_the_shared_fields_composes_per_method():
    ids = {run_id(compose([f"quant={o}", f"quant.w_bit={b}", f"quant.group_size={g}"]))
           for o in ("rtn_w4", "awq_w4") for b in (3, 4) for g in (64, 128)}
    assert len(ids) == 8
