"""Hydra entry point: `python -m experiments.run [group=option ...] [field=value ...]`, `-m` for sweeps.

Each run writes results/runs/<run_id>.json; a run whose record exists is skipped, so a killed sweep resumes.
A sweep runs its configs one after another in this process, or through a launcher (conf/hydra/launcher/:
`hydra/launcher=local_parallel` on this machine, `hydra/launcher=slurm` on a cluster) that calls `main` in each job.
"""
from __future__ import annotations

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

import quant  # noqa: F401  (registers every method's config dataclass, which conf/quant/*.yaml select)
from harness.config import ConfigError, register_schemas, to_run_config
from harness.log import one_line_errors

register_schemas()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with one_line_errors(ConfigError):  # `error: <field>: ...`, exit 2; HARNESS_DEBUG=1 shows the traceback
        run_cfg = to_run_config(cfg)
    from experiments.pipeline import USER_ERRORS, run  # after the config is checked: torch and transformers take seconds
    # A relative results_dir is relative to where the command was run (hydra.runtime.cwd), also in a launcher's job
    # process and with hydra.job.chdir=true, so every job of a sweep writes into the same results/runs/.
    run_cfg.results_dir = to_absolute_path(run_cfg.results_dir)
    with one_line_errors(*USER_ERRORS):
        record = run(run_cfg)
    ppl = record["metrics"].get("perplexity", {})
    # the first split's PPL is returned for Hydra sweepers that optimise a value
    return next(iter(ppl.values()))["token_ppl"] if ppl else None


if __name__ == "__main__":
    import sys

    from experiments.sweep_check import default_method_field_error, method_fields_per_job
    from harness.compose import check_split_overrides, hydra_errors_explained

    with one_line_errors(ConfigError):
        check_split_overrides(sys.argv[1:])  # a path with spaces, unquoted: "quote it", not Hydra's grammar error
        err = default_method_field_error(sys.argv[1:])
        if err:
            raise err
        sys.argv[1:] = method_fields_per_job(sys.argv[1:])
        with hydra_errors_explained(sys.argv[1:]):  # an unknown field or option: the harness's one line
            main()
