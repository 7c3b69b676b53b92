"""load -> calibrate -> quantize -> evaluate (by backend.name: backends/) -> record, from one RunConfig.

`run(cfg)` is the Python API (the Hydra entry point `experiments.run` only builds the config and calls it):

    from harness.config import to_run_config
    from omegaconf import OmegaConf
    record = run(to_run_config(OmegaConf.create({...})))

Every check that can fail on bad input runs before the model is loaded or any long loop starts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.assets import AssetError, check_cache_dir
from harness.config import ConfigError, RunConfig, user_error
from harness.data import (TEXT_SOURCES, DataUnavailableError, bos_token_id, calibration_identity, calibration_ids,
                          calibration_provider, eval_windows, load_text, text_sha256, tokenize_cached)
from harness.labels import config_label
from harness.limits import check_positions
from harness.hub import require_hub
from harness.log import logger
from harness.models import (ModelUnavailableError, check_device, describe_model, load_config, load_model, load_tokenizer,
                            model_summary, resolve_model)
from harness.records import (CorruptRecordError, check_results_dir, load_record, make_record, provenance, record_path,
                             run_id, write_json_atomic)
from harness.registry import UnknownNameError
from harness.synthetic import refuse_quality_metrics, without_quality_metrics
from backends import BACKENDS
from eval import EvalContext, ordered_names, preflight
from eval.code_version import code_version_of, stale_reason  # noqa: F401  (shared with the report)
from quant import METHODS, QuantContext, QuantOutcome, quantized_cache
from quant.onload import Placement, peak_memory
from quant.surgery import check_group_sizes


log = logger("run")
# what a user can fix (config, paths, inputs): the command line prints these as one line, without a traceback
USER_ERRORS = (ConfigError, UnknownNameError, ModelUnavailableError, DataUnavailableError, AssetError)


@dataclass
class Prepared:
    """Everything cheap that a run needs, checked before the long work."""

    resolved: object
    tokenizer: object
    windows: dict  # split -> [n, seqlen] token ids
    texts: dict
    split_sha: dict
    bos_token_id: int | None  # at the head of every window and calibration sample (data.add_bos)
    cache_writable: bool = True  # False: the preflight found the cache full or read-only; nothing large is cached
    # random weights (model.weights=random) read no text and need no tokenizer (tokenizer None): their calibration
    # samples and windows are random token ids below this vocabulary size (harness.synthetic.random_token_ids)
    vocab_size: int | None = None


def prepare(cfg: RunConfig) -> Prepared:
    check_results_dir(cfg.results_dir)  # a record that cannot be written must fail now, not after the evaluation
    check_device(cfg.model)
    refuse_quality_metrics(cfg)  # synthetic (random) weights: throughput and memory only
    BACKENDS.get(cfg.backend.name).preflight(cfg)  # e.g. backend=lmdeploy on a machine without a GPU
    method = METHODS.get(cfg.quant.method)
    random_weights = cfg.model.weights == "random"  # no text, no tokenizer: random token ids (Prepared.vocab_size)
    for field, name in ([] if random_weights else text_sources(cfg, method.needs_calibration)):
        if not TEXT_SOURCES.get(name).embedded:  # offline: fail now (about 2 s), not after datasets' retries
            require_hub(field, name, EMBEDDED_HINT[field])
    if cfg.kv.bits != 16:
        from quant.kv_cache import check_kv_supported

        check_kv_supported(cfg.kv.bits, cfg.kv.format)
    resolved = resolve_model(cfg.model)
    cache_writable = check_cache_dir(cache_need_bytes(cfg, resolved), log)  # a warning at most: the cache is optional
    model_config = load_config(resolved, cfg.model)  # a .gguf file: its metadata (harness.models)
    check_positions(cfg, model_config)  # every sequence length against the model's positions
    check_group_sizes(cfg.quant, model_config.to_dict())
    if random_weights:
        preflight(cfg, model_config)
        return random_prepared(cfg, resolved, model_config, cache_writable)
    tok = load_tokenizer(resolved, cfg.model)
    try:
        bos = bos_token_id(tok, cfg.data.add_bos)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if method.needs_calibration:
        calibration_ids(cfg.quant.calib, tok)  # quant.calib.seqlen against the calibration text, before loading
    preflight(cfg, model_config)  # the evaluators' and the calibration's memory
    windows, shas, texts = {}, {}, {}
    for split in cfg.data.splits:
        text = texts[split] = load_text(split)
        shas[split] = text_sha256(text)[:16]
        ids = tokenize_cached(tok, text)
        windows[split] = eval_windows(ids, cfg.eval.perplexity.seqlen, cfg.eval.perplexity.max_windows, split, bos)
    return Prepared(resolved, tok, windows, texts, shas, bos, cache_writable)


def random_prepared(cfg: RunConfig, resolved, model_config, cache_writable: bool) -> Prepared:
    """Random weights (quantization, timings and memory only): no tokenizer and no text; each split's windows are
    seeded random token ids below the model's vocabulary size, and so are the calibration samples
    (calibration_of), whether or not the checkpoint carries a tokenizer."""
    from harness.synthetic import RANDOM_IDS, random_token_ids

    vocab = model_config.get_text_config().vocab_size
    n, seqlen = cfg.eval.perplexity.max_windows or 1, cfg.eval.perplexity.seqlen
    windows = {split: random_token_ids(n, seqlen, vocab, cfg.seed + i) for i, split in enumerate(cfg.data.splits)}
    return Prepared(resolved, None, windows, {}, {split: RANDOM_IDS for split in windows}, None, cache_writable, vocab)


def calibration_of(cfg: RunConfig, prep: Prepared):
    """The run's lazy calibration samples (harness.data.calibration_provider's (get, state)): drawn from the
    calibration text, or random token ids for random weights."""
    calib = getattr(cfg.quant, "calib", None)
    if prep.tokenizer is None:
        from harness.synthetic import random_calibration

        return random_calibration(calib, prep.vocab_size)
    return calibration_provider(calib, prep.tokenizer, prep.bos_token_id)


def calibration_identity_of(cfg: RunConfig, prep: Prepared) -> dict:
    """What the calibration samples are made of, for the quantized-weight cache key (see calibration_of)."""
    if prep.tokenizer is None:
        from harness.synthetic import random_calibration_identity

        return random_calibration_identity(cfg.quant.calib, prep.vocab_size)
    return calibration_identity(cfg.quant.calib, prep.tokenizer, prep.bos_token_id)


EMBEDDED_HINT = {"data.splits": "an embedded split (data=embedded)",
                 "quant.calib.dataset": "the embedded calibration text (quant.calib.dataset=shakespeare_calib)"}
CACHE_MIN_BYTES = 64 << 20  # tokenized text and reference outputs: tens of MB


def text_sources(cfg: RunConfig, needs_calibration: bool) -> list[tuple[str, str]]:
    """(field, source name) of every text the run reads."""
    return [("data.splits", s) for s in cfg.data.splits] + (
        [("quant.calib.dataset", cfg.quant.calib.dataset)] if needs_calibration else [])


def cache_need_bytes(cfg: RunConfig, resolved) -> int:
    """What a run may write into the cache: a quantized-weight entry (codes, scales and the unquantized tensors:
    at most the checkpoint's own bytes) for a quantized run, plus tokenized text and reference outputs."""
    if cfg.quant.method == "fp16":
        return CACHE_MIN_BYTES
    d = Path(resolved.directory)
    files = [d / resolved.gguf_file] if resolved.gguf_file else [*d.glob("*.safetensors"), *d.glob("*.bin")]
    return CACHE_MIN_BYTES + sum(f.stat().st_size for f in files if f.is_file())


def any_evaluator_enabled(cfg: RunConfig) -> bool:
    return any(getattr(getattr(cfg.eval, name, None), "enabled", False) for name in ordered_names())


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


def quantize(cfg: RunConfig, model, prep: Prepared, calib, calib_state: dict,
             placement: Placement = Placement()) -> QuantOutcome:
    """Quantize in place, through the content-addressed cache (methods other than fp16)."""
    calib_id = (calibration_identity_of(cfg, prep)
                if METHODS.get(cfg.quant.method).needs_calibration else None)  # loads the text only when needed
    if cfg.quant.method != "fp16":
        log(f"quantizing: {config_label(cfg.quant)}")
    return quantized_cache.quantize_cached(model, cfg.quant, prep.resolved.model_sha, cfg.model.dtype,
                                           QuantContext(calibration=calib, progress=cfg.progress, placement=placement), calib_state,
                                           force=cfg.force, log=log, calib_id=calib_id,
                                           write_cache=prep.cache_writable)


def run(cfg: RunConfig) -> dict:
    cfg, off = without_quality_metrics(cfg)
    if off:
        log(f"model.weights: random ({cfg.model.path}): quality has no meaning on random weights; switched off "
            f"{', '.join(off)} (quantization, timings and memory only)")
    path = record_path(cfg)
    if path.exists() and not cfg.force:
        rec = existing_record(path)
        if rec is not None and rec.get("status") == "complete":
            why = stale_reason(rec, cfg)
            if why is None:
                log(f"record {path} exists (run_id {rec['run_id']}); reusing it (force=true recomputes)")
                return rec
            log(f"record {path} {why}; recomputing")
    t_start = time.perf_counter()
    timings = {}
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    prep = prepare(cfg)
    timings["prepare"] = time.perf_counter() - t
    version = code_version_of(cfg)  # the sources as the work starts (after prepare named any unknown method)

    place = Placement.of(cfg.model.device, cfg.offload)
    t = time.perf_counter()
    log(f"loading {cfg.model.name} ({prep.resolved.origin})" + (" into host memory; blocks onload to "
                                                                 f"{place.compute} in turn" if place.offload else ""))
    model = load_model(prep.resolved, cfg.model, device="cpu" if place.offload else None)
    timings["load_model"] = time.perf_counter() - t

    calib, calib_state = calibration_of(cfg, prep)
    if place.compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(place.compute)
    t = time.perf_counter()
    outcome = quantize(cfg, model, prep, calib, calib_state, place)
    timings["quantize"] = time.perf_counter() - t
    timings.update({f"quantize.{k}": v for k, v in outcome.timings_s.items()
                    if isinstance(v, (int, float))})
    outcome.summary["peak_memory_quantize"] = peak_memory(place.compute)
    if place.offload and any_evaluator_enabled(cfg):
        model.to(place.compute)  # evaluation runs the whole model where the config says

    metrics: dict = {"quant": outcome.summary}

    ctx = EvalContext(cfg=cfg, model=model, tokenizer=prep.tokenizer, windows=prep.windows, texts=prep.texts,
                      split_sha=prep.split_sha, model_sha=prep.resolved.model_sha, qtensors=outcome.qtensors,
                      kv_cache_factory=kv_cache_factory(cfg, model),
                      load_reference_model=lambda: load_model(prep.resolved, cfg.model), progress=cfg.progress,
                      results=metrics)
    log(f"evaluating ({cfg.backend.name})")
    timings.update(BACKENDS.get(cfg.backend.name).evaluate(ctx, log))
    if ctx.kv_cache_factory is not None:
        metrics["kv_cache"] = ctx.kv_cache_factory.summary()
        if metrics["kv_cache"]["constant_heads"]:
            log(f"KV cache: {metrics['kv_cache']['constant_heads']} constant (token, head) rows dequantized to NaN, "
                f"as LMDeploy's kernels do")

    timings["total"] = time.perf_counter() - t_start
    prov = provenance({
        "model_sha": prep.resolved.model_sha,
        "model_origin": prep.resolved.origin,
        "reference_note": describe_model(cfg.model, prep.resolved, model.config),
        "model": model_summary(model),
        "data_sha256": prep.split_sha,
        "bos_token_id": prep.bos_token_id,  # at the head of every window and calibration sample (None: no BOS)
        "seed": cfg.seed,
    })
    record = make_record(cfg, metrics, prov, timings, code_version=version)
    write_record(path, record, cfg)
    log(f"wrote {path} (run_id {run_id(cfg)}, {timings['total']:.1f} s)")
    return record


def write_record(path: Path, record: dict, cfg: RunConfig) -> None:
    """The record, atomically; a disk that filled up during the run is a one-line error naming the path."""
    try:
        write_json_atomic(path, record)
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


def record_exists(cfg: RunConfig) -> bool:
    p = Path(record_path(cfg))
    rec = existing_record(p) if p.exists() else None
    return rec is not None and rec.get("status") == "complete" and stale_reason(rec, cfg) is None
