"""load -> calibrate -> quantize -> evaluate -> record, from one RunConfig.

`run(cfg)` is the Python API (the Hydra entry point `experiments.run` only builds the config and calls it):

    from harness.config import to_run_config
    from omegaconf import OmegaConf
    record = run(to_run_config(OmegaConf.create({...})))

Every check that can fail on bad input runs before the model is loaded or any long loop starts.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from harness.config import RunConfig
from harness.data import TEXT_SOURCES, calibration_samples, eval_windows, load_text, text_sha256, tokenize_cached
from harness.models import load_model, load_tokenizer, model_summary, resolve_model
from harness.records import load_record, make_record, provenance, record_path, run_id, write_json_atomic
from eval import EVALUATORS, EvalContext, ordered_names, preflight
from quant import METHODS, QuantContext, QuantOutcome
from quant import cache as quant_cache
from serving.synthetic import refuse_quality_metrics


def log(msg: str) -> None:
    print(f"[run] {msg}", file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """Everything cheap that a run needs, checked before the long work."""

    resolved: object
    tokenizer: object
    windows: dict  # split -> [n, seqlen] token ids
    texts: dict
    split_sha: dict


def prepare(cfg: RunConfig) -> Prepared:
    refuse_quality_metrics(cfg)  # synthetic (random) weights: throughput and memory only
    method = METHODS.get(cfg.quant.method)
    for split in cfg.data.splits:
        TEXT_SOURCES.get(split)
    if method.needs_calibration:
        TEXT_SOURCES.get(cfg.quant.calib.dataset)
    if cfg.kv.bits != 16:
        from quant.kv_cache import check_kv_supported

        check_kv_supported(cfg.kv.bits)
    resolved = resolve_model(cfg.model)
    preflight(cfg, AutoConfig.from_pretrained(resolved.directory, trust_remote_code=cfg.model.trust_remote_code))
    tok = load_tokenizer(resolved, cfg.model)
    windows, shas, texts = {}, {}, {}
    for split in cfg.data.splits:
        text = texts[split] = load_text(split)
        shas[split] = text_sha256(text)[:16]
        ids = tokenize_cached(tok, text)
        windows[split] = eval_windows(ids, cfg.eval.perplexity.seqlen, cfg.eval.perplexity.max_windows, split)
    return Prepared(resolved, tok, windows, texts, shas)


def calibration_provider(cfg: RunConfig, tokenizer):
    """Lazy calibration samples, so methods that need none never pay for them."""
    state = {}

    def get() -> torch.Tensor:
        if "samples" not in state:
            c = cfg.quant.calib
            ids = tokenize_cached(tokenizer, load_text(c.dataset))
            state["samples"] = calibration_samples(ids, c.n_samples, c.seqlen, c.seed)
        return state["samples"]

    return get, state


def kv_cache_factory(cfg: RunConfig, model):
    if cfg.kv.bits == 16:
        return None
    from quant.kv_cache import QuantizedKVCache

    return lambda: QuantizedKVCache(model.config, bits=cfg.kv.bits)


def quantize(cfg: RunConfig, model, model_sha: str, calib, calib_state: dict) -> QuantOutcome:
    """Quantize in place, through the content-addressed cache (methods other than fp16)."""
    method = METHODS.get(cfg.quant.method)
    if cfg.quant.method == "fp16":
        return method(model, cfg.quant, QuantContext(calibration=calib, progress=cfg.progress))
    key = quant_cache.quant_key(model_sha, cfg.quant, cfg.model.dtype)
    cached = None if cfg.force else quant_cache.load_into(key, model)
    if cached is not None:
        log(f"quantized weights from cache ({key}); original quantize time {sum(cached.timings_s.values()):.1f} s")
        return cached
    outcome = method(model, cfg.quant, QuantContext(calibration=calib, progress=cfg.progress))
    if "samples" in calib_state:
        outcome.summary["calibration_sha256"] = hashlib.sha256(calib_state["samples"].numpy().tobytes()).hexdigest()[:16]
    outcome.summary["cache_key"] = key
    quant_cache.save(key, model, outcome)
    return outcome


def run(cfg: RunConfig) -> dict:
    path = record_path(cfg)
    if path.exists() and not cfg.force:
        rec = load_record(path)
        if rec.get("status") == "complete":
            log(f"record {path} exists (run_id {rec['run_id']}); reusing it (force=true recomputes)")
            return rec
    t_start = time.perf_counter()
    timings = {}
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    prep = prepare(cfg)
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"loading {cfg.model.name} ({prep.resolved.origin})")
    model = load_model(prep.resolved, cfg.model)
    timings["load_model"] = time.perf_counter() - t

    calib, calib_state = calibration_provider(cfg, prep.tokenizer)
    t = time.perf_counter()
    outcome = quantize(cfg, model, prep.resolved.model_sha, calib, calib_state)
    timings["quantize"] = time.perf_counter() - t
    timings.update({f"quantize.{k}": v for k, v in outcome.timings_s.items()})

    metrics: dict = {"quant": outcome.summary}

    ctx = EvalContext(cfg=cfg, model=model, tokenizer=prep.tokenizer, windows=prep.windows, texts=prep.texts,
                      split_sha=prep.split_sha, model_sha=prep.resolved.model_sha, qtensors=outcome.qtensors,
                      kv_cache_factory=kv_cache_factory(cfg, model),
                      load_reference_model=lambda: load_model(prep.resolved, cfg.model), progress=cfg.progress,
                      results=metrics)
    for name in ordered_names():
        t = time.perf_counter()
        result = EVALUATORS.get(name)(ctx)
        if result is not None:
            metrics[name] = result
            timings[f"eval.{name}"] = time.perf_counter() - t
            log(f"{name}: {_brief(result)}")

    timings["total"] = time.perf_counter() - t_start
    prov = provenance({
        "model_sha": prep.resolved.model_sha,
        "model_origin": prep.resolved.origin,
        "reference_note": cfg.model.reference_note,
        "model": model_summary(model),
        "data_sha256": prep.split_sha,
        "seed": cfg.seed,
    })
    record = make_record(cfg, metrics, prov, timings)
    write_json_atomic(path, record)
    log(f"wrote {path} (run_id {run_id(cfg)}, {timings['total']:.1f} s)")
    return record


def _brief(result: dict) -> str:
    """One line for the log: the first few numeric leaves of a result."""
    flat = []

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat.append(f"{prefix}={v:.4g}")

    walk("", result)
    return ", ".join(flat[:6]) + (" ..." if len(flat) > 6 else "")


def record_exists(cfg: RunConfig) -> bool:
    p = Path(record_path(cfg))
    return p.exists() and load_record(p).get("status") == "complete"
