"""Export a run's quantized weights as an AWQ "GEMM" checkpoint (quant/export/awq.py), which LMDeploy loads with
`model_format='awq'`, or with `--format compressed-tensors` in that layout (quant/export/compressed_tensors.py: vLLM,
llm-compressor, transformers; integer codes of 1-8 bits and the FP4 formats); the run's stages
(experiments/stages.py: prepare, load, calibrate, quantize), then the writer:

    python -m experiments.export quant=awq_w4 --out exports/smollm2-awq-w4-g64
    python -m experiments.export quant=rtn_w4 quant.group_size=32 --out /tmp/rtn --force
    python -m experiments.export quant=gptq_nvfp4 --format compressed-tensors --out exports/smollm2-gptq-nvfp4
    python -m experiments.export model.path=/data/llama-2-7b model.stream=true quant=awq_w4 --out exports/llama-awq

The overrides are those of `python -m experiments.run` (the same config tree; eval and kv settings do not enter the
checkpoint). Quantization goes through the quantized-weight cache (quant/quantized_cache.py), so exporting a config
that a run already quantized costs only loading and writing. A config the format cannot hold (not a 4-bit weight-only
method, no zero point, fp16, a group size that does not divide every quantized layer) fails in one line before the
model loads.

model.stream=true never holds the model in host memory (experiments/streamed.py, quant/streaming.py): each decoder
block is read from the checkpoint's safetensors (memory-mapped; for model.path=synthetic:<arch>, generated from the
seed) for its turn, and its codes are packed and written to a shard of the AWQ GEMM checkpoint at once
(quant/export/awq_shards.py: the same tensors as the in-memory export, in one shard per block). Refused before any
weight is read: methods that pass over a block more than once (SmoothQuant, AWQ->GPTQ, recipes),
quant.round_weights=false, a GGUF file, and any format but AWQ GEMM. Not through the quantized-weight cache.

--out must not exist yet (or be an empty directory); `--force` replaces only a directory this harness wrote
(harness.outputs: its manifest, harness_manifest.json, names the run_id and every file, and nothing else is there).
Any other existing path is refused in one line, and so is a place that cannot be written or lacks room for the
checkpoint, before the model loads. The checkpoint is written to a temp sibling and renamed into place at the end.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from harness.compose import compose
from harness.config import ConfigError, RunConfig
from harness.log import logger, one_line_errors

USAGE = ("usage: python -m experiments.export [group=option ...] [field=value ...] --out DIR [--force] "
         "[--format awq|compressed-tensors]")
WRITABLE = ("awq", "compressed-tensors")  # quant.export.FORMATS this command writes (SmoothQuant's: its own benchmark)
MANIFEST_FORMAT = {"awq": "awq-gemm", "compressed-tensors": "compressed-tensors"}  # the manifest's name for each

log = logger("export")


def parse_args(argv: list[str]) -> tuple[list[str], Path, bool, str]:
    overrides, out, force, fmt, it = [], None, False, "awq", iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            raise SystemExit(print(__doc__ + "\n" + USAGE) or 0)
        if a == "--out":
            out = next(it, None)
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a == "--force":
            force = True
        elif a == "--format" or a.startswith("--format="):
            fmt = a.split("=", 1)[1] if "=" in a else next(it, None)
            if fmt not in WRITABLE:
                raise ConfigError(f"--format: {fmt!r} — one of {', '.join(WRITABLE)} ({USAGE})")
        else:
            overrides.append(a)
    if not out:
        raise ConfigError(f"--out: the directory to write the checkpoint to is missing ({USAGE})")
    return overrides, Path(out), force, fmt


def compose_config(overrides: list[str]) -> RunConfig:
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

    return compose(overrides)


def _skeleton(prep, cfg: RunConfig):
    """The model's module tree with real shapes and no weights (meta device): what the format check needs."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(prep.hf_config, trust_remote_code=cfg.model.trust_remote_code)


def checkpoint_bytes(skeleton, quant) -> int:
    """About what the AWQ checkpoint of `skeleton` quantized by `quant` takes on disk: the packed codes, scales and
    zeros of every quantized Linear, every other parameter at fp16 (tied ones once)."""
    from harness.storage_bytes import FP16_BYTES, awq_linear_bytes, fp16_param_bytes
    from quant.surgery import plan_layers, quantizable_linears

    linears, specs = quantizable_linears(skeleton), plan_layers(skeleton, quant).quantized()
    packed = sum(awq_linear_bytes(linears[n].out_features, linears[n].in_features, s.w_bit, s.group_size)
                 for n, s in specs.items())
    return packed + fp16_param_bytes(skeleton) - sum(linears[n].weight.numel() for n in specs) * FP16_BYTES


