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
    assert _check(["+sweep=demo"]) == 29
    assert _check(["+sweep=demo_kv", "model=gemma3_270m"]) == 4
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


def test_a_weight_field_without_a_method_names_the_fix(tmp_path):
    """`-m quant.w_bit=3,4 quant.group_size=64,128` on the default quant=fp16: one line saying FP16 has no w_bit and
    how to choose a method, before Hydra composes (whose own message suggests `+quant.w_bit`)."""
    from experiments.sweep_check import default_method_field_error

    import quant  # noqa: F401  (registers the method configs)

    err = default_method_field_error(["-m", "quant.w_bit=3,4", "quant.group_size=64,128"])
    assert str(err).startswith("quant.w_bit: 3,4 — the default quant=fp16 has no such field (a field of ")
    assert "choose the method first, e.g. `-m quant=rtn_w4,awq_w4 quant.w_bit=3,4`" in str(err)
    assert default_method_field_error(["-m", "quant=rtn_w4", "quant.w_bit=3,4"]) is None
    assert default_method_field_error(["+experiment=awq_w4", "quant.w_bit=3"]) is None
    assert default_method_field_error(["quant.method=fp16", "eval=smoke"]) is None
    p = subprocess.run([sys.executable, "-m", "experiments.run", "-m", "quant.w_bit=3,4", f"results_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert p.stderr.startswith("error: quant.w_bit: 3,4 — the default quant=fp16 has no such field")


def test_a_method_field_set_once_under_a_swept_method_reaches_every_job(tmp_path):
    """`-m quant=gptq_w4,awq_gptq_w4 quant.calib.n_samples=8`: the field is passed as a one-value sweep, so each job
    (not the default fp16 master config) gets it; both jobs compose and validate with it."""
    from experiments.sweep_check import method_fields_per_job

    argv = ["-m", "quant=gptq_w4,awq_gptq_w4", "quant.calib.n_samples=8", "quant.w_bit=3,4", "eval=smoke"]
    out = method_fields_per_job(argv)
    assert out == ["-m", "quant=gptq_w4,awq_gptq_w4", "quant.calib.n_samples=choice(8)", "quant.w_bit=3,4", "eval=smoke"]
    assert method_fields_per_job(["quant=gptq_w4", "quant.calib.n_samples=8"]) == ["quant=gptq_w4", "quant.calib.n_samples=8"]
    assert _check(out[1:]) == 4
    p = subprocess.run([sys.executable, "-m", "experiments.run", "-m", "quant=gptq_w4,awq_gptq_w4",
                        "quant.calib.n_samples=0", f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    # composed per job (no "Key 'calib' not in 'QuantConfig'"), then refused by the method's own validation
    assert p.returncode == 2 and p.stderr.startswith("error: quant.calib.n_samples: must be >= 1"), p.stderr[-1500:]


def _demo_configs() -> list:
    """The RunConfig of every job `make demo` runs (the Makefile's DEMO_SWEEPS, in order)."""
    import shlex

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import open_dict

    from experiments.sweep_check import sweep_jobs
    from harness.config import to_run_config

    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("DEMO_SWEEPS :="))
    register_schemas()
    out = []
    for sweep in shlex.split(line.split(":=", 1)[1]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            gh = GlobalHydra.instance()
            master = gh.hydra.compose_config("config", sweep.split(), run_mode=RunMode.MULTIRUN)
            for job in sweep_jobs(master, gh.config_loader()):
                cfg = gh.config_loader().load_sweep_config(master, job)
                with open_dict(cfg):
                    del cfg["hydra"]
                out.append(to_run_config(cfg))
    return out


def test_the_demo_runs_every_method_on_both_models_without_throughput():
    """`make demo` (issue 28): every registered method at w4 g64 and w3 g64 on SmolLM2 and at w4 g64 on Gemma-3-270M
    (awq_gptq through its recipe, the same codes: conf/quant/recipe_awq_gptq_w4.yaml; SmoothQuant at W8A8, its own
    setting), each KV option on FP16 weights on both; its quality records measure no throughput (a record with
    throughput stands only on the machine that measured it: eval.code_version.stale_reason), its decode rows nothing
    else."""
    from quant import METHODS

    cfgs = _demo_configs()
    quality = [c for c in cfgs if c.eval.name == "full"]

    def methods(model: str, kv: str = "fp16", w_bit=None) -> set[str]:
        out = set()
        for c in quality:
            if c.model.name.startswith(model) and c.kv.name == kv and (
                    w_bit is None or (getattr(c.quant, "w_bit", None), getattr(c.quant, "group_size", None)) == (w_bit, 64)):
                out |= {c.quant.method} | {s["method"] for s in getattr(c.quant, "steps", None) or []}
        return out

    weight_only = set(METHODS.names()) - {"awq_gptq", "fp16", "smoothquant"}
    for model, bits in (("smollm2", (4, 3)), ("gemma-3", (4,))):
        for w_bit in bits:
            assert weight_only <= methods(model, w_bit=w_bit), (model, w_bit, weight_only - methods(model, w_bit=w_bit))
        assert {"fp16", "smoothquant"} <= methods(model)
        for kv in ("int8", "int4", "fp8_e4m3", "fp8_e5m2"):
            assert methods(model, kv) == {"fp16"}, (model, kv)
    assert quality and not any(c.eval.throughput.enabled for c in quality)
    decode = [c for c in cfgs if c.eval.name == "decode"]
    assert {c.quant.method for c in decode} >= {"fp16", "rtn"} and all(
        c.eval.throughput.enabled and not c.eval.perplexity.enabled for c in decode)
