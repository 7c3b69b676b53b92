"""Every job of a `-m` sweep is checked before the first one runs (a Hydra callback, conf/config.yaml): a bad value
in the third job (`quant.w_bit=4,9,3`) fails at once, naming the job, instead of after the first jobs' work.

Only the basic sweeper's grids are expanded here (the sweeper every launcher preset uses); another sweeper's jobs are
checked one by one as they start, as before."""
from __future__ import annotations

import dataclasses
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from harness.config import ConfigError, to_run_config
from harness.log import one_line_errors

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(config: DictConfig, loader) -> list[list[str]]:
    """The overrides of each job, as the basic sweeper expands them (sweeper params first, then the command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_sweep(config: DictConfig, loader) -> int:
    """Compose and validate every job; raise ConfigError naming the first bad one. Returns the number of jobs."""
    from harness.compose import composition_error, is_hydra_error

    jobs = sweep_jobs(config, loader)
    for job in jobs:
        try:
            cfg = loader.load_sweep_config(config, job)
            with open_dict(cfg):
                del cfg["hydra"]
            to_run_config(cfg)
        except Exception as e:
            err = composition_error(e, [o for o in job if not o.startswith("hydra")]) if is_hydra_error(e) else e
            if not isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{err} (sweep job `{' '.join(job)}`; none of the {len(jobs)} jobs ran)") from None
    return len(jobs)


class CheckSweep(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return
        with one_line_errors(ConfigError):
            check_sweep(config, GlobalHydra.instance().config_loader())


def default_method_field_error(overrides: list[str]) -> ConfigError | None:
    """`quant.w_bit=3,4` with no method chosen: the default quant (fp16) has no such field, and Hydra's own message
    ("Key 'w_bit' not in 'QuantConfig' ... use +quant.w_bit=3") points the wrong way. Checked on the command line
    before Hydra composes anything; only when nothing else (quant=, an experiment or sweep preset) picks the method."""
    from harness.config import QUANT_CONFIGS, user_error

    plain = [o for o in overrides if not o.startswith("-")]
    if any(o.split("=", 1)[0].lstrip("+~") in ("quant", "experiment", "sweep") for o in plain):
        return None
    fields = {f.name for f in dataclasses.fields(QUANT_CONFIGS.get("fp16"))}
    for o in plain:
        key, eq, value = o.partition("=")
        if eq and key.startswith("quant.") and not key.startswith("quant.method"):
            name = key.split(".")[1]
            if name in fields:
                continue
            owners = [m for m in QUANT_CONFIGS.names() if name in {f.name for f in dataclasses.fields(QUANT_CONFIGS.get(m))}]
            example = "quant=rtn_w4,awq_w4" if "w_bit" in name or "group" in name else f"quant={owners[0] if owners else 'awq'}"
            return user_error(key, value, "the default quant=fp16 has no such field" +
                              (f" (a field of {', '.join(owners)})" if owners else ""),
                              f"choose the method first, e.g. `-m {example} {key}={value}`")
    return None


def method_fields_per_job(argv: list[str]) -> list[str]:
    """`-m quant=gptq_w4,awq_gptq_w4 quant.calib.n_samples=8`: Hydra composes a sweep's master config without its
    sweep overrides, i.e. with the default quant=fp16, which has no `calib`, and stops ("Key 'calib' not in
    'QuantConfig'") before any job. With a swept `quant=` group, every plain `quant.<field>=<value>` is therefore
    passed as a one-value sweep (`choice(<value>)`), which Hydra applies in each job, where the method is chosen."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return argv
    swept = any(a.split("=", 1)[0].lstrip("+~") == "quant" and "," in a.split("=", 1)[1] for a in argv if "=" in a)
    if not swept:
        return argv
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        plain = (eq and key.startswith("quant.") and "," not in value and "(" not in value
                 and not value.startswith(("[", "{", "'", '"')))
        out.append(f"{key}=choice({value})" if plain else a)
    return out
