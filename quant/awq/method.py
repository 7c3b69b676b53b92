"""AWQ W4A16 (Lin et al. 2023) block by block, as llm-awq's run_awq does it:

for each decoder block, with the block's input from the unquantized model:
  1. run the block once on all calibration sequences, capturing the input of every Linear;
  2. for each scaling group (layer map), search s = mean|x|^alpha on a grid (or LMDeploy's fixed smoothing ratio);
  3. fold every s into its previous op and the group's Linears (FP output unchanged), divide the captured inputs by s;
  4. search each Linear's clipping threshold per group (q/k excepted, as in llm-awq), clip;
  5. quantize the block's Linears (RTN on the scaled, clipped weights).
Memory stays at one block's activations. The activation statistics use every calibration sequence; the grid losses
use the first `search_samples` sequences, or, for groups scored token by token (MLP, single Linears) when
`search_tokens` > 0, that many tokens drawn at random over all sequences.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from harness.config import QuantConfig
from quant.awq.fold import apply_scale_
from quant.awq.search import (act_absmax, act_absmean, apply_clip_, group_gram, search_clip, search_scale, smoothing_scale,
                              weight_absmean)
from harness.architectures import Architecture, get_blocks, architecture_for
from quant.primitives import fake_quantize
from quant.registry import QuantContext, QuantOutcome, method
from harness.storage_bytes import packed_weight_bytes
from quant.surgery import plan_group_sizes, quantize_linear_

MINIBATCH = 16  # sequences per block forward


class _Stop(Exception):
    pass


def _slice_batch(kwargs: dict, n: int) -> dict:
    """Block kwargs captured for the first minibatch (up to MINIBATCH sequences), cut to n sequences where they carry
    a batch dim: masks [B, 1, T, T], per-sequence rotary tables and position ids [B, T, ...]. 1-D tensors
    (cache_position) and tables shared by the batch (dim 0 of size 1) pass unchanged."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] > n:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


