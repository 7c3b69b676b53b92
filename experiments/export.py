"""Export a run's quantized weights as an AWQ "GEMM" checkpoint (quant/export/awq.py), which LMDeploy loads with
`model_format='awq'`:

    python -m experiments.export quant=awq_w4 --out exports/smollm2-awq-w4-g64
    python -m experiments.export quant=rtn_w4 quant.group_size=32 --out /tmp/rtn

The overrides are those of `python -m experiments.run` (the same config tree; eval and kv settings do not enter the
checkpoint). Quantization goes through the quantized-weight cache (quant/quantized_cache.py), so exporting a config
that a run already quantized costs only loading and writing. A config the format cannot hold (not 4-bit, no zero
point, fp16, a group size that does not divide every quantized layer) fails in one line before the model loads.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from harness.config import ConfigError, RunConfig, register_schemas, to_run_config
from harness.log import logger

CONF = Path(__file__).resolve().parents[1] / "conf"
USAGE = "usage: python -m experiments.export [group=option ...] [field=value ...] --out DIR"

log = logger("export")


def parse_args(argv: list[str]) -> tuple[list[str], Path]:
    overrides, out, it = [], None, iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            raise SystemExit(print(__doc__ + "\n" + USAGE) or 0)
        if a == "--out":
            out = next(it, None)
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            overrides.append(a)
    if not out:
        raise ConfigError(f"--out: the directory to write the checkpoint to is missing ({USAGE})")
    return overrides, Path(out)


def compose_config(overrides: list[str]) -> RunConfig:
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=overrides))


def _skeleton(resolved, cfg: RunConfig):
    """The model's module tree with real shapes and no weights (meta device): what the format check needs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolved.directory, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def export(cfg: RunConfig, out: Path) -> Path:
    """Quantize cfg's model as configured (through the cache) and write its AWQ GEMM checkpoint to `out`."""
    from experiments.pipeline import Prepared, quantize
    from harness.data import TEXT_SOURCES, bos_token_id, calibration_provider
    from harness.models import load_model, load_tokenizer, resolve_model
    from harness.records import run_id
    from quant import METHODS
    from quant.export.awq import check_awq_config, export_awq

    check_awq_config(cfg.quant)  # from the config alone
    if METHODS.get(cfg.quant.method).needs_calibration:
        TEXT_SOURCES.get(cfg.quant.calib.dataset)  # an unknown source or a bad file fails here
    resolved = resolve_model(cfg.model)
    check_awq_config(cfg.quant, _skeleton(resolved, cfg))  # every quantized layer's shape, still no weights
    tokenizer = load_tokenizer(resolved, cfg.model)
    log(f"loading {cfg.model.name} ({resolved.origin})")
    model = load_model(resolved, cfg.model)
    bos = bos_token_id(tokenizer, cfg.data.add_bos)  # calibration samples exactly as the run makes them
    calib, calib_state = calibration_provider(getattr(cfg.quant, "calib", None), tokenizer, bos)
    outcome = quantize(cfg, model, Prepared(resolved, tokenizer, {}, {}, {}, bos), calib, calib_state)
    path = export_awq(model, outcome.qtensors, out, tokenizer=tokenizer, quant_meta={
        "run_id": run_id(cfg), "model": cfg.model.name, "model_sha": resolved.model_sha,
        "model_origin": resolved.origin, "reference_note": cfg.model.reference_note,
        "method": cfg.quant.method, "quant": dataclasses.asdict(cfg.quant)})
    log(f"wrote the AWQ GEMM checkpoint of run_id {run_id(cfg)} to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    from quant.export.awq import AWQExportError

    try:
        overrides, out = parse_args(sys.argv[1:] if argv is None else argv)
        export(compose_config(overrides), out)
    except (ConfigError, AWQExportError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's errors for an unknown group or field: one line, as experiments.run gives
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"config error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
