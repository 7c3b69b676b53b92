"""Content-addressed cache of quantized models: the integer codes of every quantized Linear plus every other
parameter (norms that absorbed AWQ scales, embeddings), keyed by the model's identity and the whole quant config.
A sweep that evaluates the same quantized weights twice (e.g. with and without a quantized KV cache) quantizes once,
and a run that died after quantizing resumes from here."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from harness.assets import atomic_file, cache_dir
from harness.config import QuantConfig
from harness.data import source_identity
from harness.text_files import is_file_source
from quant.primitives import QTensor
from quant.registry import METHODS, QuantContext, QuantOutcome

CACHE_VERSION = 3  # bump when a method changes what it computes (2: clipping on a random token subset; 3: Gram clip)


def quant_key(model_sha: str, cfg: QuantConfig, dtype: str) -> str:
    quant = dataclasses.asdict(cfg)
    if is_file_source(cfg.calib.dataset):  # a local calibration file counts by its content, not its path
        quant["calib"]["dataset"] = source_identity(cfg.calib.dataset)
    blob = json.dumps({"v": CACHE_VERSION, "model": model_sha, "dtype": dtype, "quant": quant}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _path(key: str) -> Path:
    return cache_dir() / "quantized" / f"{key}.pt"


def save(key: str, model, outcome: QuantOutcome) -> Path:
    quantized = {f"{n}.weight" for n in outcome.qtensors}
    params = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in quantized}
    blob = {
        "version": CACHE_VERSION,
        "qtensors": {n: dataclasses.asdict(q) for n, q in outcome.qtensors.items()},
        "params": params,
        "summary": outcome.summary,
        "timings_s": outcome.timings_s,
    }
    path = _path(key)
    with atomic_file(path) as tmp:  # a run killed while saving leaves no half file for the next run to load
        torch.save(blob, tmp)
    return path


def load_into(key: str, model) -> QuantOutcome | None:
    """Restore a cached quantization into `model` (same architecture); None on a miss."""
    path = _path(key)
    if not path.exists():
        return None
    blob = torch.load(path, weights_only=False)
    qtensors = {n: QTensor(**d) for n, d in blob["qtensors"].items()}
    state = dict(blob["params"])
    for n, q in qtensors.items():
        state[f"{n}.weight"] = q.dequantize(model.get_submodule(n).weight.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise RuntimeError(f"cached quantization {path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    summary = dict(blob["summary"], from_cache=True)
    return QuantOutcome(summary=summary, timings_s=blob["timings_s"], qtensors=qtensors)


def quantize_cached(model, cfg: QuantConfig, model_sha: str, dtype: str, ctx: QuantContext, calib_state: dict,
                    force: bool = False, log=lambda msg: None) -> QuantOutcome:
    """Quantize `model` in place with `cfg.method`, through this cache (fp16 passes through untouched).
    `calib_state` is the calibration provider's state (harness.data.calibration_provider): its samples' hash goes
    into the summary when the method drew them."""
    method = METHODS.get(cfg.method)
    if cfg.method == "fp16":
        return method(model, cfg, ctx)
    key = quant_key(model_sha, cfg, dtype)
    cached = None if force else load_into(key, model)
    if cached is not None:
        log(f"quantized weights from cache ({key}); original quantize time {sum(cached.timings_s.values()):.1f} s")
        return cached
    outcome = method(model, cfg, ctx)
    if "samples" in calib_state:
        outcome.summary["calibration_sha256"] = hashlib.sha256(calib_state["samples"].numpy().tobytes()).hexdigest()[:16]
    outcome.summary["cache_key"] = key
    save(key, model, outcome)
    return outcome


def is_cached(key: str) -> bool:
    return _path(key).exists()