def _clean_kwargs(kwargs: dict) -> dict:
    kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_block_inputs(model, arch: Architecture, samples: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering block 0 for every calibration sequence, and for *every* block the keyword arguments
    the model's own forward passes to that block (Gemma-3's global layers get other rotary embeddings and masks than
    its sliding ones).

    The kwargs come from the first minibatch, run through every block once (stopped before the last block runs);
    every later minibatch stops at block 0. They are kept by reference: blocks that get the same objects (one rotary
    tuple for all Llama layers) share them, so memory is one set of rotary tables and masks per distinct object, not
    per block; nothing of the hidden states past block 0 is kept."""
    blocks = get_blocks(model, arch)
    store: dict[str, Any] = {"x": [], "kwargs": [None] * len(blocks)}

    def hook(i):
        def pre(_mod, args, kwargs):
            if i == 0:
                store["x"].append(args[0] if args else kwargs["hidden_states"])
            if store["kwargs"][i] is None:
                store["kwargs"][i] = _clean_kwargs(kwargs)
            if (i == 0 and store["kwargs"][-1] is not None) or i == len(blocks) - 1:
                raise _Stop
        return pre

    hs = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        for i in range(0, samples.shape[0], MINIBATCH):
            try:
                model(input_ids=samples[i : i + MINIBATCH].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hs:
            h.remove()
    return torch.cat(store["x"]), store["kwargs"]


def _input_keys(arch: Architecture) -> dict[str, str]:
    """Linear -> the name under which its input is captured (Linears of one scaling group share one input)."""
    keys = {n: n for n in arch.linears}
    for g in arch.groups:
        for n in g.linears:
            keys[n] = g.linears[0]
    return keys


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, capture: list[str]) -> tuple[torch.Tensor, dict]:
    """Block outputs for all sequences, and the inputs of the named Linears (concatenated over minibatches)."""
    feats: dict[str, list] = {n: [] for n in capture}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: feats[n].append(a[0])) for n in capture]
    outs = []
    try:
        for i in range(0, x.shape[0], MINIBATCH):
            xb = x[i : i + MINIBATCH]
            outs.append(_block_out(block(xb, **_slice_batch(kwargs, xb.shape[0]))))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(outs), {n: torch.cat(v) for n, v in feats.items()}


def _inspect_fn(block, group, kwargs):
    mod = block.get_submodule(group.inspect or group.linears[0])

    def fwd(x):
        outs = []
        for i in range(0, x.shape[0], MINIBATCH):
            xb = x[i : i + MINIBATCH]
            if group.inspect_takes_block_kwargs:
                outs.append(_block_out(mod(hidden_states=xb, **_slice_batch(kwargs, xb.shape[0]))))
            else:
                outs.append(_block_out(mod(xb)))
        return torch.cat(outs)

    return fwd


@method("awq", needs_calibration=True)
def awq(model, cfg: QuantConfig, ctx: QuantContext) -> QuantOutcome:
    timings = {}
    arch = architecture_for(model)  # unsupported architecture: fails here, naming the registry
    sizes, fallbacks = plan_group_sizes(model, cfg)  # bad group size: fails here, naming the layer

    t = time.perf_counter()
    samples = ctx.calibration()
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(samples.max()) >= vocab:
        raise ValueError(f"calibration token id {int(samples.max())} is outside the model's vocabulary ({vocab})")
    place = ctx.placement
    with place.capture(model, get_blocks(model, arch)):
        x, block_kwargs = capture_block_inputs(model, arch, samples)
    timings["calibration_capture"] = time.perf_counter() - t

    # clipping scores a seeded random subset of calibration tokens. (llm-awq takes every k-th token; with k a
    # divisor of seqlen that oversamples the first position of every sequence, whose activations are outliers.)
    n_tok = samples.numel()
    clip_idx = None  # clip_tokens 0: every calibration token
    if 0 < cfg.clip_tokens < n_tok:
        clip_idx = torch.randperm(n_tok, generator=torch.Generator().manual_seed(cfg.calib.seed))[: cfg.clip_tokens]
    # token-wise groups may score a random subset of all calibration tokens (more varied text for the same cost)
    search_idx = None
    if cfg.search_tokens > 0:
        search_idx = torch.randperm(n_tok, generator=torch.Generator().manual_seed(cfg.calib.seed + 1))[: cfg.search_tokens]
        search_idx = search_idx.sort().values
    keys = _input_keys(arch)
    capture = sorted(set(keys.values()))
    qtensors, chosen_alpha = {}, {}
    t_search = t_clip = t_fwd = t_quant = 0.0
    block_s = []
    blocks = get_blocks(model, arch)
    bar = tqdm(blocks, desc=f"awq w{cfg.w_bit} g{cfg.group_size}", disable=not ctx.progress, leave=False)
    for i, block in enumerate(bar):
        t_block = time.perf_counter()
        t_acc: dict[str, float] = {}
        with place.block(block):  # what the real forward passes to this block: block_kwargs[i]
            x = _awq_block(block, i, x, block_kwargs[i], arch, cfg, sizes, keys, capture, search_idx, clip_idx,
                           qtensors, chosen_alpha, t_acc)
        t_fwd += t_acc["fwd"]
        t_search += t_acc["search"]
        t_clip += t_acc["clip"]
        t_quant += t_acc["quant"]
        place.to_host({n: q for n, q in qtensors.items() if n.startswith(f"{arch.blocks}.{i}.")})
        block_s.append(time.perf_counter() - t_block)

    timings.update(block_forward=t_fwd, scale_search=t_search, clip_search=t_clip, quantize=t_quant)
    summary = {
        "method": "awq", "w_bit": cfg.w_bit, "group_size": cfg.group_size, "zero_point": cfg.zero_point,
        "search_scale": cfg.search_scale, "duo_scaling": cfg.duo_scaling, "clip": cfg.clip,
        "calibration": {"dataset": cfg.calib.dataset, "n_samples": cfg.calib.n_samples, "seqlen": cfg.calib.seqlen,
                        "seed": cfg.calib.seed, "search_samples": min(cfg.search_samples, cfg.calib.n_samples),
                        "search_tokens": min(cfg.search_tokens, cfg.calib.n_samples * cfg.calib.seqlen)},
        "scale_grid": cfg.scale_grid,
        "layers_quantized": len(qtensors), "group_fallback_layers": fallbacks,
        "alpha_mean": sum(chosen_alpha.values()) / len(chosen_alpha) if chosen_alpha else None,
        "block_seconds": block_s, "placement": {"compute": str(place.compute), "offload": place.offload},
        **packed_weight_bytes(model, qtensors),
    }
    return QuantOutcome(summary=summary, timings_s=timings, qtensors=qtensors)


def _awq_block(block, i, x, kwargs, arch, cfg, sizes, keys, capture, search_idx, clip_idx, qtensors, chosen_alpha,
               t_acc) -> torch.Tensor:
    """One decoder block, on whatever device it and `x` are on: forward (capture), scale search and fold, clip search,
    quantize. Fills qtensors / chosen_alpha, adds stage seconds to t_acc, returns the block's outputs (the next
    block's inputs)."""
    t_search = t_clip = t_fwd = t_quant = 0.0
    prefix = f"{arch.blocks}.{i}"
    t = time.perf_counter()
    x_next, feats = run_block(block, x, kwargs, capture)
    # mean |x| per input channel of every captured input: AWQ's statistic, and a NaN/Inf anywhere makes it non-finite
    x_means = {name: act_absmean(f) for name, f in feats.items()}
    t_fwd += time.perf_counter() - t
    for name, m in x_means.items():
        if not torch.isfinite(m).all():
            raise FloatingPointError(f"calibration activations at the input of {prefix}.{name} contain NaN/Inf "
                                     f"(check model.dtype and the calibration data)")

    # 2-3. scales: search every group on the original block, then fold them all (llm-awq auto_scale_block)
    t = time.perf_counter()
    plans = []
    for grp in arch.groups:
        if grp.when is not None and not grp.when(block):
            continue
        lins = [block.get_submodule(n) for n in grp.linears]
        gsz = [sizes[f"{prefix}.{n}"] for n in grp.linears]
        feat = feats[keys[grp.linears[0]]]
        if cfg.search_scale:
            def qw(w, j, gsz=gsz):
                return fake_quantize(w, cfg.w_bit, gsz[j], cfg.zero_point)
            w_mean = weight_absmean([lin.weight for lin in lins], gsz[0]) if cfg.duo_scaling else None
            if search_idx is not None and not grp.inspect_takes_block_kwargs:
                xs = feat.reshape(-1, feat.shape[-1])[search_idx].unsqueeze(0)  # one pseudo-sequence of tokens
            else:
                xs = feat[: cfg.search_samples]
            s, alpha, _ = search_scale(_inspect_fn(block, grp, kwargs), xs, lins, x_means[keys[grp.linears[0]]], qw,
                                       cfg.n_grid, w_mean, cfg.scale_grid)
            chosen_alpha[f"{prefix}.{grp.linears[0]}"] = alpha
        else:
            s = smoothing_scale(act_absmax(feat), weight_absmean([lin.weight for lin in lins], gsz[0]), cfg.smooth_ratio)
        plans.append((grp, s))
    for grp, s in plans:
        apply_scale_(block, grp.prev_op, grp.prev_kind, grp.linears, s)
        key = keys[grp.linears[0]]
        feats[key].div_(s.to(feats[key].dtype))
    t_search += time.perf_counter() - t

    # 4. clipping search on the scaled weights and inputs (one Gram matrix per input, shared by its Linears)
    t = time.perf_counter()
    if cfg.clip:
        grams: dict[tuple[str, int], torch.Tensor] = {}
        for rel in arch.linears:
            if rel in arch.no_clip:
                continue
            lin = block.get_submodule(rel)
            gsz = sizes[f"{prefix}.{rel}"]
            key = (keys[rel], gsz)
            if key not in grams:
                feat = feats[keys[rel]].reshape(-1, lin.in_features)
                grams[key] = group_gram(feat if clip_idx is None else feat[clip_idx], gsz)
            max_val = search_clip(lin.weight.data, None, cfg.w_bit, gsz, cfg.zero_point, cfg.clip_n_grid,
                                  cfg.clip_max_shrink, gram=grams[key])
            apply_clip_(lin, max_val)
        del grams
    t_clip += time.perf_counter() - t

    # 5. quantize (unless a recipe rounds the smoothed weights itself: awq_gptq, quant/gptq/awq_gptq.py)
    t = time.perf_counter()
    for rel in arch.linears if getattr(cfg, "round_weights", True) else ():
        name = f"{prefix}.{rel}"
        qtensors[name] = quantize_linear_(block.get_submodule(rel), cfg.w_bit, sizes[name], cfg.zero_point)
    t_quant += time.perf_counter() - t
    del feats
    t_acc.update(fwd=t_fwd, search=t_search, clip=t_clip, quant=t_quant)
    return x_next
