"""Sweeps through Hydra launchers write the same records as a sweep in one process: submitit's local executor (the
code path of a SLURM sweep, without a cluster) and joblib (the `local_parallel` preset), each job in a process of
its own. Both sweeps are launched from a scratch folder with relative paths and `hydra.job.chdir=true`, so a job
whose working directory is elsewhere must still write into <launch dir>/results/runs and <launch dir>/.cache/hydra.
The SLURM preset is checked by rendering its sbatch script with submitit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.config import register_schemas
from harness.records import run_id
from tests.experiments.test_pipeline import CONF, SMALL, cfg_of

ROOT = Path(CONF).parent
CONFIGS = ("quant=fp16", "quant=rtn_w4")


def launch(launcher: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # two jobs at once: one torch thread each (what loky sets for joblib's workers by itself)
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "experiments.run", "-m", f"hydra/launcher={launcher}", "quant=fp16,rtn_w4", *SMALL,
            "results_dir=results", "hydra.job.chdir=true"]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def check_sweep(cwd: Path, out: subprocess.CompletedProcess) -> Path:
    """Both records, in <cwd>/results/runs, with the configs and metrics a run in this process would record."""
    assert out.returncode == 0, out.stderr[-3000:]
    runs = cwd / "results" / "runs"
    records = {p.stem: json.loads(p.read_text()) for p in runs.glob("*.json")}
    expected = {run_id(cfg_of(SMALL + [c])): c for c in CONFIGS}
    assert set(records) == set(expected), (sorted(records), expected)
    ppl = {}
    for rid, override in expected.items():
        rec = records[rid]
        cfg = rec["config"]
        assert rec["status"] == "complete" and rec["run_id"] == rid
        assert cfg["results_dir"] == str(cwd / "results")  # resolved against the launch dir, not the job's cwd
        assert cfg["eval"]["perplexity"]["seqlen"] == 64 and cfg["eval"]["perplexity"]["max_windows"] == 2
        assert cfg["quant"]["method"] == rec["metrics"]["quant"]["method"] == {"quant=fp16": "fp16", "quant=rtn_w4": "rtn"}[override]
        for split in ("milton", "shakespeare_heldout"):
            m = rec["metrics"]["perplexity"][split]
            assert m["windows"] == 2 and m["tokens_scored"] == 2 * 63 and 1 < m["token_ppl"] < 10_000
        ppl[override] = rec["metrics"]["perplexity"]["milton"]["token_ppl"]
    rtn = records[run_id(cfg_of(SMALL + ["quant=rtn_w4"]))]["metrics"]["quant"]
    assert rtn["w_bit"] == 4 and rtn["group_size"] == 64 and rtn["layers_quantized"] == 210
    assert ppl["quant=rtn_w4"] != ppl["quant=fp16"]
    # Hydra's per-job folders under the launch dir's .cache/hydra (the project's hydra.sweep.dir), one per config
    (sweep,) = (cwd / ".cache" / "hydra" / "multirun").iterdir()
    for num, override in enumerate(CONFIGS):
        assert override in (sweep / str(num) / ".hydra" / "overrides.yaml").read_text()
    return sweep


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    out = launch("submitit_local", tmp_path)
    sweep = check_sweep(tmp_path, out)
    # each config ran as a submitit job: its own process, log and pickled result under <sweep dir>/.submitit/<job id>/
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.err"))
    assert len(logs) == 2 and all("[run] wrote" in p.read_text() for p in logs)
    assert len(list((sweep / ".submitit").glob("*/*_0_result.pkl"))) == 2


@pytest.mark.slow
def test_joblib_sweep(tmp_path):
    out = launch("local_parallel", tmp_path)
    check_sweep(tmp_path, out)
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in out.stderr + out.stdout


def test_slurm_preset_renders_an_sbatch_script(tmp_path, monkeypatch):
    """The preset's fields are ones submitit accepts, and the job's working directory is pinned to the launch dir."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    register_schemas()
    with initialize_config_dir(config_dir=CONF, version_base="1.3", job_name="run"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                                       f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    params = launcher.params
    assert params["additional_parameters"]["chdir"] == os.getcwd()
    # what the plugin's launch() does before submitting (no cluster here: skip submitit's check for srun)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in (f"--chdir={os.getcwd()}", "--partition=gpu", "--time=120", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--mem=64GB", f"--output={tmp_path}/.submitit/%j/%j_0_log.out"):
        assert f"#SBATCH {line}\n" in script, script


@pytest.mark.parametrize("preset", ["local_parallel", "slurm"])
def test_presets_keep_the_basic_launcher_the_default(preset):
    register_schemas()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        default = compose(config_name="config", return_hydra_config=True)
        chosen = compose(config_name="config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    assert default.hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert chosen.hydra.launcher._target_.startswith("hydra_plugins.")
