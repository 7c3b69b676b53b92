"""Compose a RunConfig from conf/ with Hydra's compose API (as tests and non-Hydra entry points do), so scripts that
need their own command-line flags still take the same `group=option field=value` overrides as experiments.run.
Each quant option selects its method's config, registered when the method's package is imported: a caller imports
`quant` (it registers every method) before composing; a quant option whose config is not registered fails naming it."""
from __future__ import annotations

from pathlib import Path

from harness.config import QUANT_CONFIGS, ConfigError, RunConfig, register_schemas, to_run_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import MissingConfigException
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        except MissingConfigException as e:
            if "quant_schema" not in str(e):
                raise
            raise ConfigError(f"quant: {str(e).splitlines()[0]} — only {', '.join(QUANT_CONFIGS.names())} are "
                              f"registered — import quant (it registers every method's config) before composing") from None
    return to_run_config(cfg)
