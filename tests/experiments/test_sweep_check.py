"""Every job of a `-m` sweep is validated before the first one runs (experiments/sweep_check.py, a Hydra callback)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import ConfigError, register_schemas

ROOT = Path(__file__).resolve().parents[2]


def _check(overrides: list[str]) -> int:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from experiments.sweep_check import check_sweep

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        gh = GlobalHydra.instance()
        master = gh.hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
        return check_sweep(master, gh.config_loader())


def test_named_sweeps_and_grids_pass():
    assert _check(["+sweep=demo"]) == 5
    assert _check(["quant=rtn_w4,awq_w4", "quant.w_bit=3,4", "quant.group_size=32,64"]) == 8


@pytest.mark.parametrize("overrides,named", [
    (["quant=rtn_w4", "quant.w_bit=4,9,3"], "quant.w_bit: must be in 2..8, got 9 (sweep job `quant=rtn_w4 quant.w_bit=9`"),
    (["+quant.wbit=3,4"], "quant.wbit: 3 — "),
])
def test_a_bad_job_anywhere_in_the_sweep_is_named(overrides, named):
    with pytest.raises(ConfigError) as e:
        _check(overrides)
    assert str(e.value).startswith(named) and "none of the" in str(e.value)


def test_cli_sweep_fails_before_the_first_job(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.run", "-m", "quant=rtn_w4", "quant.w_bit=4,9,3",
                        f"results_dir={tmp_path / 'results'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        f"error: quant.w_bit: must be in 2..8, got 9 (sweep job `quant=rtn_w4 quant.w_bit=9 "
        f"results_dir={tmp_path / 'results'}`; none of the 3 jobs ran)"]
    assert not (tmp_path / "results").exists()