def check_format(cfg: RunConfig, fmt: str = "awq", skeleton=None):
    """The writer of format `fmt` (quant.export.FORMATS) for cfg's codes; refuses, in one line and before any weight
    is read, a config the layout cannot hold (`skeleton`: also every quantized layer's shape) or a method that does
    not write it (quant.export.format_for)."""
    from quant.export import FORMATS, format_for

    layout = FORMATS.get(fmt)
    if layout.check is not None:
        layout.check(cfg.quant, skeleton)  # the layout's own refusals first: they name the field to change
    return format_for(cfg.quant, accepted=(fmt,))


def export(cfg: RunConfig, out: Path, force: bool = False, manifest: dict | None = None, fmt: str = "awq") -> Path:
    """Quantize cfg's model as configured (the pipeline's stages: experiments/stages.py, through the quantized-weight
    cache) and write its checkpoint to `out`: a fresh path, or (with `force`) a directory this harness wrote.
    `manifest`: more facts for its harness_manifest.json."""
    from experiments import stages
    from harness.models import describe_model
    from harness.outputs import check_output_dir, check_writable
    from harness.records import run_id

    check_format(cfg, fmt)  # from the config alone
    check_output_dir("--out", out, force)  # nothing of the user's is replaced; the place takes a write
    # the run's own checks of what quantizing needs, a streamed run's refusals among them (no weights read)
    prep = stages.prepare(cfg, evaluate=False, export_format=fmt)
    skeleton = _skeleton(prep, cfg)
    writer = check_format(cfg, fmt, skeleton)  # every quantized layer's shape, still no weights
    check_writable("--out", out, checkpoint_bytes(skeleton, cfg.quant))  # room for it, before any loading
    calibration = stages.calibrate(cfg, prep)  # calibration exactly as the run's
    rid, resolved = run_id(cfg), prep.resolved
    quant_meta = {"run_id": rid, "model": cfg.model.name, "model_sha": resolved.model_sha,
                  "model_origin": resolved.origin,
                  "reference_note": describe_model(cfg.model, resolved, prep.hf_config),
                  "method": cfg.quant.method, "quant": dataclasses.asdict(cfg.quant)}
    facts = {"run_id": rid, "format": MANIFEST_FORMAT[fmt], "model_sha": resolved.model_sha, **(manifest or {})}
    if cfg.model.stream:
        path = _export_streamed(cfg, prep, calibration, out, quant_meta, facts)
    else:
        model = stages.load(cfg, prep)
        outcome = stages.quantize(cfg, model, prep, calibration)
        path = writer.export(model, outcome.qtensors, out, tokenizer=prep.tokenizer, quant_meta=quant_meta,
                             manifest=facts)
    log(f"wrote the {MANIFEST_FORMAT[fmt]} checkpoint of run_id {rid} to {path}")
    return path


def _export_streamed(cfg: RunConfig, prep, calibration, out: Path, quant_meta: dict, manifest: dict) -> Path:
    """Each block's codes straight into the AWQ GEMM checkpoint (quant.export.awq_shards), the model never whole in
    host memory; quant_meta.json also says where the blocks came from and the host memory the quantization took."""
    from experiments import stages
    from quant.export.awq_shards import AWQShardWriter

    sink = AWQShardWriter(out)  # fills a temp sibling of `out`; finish renames it into place, abort removes it
    try:
        model, place = stages.open_streamed(cfg, prep, sink)
        outcome = stages.quantize(cfg, model, prep, calibration, place)
    except BaseException as e:
        sink.abort(e)
        raise
    summary = outcome.summary
    streamed = {"placement": summary.get("placement"), "host_memory": summary.get("host_memory")}
    return sink.finish(model, outcome.qtensors, tokenizer=prep.tokenizer, quant_meta={**quant_meta,
                       "streamed": streamed}, manifest=manifest)


def user_errors() -> tuple[type[BaseException], ...]:
    from experiments.stages import USER_ERRORS
    from quant.export.awq import AWQExportError
    from quant.export.compressed_tensors import CompressedTensorsExportError

    return (*USER_ERRORS, AWQExportError, CompressedTensorsExportError)


def main(argv: list[str] | None = None) -> int:
    """One line (`error: ...`, exit status 2) for whatever the user can fix; HARNESS_DEBUG=1 shows the traceback."""
    try:
        with one_line_errors(ConfigError):
            overrides, out, force, fmt = parse_args(sys.argv[1:] if argv is None else argv)
            cfg = compose_config(overrides)
        with one_line_errors(*user_errors()):
            export(cfg, out, force, fmt=fmt)
    except SystemExit as e:
        return e.code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
