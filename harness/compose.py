"""Compose a RunConfig from conf/ with Hydra's compose API (as tests and non-Hydra entry points do), so scripts that
need their own command-line flags still take the same `group=option field=value` overrides as experiments.run."""
from __future__ import annotations

from pathlib import Path

from harness.config import RunConfig, register_schemas, to_run_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg)
