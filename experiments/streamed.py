"""The stages of a streamed run (model.stream=true): the model is never whole in host memory. Its decoder blocks are
read one at a time from the checkpoint's safetensors (memory-mapped), or generated from the seed for a synthetic:<arch>
path (no file at all), and released after their turn (quant/streaming.py); the codes go to host memory
(`experiments.run ... eval=none`: the record holds the quantization's summary, placement and host memory) or straight
to an AWQ GEMM checkpoint written block by block (`experiments.export ... model.stream=true`,
quant/export/awq_shards.py). experiments/stages.py calls these in its own stages:

    refuse(cfg, evaluates, export_format)        every refusal, from the config alone (stages.prepare, first)
    resolve(cfg)                                 -> (ResolvedModel, transformers config): no weights, no file written
    open_model(cfg, prep, sink)                  -> (skeleton, StreamingPlacement): the load stage
    quantize(cfg, model, prep, calibration, pl)  -> QuantOutcome: the method itself, not through the quantized-weight
                                                    cache (its entries are whole models; a streamed run holds none)
"""
from __future__ import annotations

from pathlib import Path

from harness import synthetic
from harness.config import RunConfig, user_error
from harness.models import DTYPES, ResolvedModel, load_config, resolve_model
from quant import METHODS, QuantContext, QuantOutcome
from quant.streaming import StreamingError, StreamingPlacement, check_streamable, open_streamed, synthetic_config

FORMATS = ("awq",)  # what a streamed export writes block by block (quant.export.awq_shards.AWQShardWriter)
WHOLE = "or load the model whole (model.stream=false)"


def refuse(cfg: RunConfig, evaluates: list[str], export_format: str | None = None) -> None:
    """Before any weight is read: what streaming cannot do, in one line (quant.streaming.check_streamable for the
    method, round_weights and `evaluates`, the evaluators enabled; here fp16, the export's format and GGUF files)."""
    if cfg.quant.method == "fp16":
        raise user_error("model.stream", "true", "quant.method=fp16 quantizes nothing, and a streamed model is never "
                         "whole to evaluate", f"stream a quantization (e.g. quant=awq_w4 eval=none), {WHOLE}")
    if export_format is not None and export_format not in FORMATS:
        raise user_error("--format", export_format, "a streamed export writes AWQ GEMM only, block by block",
                         f"use --format awq, {WHOLE}")
    check_streamable(METHODS.get(cfg.quant.method), cfg.quant, evaluates=evaluates)
    if cfg.model.path.endswith(".gguf") or cfg.model.gguf_file:
        raise user_error("model.stream", "true", "a GGUF file is dequantized whole by transformers; streaming reads "
                         "safetensors block by block", f"convert the checkpoint to safetensors, {WHOLE}")


def _arch(cfg: RunConfig):
    """The synthetic architecture model.path names (synthetic:<arch>), or None for a checkpoint."""
    name = synthetic.arch_name(cfg.model.path)
    if name is None:
        return None
    try:
        return synthetic.load_arch(name)
    except KeyError as e:
        raise user_error("model.path", cfg.model.path, e.args[0], "name one of those") from None


def resolve(cfg: RunConfig) -> tuple[ResolvedModel, object]:
    """The model's identity and transformers config, no weights read. A synthetic:<arch> path writes no checkpoint:
    its blocks are generated from the seed (quant.streaming.SyntheticBlocks), the weights of the checkpoint
    harness.synthetic would write (the same model_sha)."""
    arch = _arch(cfg)
    if arch is None:
        resolved = resolve_model(cfg.model)
        return resolved, load_config(resolved, cfg.model)
    if cfg.model.weights != "random":
        raise user_error("model.weights", cfg.model.weights, f"{cfg.model.path} is random weights at a real shape",
                         "use model.weights=random (a synthetic model option sets it)")
    name = synthetic.checkpoint_dirname(arch, synthetic.WeightFormat(), cfg.seed)
    return (ResolvedModel("", None, f"synthetic:{name}", f"SYNTHETIC random weights at the shape of {arch.name}, "
                          f"generated block by block from seed {cfg.seed} (no file)"), synthetic_config(arch))


def open_model(cfg: RunConfig, prep, sink=None) -> tuple[object, StreamingPlacement]:
    """The load stage: the model built without weights, the parts outside the decoder blocks loaded, and the placement
    that reads each block for its turn on model.device (`sink`: where finished blocks' codes go; None: host memory)."""
    arch = _arch(cfg)
    where = {"synthetic_arch": arch, "seed": cfg.seed} if arch else {"model_dir": Path(prep.resolved.directory)}
    return open_streamed(device=cfg.model.device, dtype=DTYPES[cfg.model.dtype], sink=sink, **where)


def quantize(cfg: RunConfig, model, calibration, placement: StreamingPlacement) -> QuantOutcome:
    """The method over the streamed blocks, once, in order (no block checkpoints: check_streamable refuses them)."""
    if not isinstance(placement, StreamingPlacement):
        raise StreamingError("model.stream: the model was not opened streamed (experiments.streamed.open_model)")
    ctx = QuantContext(calibration=calibration.get, progress=cfg.progress, placement=placement)
    return METHODS.get(cfg.quant.method)(model, cfg.quant, ctx)
