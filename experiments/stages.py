"""The pipeline's stages, one function each, called by every front door: `experiments.run` (through
experiments.pipeline.run), `experiments.export`, the web page's models (app.local_models) and the quality benchmarks
(benchmarks.quality_*). Validation lives here once, so a bad config fails the same way, before any long work, whichever
door it came in by.

    prepare(cfg)                             -> Prepared     every check that can fail on bad input; no weights read
    load(cfg, prep)                          -> the model    (harness.models)
    open_streamed(cfg, prep, sink)           -> (model, placement)  load for model.stream=true: no block's weights
    calibrate(cfg, prep)                     -> Calibration  lazy samples: drawn only if the method asks
    quantize(cfg, model, prep, calibration)  -> QuantOutcome through the quantized-weight cache
    evaluate(cfg, model, prep, outcome)      -> Evaluation   metrics and timings, by backend.name (backends/)
    record(cfg, prep, model, metrics, ...)   -> the record   one JSON file under results_dir/runs/, atomically

and reusable_record(cfg): the record on disk that stands for `cfg` (same code, same weights), or None. `prepare(cfg,
evaluate=False)` checks only what quantizing needs (the export and the web page evaluate nothing). For a streamed run
(model.stream=true: experiments/streamed.py) prepare refuses what streaming cannot do, open_streamed takes load's
place, and quantize goes around the quantized-weight cache.

It lives in experiments/, the layer that wires quant/, eval/ and backends/ together from a config; the app and the
benchmarks sit above it and may import it (docs/layout.md, tests/test_layers.py)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from harness.assets import AssetError, check_cache_dir
from harness.config import ConfigError, RunConfig, user_error
from harness.data import (TEXT_SOURCES, DataUnavailableError, bos_token_id, calibration_identity, calibration_ids,
                          calibration_provider, eval_windows, load_text, text_sha256, tokenize_cached)
from harness.hub import require_hub
from harness.labels import config_label
from harness.limits import check_positions
from harness.log import logger
from harness import models  # its loaders are called through the module: one replaced there is replaced for every door
from harness.models import ModelUnavailableError, check_device, describe_model, load_config, model_summary
from harness.records import (CorruptRecordError, check_results_dir, load_record, make_record, provenance, record_path,
                             write_json_atomic)
from harness.registry import UnknownNameError
from harness.synthetic import refuse_quality_metrics
from backends import BACKENDS
from eval import EvalContext, ordered_names, preflight
from eval.code_version import stale_reason
from quant import METHODS, QuantContext, QuantOutcome, quantized_cache
from quant.onload import Placement
from quant.streaming import StreamingError, StreamingPlacement
from quant.surgery import check_group_sizes
from experiments import streamed

log = logger("run")
# what a user can fix (config, paths, inputs): every front door prints these as one line, without a traceback
USER_ERRORS = (ConfigError, UnknownNameError, ModelUnavailableError, DataUnavailableError, AssetError)

EMBEDDED_HINT = {"data.splits": "an embedded split (data=embedded)",
                 "quant.calib.dataset": "the embedded calibration text (quant.calib.dataset=shakespeare_calib)"}
CACHE_MIN_BYTES = 64 << 20  # tokenized text and reference outputs: tens of MB


# ----------------------------------------------------------------------------------------------------- prepare


@dataclass
class Prepared:
    """Everything cheap that a run needs, checked before the long work."""

    resolved: object
    tokenizer: object
    windows: dict  # split -> [n, seqlen] token ids (empty when nothing is evaluated)
    texts: dict
    split_sha: dict
    bos_token_id: int | None  # at the head of every window and calibration sample (data.add_bos)
    cache_writable: bool = True  # False: the preflight found the cache full or read-only; nothing large is cached
    # random weights (model.weights=random) read no text and need no tokenizer (tokenizer None): their calibration
    # samples and windows are random token ids below this vocabulary size (harness.synthetic.random_token_ids)
    vocab_size: int | None = None
    hf_config: object = None  # the model's transformers config, read without its weights


def prepare(cfg: RunConfig, evaluate: bool = True, export_format: str | None = None) -> Prepared:
    """Every check that can fail on bad input, in the order a user meets them, before any weight is read; then the
    tokenizer and the evaluation windows. `evaluate=False`: only what quantizing needs (no results_dir, backend,
    evaluation text or evaluator checks; the calibration's positions and memory are still checked). `export_format`:
    the checkpoint format the run's codes are written in (a streamed run writes AWQ GEMM only)."""
    if cfg.model.stream:  # what streaming cannot do, from the config alone (the method, evaluation, the format)
        streamed.refuse(cfg, enabled_evaluators(cfg) if evaluate else [], export_format)
    if evaluate:
        check_results_dir(cfg.results_dir)  # a record that cannot be written must fail now, not after the evaluation
    check_device(cfg.model)
    if evaluate:
        refuse_quality_metrics(cfg)  # synthetic (random) weights: throughput and memory only
        BACKENDS.get(cfg.backend.name).preflight(cfg)  # e.g. backend=lmdeploy on a machine without a GPU
    method = METHODS.get(cfg.quant.method)
    random_weights = cfg.model.weights == "random"  # no text, no tokenizer: random token ids (Prepared.vocab_size)
    for field, name in ([] if random_weights else text_sources(cfg, method.needs_calibration, evaluate)):
        if not TEXT_SOURCES.get(name).embedded:  # offline: fail now (about 2 s), not after datasets' retries
            require_hub(field, name, EMBEDDED_HINT[field])
    if evaluate and cfg.kv.bits != 16:
        from quant.kv_cache import check_kv_supported

        check_kv_supported(cfg.kv.bits, cfg.kv.format)
    if cfg.model.stream:  # a synthetic:<arch> path writes no checkpoint: its blocks come from the seed
        resolved, model_config = streamed.resolve(cfg)
    else:
        resolved = models.resolve_model(cfg.model)
        model_config = load_config(resolved, cfg.model)  # a .gguf file: its metadata (harness.models)
    cache_writable = check_cache_dir(cache_need_bytes(cfg, resolved), log)  # a warning at most: the cache is optional
    # every sequence length against the model's positions (only the calibration's when nothing is evaluated)
    check_positions(cfg, model_config, only=None if evaluate else ("quant.calib.seqlen",))
    check_group_sizes(cfg.quant, model_config.to_dict())
    checked = cfg if evaluate else without_evaluators(cfg)
    if random_weights:
        preflight(checked, model_config)
        return random_prepared(cfg, resolved, model_config, cache_writable, evaluate)
    tok = models.load_tokenizer(resolved, cfg.model)
    try:
        bos = bos_token_id(tok, cfg.data.add_bos)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if method.needs_calibration:
        calibration_ids(cfg.quant.calib, tok)  # quant.calib.seqlen against the calibration text, before loading
    preflight(checked, model_config)  # the evaluators' and the calibration's memory
    windows, shas, texts = {}, {}, {}
    for split in cfg.data.splits if evaluate else []:
        text = texts[split] = load_text(split)
        shas[split] = text_sha256(text)[:16]
        ids = tokenize_cached(tok, text)
        windows[split] = eval_windows(ids, cfg.eval.perplexity.seqlen, cfg.eval.perplexity.max_windows, split, bos)
    return Prepared(resolved, tok, windows, texts, shas, bos, cache_writable, hf_config=model_config)


def random_prepared(cfg: RunConfig, resolved, model_config, cache_writable: bool, evaluate: bool = True) -> Prepared:
    """Random weights (quantization, timings and memory only): no tokenizer and no text; each split's windows are
    seeded random token ids below the model's vocabulary size, and so are the calibration samples
    (calibrate), whether or not the checkpoint carries a tokenizer."""
    from harness.synthetic import RANDOM_IDS, random_token_ids

    vocab = model_config.get_text_config().vocab_size
    n, seqlen = cfg.eval.perplexity.max_windows or 1, cfg.eval.perplexity.seqlen
    splits = cfg.data.splits if evaluate else []
    windows = {split: random_token_ids(n, seqlen, vocab, cfg.seed + i) for i, split in enumerate(splits)}
    return Prepared(resolved, None, windows, {}, {split: RANDOM_IDS for split in windows}, None, cache_writable, vocab,
                    model_config)


def text_sources(cfg: RunConfig, needs_calibration: bool, evaluate: bool = True) -> list[tuple[str, str]]:
    """(field, source name) of every text the run reads."""
    return [("data.splits", s) for s in (cfg.data.splits if evaluate else [])] + (
        [("quant.calib.dataset", cfg.quant.calib.dataset)] if needs_calibration else [])


def without_evaluators(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` with every evaluator switched off: what quantizing alone is checked against."""
    out = copy.deepcopy(cfg)
    for name in ordered_names():
        section = getattr(out.eval, name, None)
        if hasattr(section, "enabled"):
            section.enabled = False
    return out


def cache_need_bytes(cfg: RunConfig, resolved) -> int:
    """What a run may write into the cache: a quantized-weight entry (codes, scales and the unquantized tensors:
    at most the checkpoint's own bytes) for a quantized run, plus tokenized text and reference outputs. A streamed run
    writes no quantized-weight entry."""
    if cfg.quant.method == "fp16" or cfg.model.stream:
        return CACHE_MIN_BYTES
    d = Path(resolved.directory)
    files = [d / resolved.gguf_file] if resolved.gguf_file else [*d.glob("*.safetensors"), *d.glob("*.bin")]
    return CACHE_MIN_BYTES + sum(f.stat().st_size for f in files if f.is_file())


# ----------------------------------------------------------------------------------------------- load, calibrate


def load(cfg: RunConfig, prep: Prepared, placement: Placement = Placement()):
    """The model's weights in cfg.model.dtype; with offloading they rest in host memory (quant/onload.py)."""
    if cfg.model.stream:
        raise StreamingError("model.stream=true: the model is never loaded whole; this command cannot stream it "
                             "(experiments.run with eval=none, and experiments.export, do): use model.stream=false")
    onload = f" into host memory; blocks onload to {placement.compute} in turn" if placement.offload else ""
    log(f"loading {cfg.model.name} ({prep.resolved.origin}){onload}")
    return models.load_model(prep.resolved, cfg.model, device="cpu" if placement.offload else None)


@dataclass
class Calibration:
    """The calibration samples, drawn on the first `get()` (a method that calibrates nothing never pays for them);
    `state["samples"]` holds them once drawn. `identity`: what they are made of (the text's sha256, tokenizer, BOS,
    sampling), part of the quantized-weight cache key; None for a method that does not calibrate."""

    get: Callable[[], torch.Tensor]
    state: dict
    identity: dict | None


def calibrate(cfg: RunConfig, prep: Prepared) -> Calibration:
    """The run's calibration samples: drawn from the calibration text, or random token ids for random weights."""
    calib = getattr(cfg.quant, "calib", None)
    needs = METHODS.get(cfg.quant.method).needs_calibration
    if prep.tokenizer is None:
        from harness.synthetic import random_calibration, random_calibration_identity

        get, state = random_calibration(calib, prep.vocab_size)
        return Calibration(get, state, random_calibration_identity(calib, prep.vocab_size) if needs else None)
    get, state = calibration_provider(calib, prep.tokenizer, prep.bos_token_id)
    return Calibration(get, state, calibration_identity(calib, prep.tokenizer, prep.bos_token_id) if needs else None)


def open_streamed(cfg: RunConfig, prep: Prepared, sink=None) -> tuple[torch.nn.Module, StreamingPlacement]:
    """Load, for a streamed run: the model without its blocks' weights (read for their turn by the placement), the
    parts outside the blocks in host memory; `sink` takes each finished block's codes (None: host memory)."""
    log(f"opening {cfg.model.name} ({prep.resolved.origin}) streamed: blocks read one at a time onto "
        f"{cfg.model.device}")
    return streamed.open_model(cfg, prep, sink)


# ------------------------------------------------------------------------------------------------------ quantize


def quantize(cfg: RunConfig, model, prep: Prepared, calibration: Calibration,
             placement: Placement = Placement()) -> QuantOutcome:
    """Quantize in place, through the content-addressed cache (methods other than fp16); a streamed run
    (`placement` from open_streamed) straight, block by block."""
    if cfg.quant.method != "fp16":
        log(f"quantizing: {config_label(cfg.quant)}{' (streamed)' if cfg.model.stream else ''}")
    if cfg.model.stream:
        return streamed.quantize(cfg, model, calibration, placement)
    return quantized_cache.quantize_cached(model, cfg.quant, prep.resolved.model_sha, cfg.model.dtype,
                                           QuantContext(calibration=calibration.get, progress=cfg.progress,
                                                        placement=placement), calibration.state,
                                           force=cfg.force, log=log, calib_id=calibration.identity,
                                           write_cache=prep.cache_writable)


def weights_key(cfg: RunConfig, prep: Prepared, calibration: Calibration,
                placement: Placement = Placement()) -> str | None:
    """The quantized-weight cache key that quantize() reads and writes for `cfg` (None for fp16: nothing cached)."""
    if cfg.quant.method == "fp16":
        return None
    return quantized_cache.quant_key(prep.resolved.model_sha, cfg.quant, cfg.model.dtype, calibration.identity,
                                     device=placement.compute.type)


# ------------------------------------------------------------------------------------------------------ evaluate


@dataclass
class Evaluation:
    """What the evaluators measured (the record's `metrics`: the quantization's summary first, then each enabled
    evaluator's result in the registry's order, then the KV cache's tally) and the seconds each took."""

    metrics: dict
    timings_s: dict


def enabled_evaluators(cfg: RunConfig) -> list[str]:
    return [name for name in ordered_names() if getattr(getattr(cfg.eval, name, None), "enabled", False)]


def any_evaluator_enabled(cfg: RunConfig) -> bool:
    return bool(enabled_evaluators(cfg))


class KVCaches:
    """Makes the run's quantized KV caches (one per forward or generation) and counts what they saw: rows (token, KV
    head) written with a constant value, which LMDeploy's kernels store with scale 0 and dequantize to NaN. The record
    says how many (metrics.kv_cache), so a NaN-poisoned head is never a silent difference."""

    def __init__(self, config, bits: int, fmt: str = "int"):
        self.config, self.bits, self.fmt = config, bits, fmt
        self.made, self.tally = 0, [0]

    def __call__(self):
        from quant.kv_cache import QuantizedKVCache

        self.made += 1
        return QuantizedKVCache(self.config, bits=self.bits, tally=self.tally, fmt=self.fmt)

    def summary(self) -> dict:
        fmt = {} if self.fmt == "int" else {"format": self.fmt}  # as before kv.format existed, for int
        return {"bits": self.bits, **fmt, "caches": self.made, "constant_heads": int(self.tally[0])}


def kv_cache_factory(cfg: RunConfig, model) -> KVCaches | None:
    return None if cfg.kv.bits == 16 else KVCaches(model.config, cfg.kv.bits, cfg.kv.format)


def evaluate(cfg: RunConfig, model, prep: Prepared, outcome: QuantOutcome,
             placement: Placement = Placement()) -> Evaluation:
    """Every enabled evaluator on the quantized model, through the backend cfg.backend.name names."""
    if placement.offload and any_evaluator_enabled(cfg):
        model.to(placement.compute)  # evaluation runs the whole model where the config says
    metrics: dict = {"quant": outcome.summary}
    ctx = EvalContext(cfg=cfg, model=model, tokenizer=prep.tokenizer, windows=prep.windows, texts=prep.texts,
                      split_sha=prep.split_sha, model_sha=prep.resolved.model_sha, qtensors=outcome.qtensors,
                      kv_cache_factory=kv_cache_factory(cfg, model),
                      load_reference_model=lambda: models.load_model(prep.resolved, cfg.model),
                      progress=cfg.progress, results=metrics)
    log(f"evaluating ({cfg.backend.name})")
    timings = BACKENDS.get(cfg.backend.name).evaluate(ctx, log)
    if ctx.kv_cache_factory is not None:
        metrics["kv_cache"] = ctx.kv_cache_factory.summary()
        if metrics["kv_cache"]["constant_heads"]:
            log(f"KV cache: {metrics['kv_cache']['constant_heads']} constant (token, head) rows dequantized to NaN, "
                f"as LMDeploy's kernels do")
    return Evaluation(metrics, timings)


# -------------------------------------------------------------------------------------------------------- record


def record(cfg: RunConfig, prep: Prepared, model, metrics: dict, timings_s: dict, code_version: dict) -> dict:
    """The run's one record (resolved config, metrics, provenance, timings, code version), written atomically to
    results_dir/runs/<run_id>.json."""
    prov = provenance({
        "model_sha": prep.resolved.model_sha,
        "model_origin": prep.resolved.origin,
        "reference_note": describe_model(cfg.model, prep.resolved, model.config),
        "model": model_summary(model),
        "data_sha256": prep.split_sha,
        "bos_token_id": prep.bos_token_id,  # at the head of every window and calibration sample (None: no BOS)
        "seed": cfg.seed,
    })
    rec = make_record(cfg, metrics, prov, timings_s, code_version=code_version)
    path = record_path(cfg)
    write_record(path, rec, cfg)
    log(f"wrote {path} (run_id {rec['run_id']}, {timings_s['total']:.1f} s)")
    return rec


def write_record(path: Path, rec: dict, cfg: RunConfig) -> None:
    """The record, atomically; a disk that filled up during the run is a one-line error naming the path."""
    try:
        write_json_atomic(path, rec)
    except OSError as e:
        raise user_error("results_dir", cfg.results_dir, f"writing {path} failed ({type(e).__name__}: "
                         f"{e.strerror or e})", "free space or fix permissions, then run the same command again "
                         "(quantized weights are cached)") from None


def existing_record(path: Path) -> dict | None:
    """The record at `path`, or None when it is corrupt (then it counts as missing: the run is recomputed)."""
    try:
        return load_record(path)
    except CorruptRecordError as e:
        log(f"{e}; treating it as missing and recomputing the run")
        return None


def reusable_record(cfg: RunConfig) -> dict | None:
    """The complete record under cfg's run_id that still stands for it (eval.code_version.stale_reason: the same code
    and weights), or None (force=true: always None); says which, and why an existing one is not reused."""
    path = record_path(cfg)
    if cfg.force or not path.exists():
        return None
    rec = existing_record(path)
    if rec is None or rec.get("status") != "complete":
        return None
    why = stale_reason(rec, cfg)
    if why is None:
        log(f"record {path} exists (run_id {rec['run_id']}); reusing it (force=true recomputes)")
        return rec
    log(f"record {path} {why}; recomputing")
    return None


def record_exists(cfg: RunConfig) -> bool:
    p = Path(record_path(cfg))
    rec = existing_record(p) if p.exists() else None
    return rec is not None and rec.get("status") == "complete" and stale_reason(rec, cfg) is None

