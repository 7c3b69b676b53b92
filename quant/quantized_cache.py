"""Content-addressed cache of quantized models: the integer codes of every quantized Linear plus every other
parameter (norms that absorbed AWQ scales, embeddings), keyed by the model's identity and the method's config as the
run_id sees it (harness.records.quant_identity: the chosen method's fields only).
A sweep that evaluates the same quantized weights twice (e.g. with and without a quantized KV cache) quantizes once,
and a run that died after quantizing resumes from here."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from harness.assets import atomic_file, cache_dir
from harness.integrity import load_tensors, save_tensors
from harness.config import QuantConfig
from harness.data import source_identity
from harness.log import logger
from harness.records import quant_identity
from harness.models import require_finite
from harness.text_files import is_file_source
from quant.formats.fp4 import FP4Tensor
from quant.primitives import QTensor
from harness.environment import sources_sha
from quant.registry import METHODS, QuantContext, QuantOutcome, method_sources

CACHE_VERSION = 4  # bump when a method changes what it computes or how it is stored (2: clipping on a random
# token subset; 3: Gram clip; 4: safetensors + JSON sidecar instead of a torch pickle)

warn = logger("cache")  # cache problems are warnings: the cache is optional


def quant_key(model_sha: str, cfg: QuantConfig, dtype: str, calib_id: dict | None = None, device: str = "cpu") -> str:
    """`calib_id`: what the calibration samples are made of (harness.data.calibration_identity: the text's sha256,
    tokenizer, BOS); left out for methods that do not calibrate. `device`: the kind of device that computed the
    weights (a search on CUDA picks other scales and clips than on the CPU: bf16 kernels differ), so a cache shared
    between a GPU and a CPU machine never hands one's weights to the other; left out for the CPU, whose earlier
    entries keep their keys."""
    quant = quant_identity(cfg)  # fp16/rtn/awq in their compatibility view: their earlier cache entries still hit
    calib = quant.get("calib") or {}
    if is_file_source(calib.get("dataset")):  # a local calibration file counts by its content, not its path
        calib["dataset"] = source_identity(calib["dataset"])
    blob = {"v": CACHE_VERSION, "model": model_sha, "dtype": dtype, "quant": quant,
            "code": sources_sha(method_sources(cfg))}  # the method's sources: new code, new weights
    if calib_id is not None and METHODS.get(cfg.method).needs_calibration:
        blob["calibration"] = calib_id
    if device != "cpu":
        blob["device"] = device
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _paths(key: str) -> tuple[Path, Path]:
    """The tensors (safetensors: no code runs when they are read) and the JSON sidecar, written last."""
    d = cache_dir() / "quantized"
    return d / f"{key}.safetensors", d / f"{key}.json"


def _tensors(model, outcome: QuantOutcome) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """codes.<linear>, scales.<linear>, zeros.<linear> of every quantized Linear and params.<name> of every other
    parameter or buffer; a tensor tied to one already stored (lm_head to the embedding) is stored once and named in
    the second dict (tied name -> stored name)."""
    out = {}
    for n, q in outcome.qtensors.items():
        out[f"codes.{n}"], out[f"scales.{n}"] = q.q, q.scales
        if q.zeros is not None:
            out[f"zeros.{n}"] = q.zeros
        if getattr(q, "global_scale", None) is not None:  # NVFP4's per-tensor scale (quant/formats/fp4.py)
            out[f"global_scale.{n}"] = q.global_scale
    quantized = {f"{n}.weight" for n in outcome.qtensors}
    stored, tied = {}, {}
    for k, v in model.state_dict().items():
        if k in quantized:
            continue
        storage = (v.device, v.data_ptr(), v.shape, v.dtype) if v.numel() else k
        if storage in stored:
            tied[k] = stored[storage]
            continue
        stored[storage] = k
        out[f"params.{k}"] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}, tied


def save(key: str, model, outcome: QuantOutcome) -> Path:
    tensors_path, sidecar = _paths(key)
    tensors, tied = _tensors(model, outcome)
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "qtensors": {n: _qtensor_meta(q) for n, q in outcome.qtensors.items()},
        "tied": tied,
        "summary": outcome.summary,
        "timings_s": outcome.timings_s,
    }
    # each file atomically (a run killed while saving leaves no half file); the sidecar last, so a reader that
    # finds it finds the tensors it describes, and the sha256 of their bytes, checked on every load (harness.integrity)
    meta["tensors_sha256"] = save_tensors(tensors, tensors_path, metadata={"key": key})
    with atomic_file(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, default=str))
    return tensors_path


def _read(key: str) -> tuple[dict, dict]:
    tensors_path, sidecar = _paths(key)
    meta = json.loads(sidecar.read_text())
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        raise ValueError(f"version {meta.get('version')} / key {meta.get('key')} is not {CACHE_VERSION} / {key}")
    return meta, load_tensors(tensors_path, meta.get("tensors_sha256"))


def _qtensor_meta(q) -> dict:
    """What the sidecar says of one Linear's codes: bits and group size; an FP4 format by name (absent: integer)."""
    fmt = getattr(q, "format", "int")
    return {"w_bit": q.w_bit, "group_size": q.group_size, **({"format": fmt} if fmt != "int" else {})}


