"""Secrets stay out (issue 27, finding 9): an override that calls an OmegaConf resolver (`${oc.env:VAR}` reads the
environment; oc.decode and any other resolver are refused alike) fails in one line before any value is resolved, so
the variable's value is never printed nor recorded; a plain reference to another field still works."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import quant  # noqa: F401  (registers every method's config)
from harness.compose import compose
from harness.config import ConfigError, to_run_config

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-7f3a9c"


@pytest.mark.parametrize("override", ["model.name=${oc.env:QH_TEST_SECRET}", "model.path=/x/${oc.env:QH_TEST_SECRET}",
                                      "+quant.nope=${oc.env:QH_TEST_SECRET}",
                                      "quant=awq_w4 quant.calib.seqlen=${oc.decode:64}",
                                      "data.splits=[milton,'${oc.env:QH_TEST_SECRET,x}']"])
def test_a_resolver_in_an_override_is_refused_before_it_resolves(override, monkeypatch):
    monkeypatch.setenv("QH_TEST_SECRET", SECRET)
    with pytest.raises(ConfigError) as e:
        compose(override.split())
    msg = str(e.value)
    key = override.split()[-1].split("=", 1)[0].lstrip("+")
    assert msg.startswith(f"{key}") and "resolver" in msg and "\n" not in msg, msg
    assert SECRET not in msg


def test_a_plain_reference_to_another_field_still_resolves():
    assert compose(["model.reference_note=${model.name}"]).model.reference_note == compose([]).model.name


def test_a_record_config_with_a_resolver_is_refused(monkeypatch):
    """A record is read back by the report through to_run_config: a planted `${oc.env:...}` must not read this
    machine's environment."""
    from dataclasses import asdict

    monkeypatch.setenv("QH_TEST_SECRET", SECRET)
    cfg = asdict(compose([]))
    cfg["model"]["reference_note"] = "${oc.env:QH_TEST_SECRET}"
    with pytest.raises(ConfigError, match=r"^model\.reference_note: \$\{oc\.env:QH_TEST_SECRET\} — "):
        to_run_config(cfg)


def test_the_command_line_prints_one_line_without_the_value(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "HARNESS_DEBUG"}, "QH_TEST_SECRET": SECRET}
    p = subprocess.run([sys.executable, "-m", "experiments.run", "model.name=${oc.env:QH_TEST_SECRET}",
                        f"results_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and SECRET not in p.stderr + p.stdout, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: model.name: ${oc.env:QH_TEST_SECRET} — "), p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "runs").exists()