def _qtensor(n: str, d: dict, tensors: dict):
    if d.get("format", "int") != "int":
        return FP4Tensor(q=tensors[f"codes.{n}"], scales=tensors[f"scales.{n}"],
                         global_scale=tensors.get(f"global_scale.{n}"), format=d["format"])
    return QTensor(q=tensors[f"codes.{n}"], scales=tensors[f"scales.{n}"], zeros=tensors.get(f"zeros.{n}"),
                   w_bit=d["w_bit"], group_size=d["group_size"])


def _qtensors(meta: dict, tensors: dict) -> dict:
    return {n: _qtensor(n, d, tensors) for n, d in meta["qtensors"].items()}


def _check_fits(model, state: dict) -> None:
    """ValueError unless `state` has exactly the model's tensors, each of the model's shape (checked before loading,
    so a cache that does not fit leaves the model as it was)."""
    own = model.state_dict()
    if own.keys() != state.keys():
        raise ValueError(f"tensors differ from the model's (missing {sorted(own.keys() - state.keys())[:3]}, "
                         f"unexpected {sorted(state.keys() - own.keys())[:3]})")
    wrong = [k for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}")


def load_into(key: str, model) -> QuantOutcome | None:
    """Restore a cached quantization into `model` (same architecture); None on a miss. A file that does not parse
    (truncated, foreign, an old pickle), whose bytes are not the ones its sidecar's sha256 recorded (a flipped bit, an
    edit) or that does not fit the model is named in a warning and counts as a miss, the model untouched: the cache is
    optional, and the entry is written again once quantized."""
    tensors_path, sidecar = _paths(key)
    if not (tensors_path.exists() and sidecar.exists()):
        return None
    try:
        meta, tensors = _read(key)
        qtensors = _qtensors(meta, tensors)
        state = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
        state.update({k: state[stored] for k, stored in meta["tied"].items()})
        for n, q in qtensors.items():
            state[f"{n}.weight"] = q.dequantize(model.get_submodule(n).weight.dtype)
        _check_fits(model, state)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as e:
        warn(f"warning: {tensors_path} (or its .json) is not a usable quantized-weight cache "
             f"({type(e).__name__}: {str(e)[:160]}); treating it as a miss and quantizing again")
        return None
    model.load_state_dict(state, strict=True)
    summary = dict(meta["summary"], from_cache=True)
    return QuantOutcome(summary=summary, timings_s=meta["timings_s"], qtensors=qtensors)


def quantize_cached(model, cfg: QuantConfig, model_sha: str, dtype: str, ctx: QuantContext, calib_state: dict,
                    force: bool = False, log=lambda msg: None, calib_id: dict | None = None,
                    write_cache: bool = True) -> QuantOutcome:
    """Quantize `model` in place with `cfg.method`, through this cache (fp16 passes through untouched); `write_cache=False`
    (the preflight found the cache full or read-only) reads the cache but writes nothing.
    `calib_state` is the calibration provider's state (harness.data.calibration_provider): its samples' hash goes
    into the summary when the method drew them; `calib_id` (what they are made of) goes into the key."""
    method = METHODS.get(cfg.method)
    if cfg.method == "fp16" or not method.caches(cfg):
        return method(model, cfg, ctx)
    key = quant_key(model_sha, cfg, dtype, calib_id, device=ctx.placement.compute.type)
    cached = None if force else load_into(key, model)
    if cached is not None:
        log(f"quantized weights from cache ({key}); original quantize time {sum(cached.timings_s.values()):.1f} s")
        return cached
    # a block-by-block method keeps each finished block under the same key, so a killed run resumes inside itself
    ckpt_dir = checkpoint_dir(key)
    outcome = method(model, cfg, dataclasses.replace(ctx, checkpoint_dir=ckpt_dir))
    check_quantized_finite(model, cfg)  # before the cache or any evaluation sees the weights
    if "samples" in calib_state:
        outcome.summary["calibration_sha256"] = hashlib.sha256(calib_state["samples"].numpy().tobytes()).hexdigest()[:16]
    outcome.summary["cache_key"] = key
    if not write_cache:
        return outcome
    try:
        save(key, model, outcome)
    except OSError as e:  # e.g. a full disk: the cache is optional, the run goes on
        warn(f"warning: could not write the quantized-weight cache under {_paths(key)[0].parent} ({e}); continuing")
    else:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the whole result is in the cache: its blocks are not needed
    return outcome


def checkpoint_dir(key: str) -> Path:
    """Where a quantization under `key` keeps its finished blocks (quant.calibration.checkpoint)."""
    return cache_dir() / "quant_checkpoints" / key


def check_quantized_finite(model, cfg: QuantConfig) -> None:
    require_finite(model, "quant.method", cfg.method, "quantizing left {count} NaN/Inf values of {numel} in {name} "
                   "(the loaded weights were finite)", "nothing was cached or recorded; try model.dtype=float32")


def is_cached(key: str) -> bool:
    return all(p.exists() for p in _paths(key))
