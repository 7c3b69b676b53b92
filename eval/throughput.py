"""Prefill and decode throughput of the model under test, at fixed prompt / generation lengths and several batch
sizes: `warmup` untimed runs, then the median of `repeats` timed runs.

One run is a greedy decode written out (what `generate` does, minus its logits processors): a prefill forward over
[batch, prompt_len] real tokens that fills the KV cache and keeps the last position's logits, then `gen_len - 1`
single-token decode steps. prefill tok/s = batch * prompt_len / prefill time; decode tok/s = batch * (gen_len - 1) /
decode time (the first generated token comes from the prefill).

What runs: W4A16 through the real int4 CPU kernel (quant/int4_linear.swap_int4_linears on a copy of the model, built
from the run's integer codes), never through dequantized weights unless the kernel cannot take the config (then
the record says so and why); the KV cache is the run's (QuantizedKVCache at kv.bits 8/4, else transformers'
DynamicCache). The KV bytes the cache really held after a run are recorded beside the arithmetic of eval/memory.py.
"""
from __future__ import annotations

import copy
import statistics
import os
import time

import torch
from tqdm.auto import tqdm

from eval.forward import forward
from eval.registry import EvalContext, evaluator


def cache_nbytes(cache) -> int:
    if hasattr(cache, "nbytes"):  # QuantizedKVCache: codes + scales + zeros
        return cache.nbytes()
    n = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n


@torch.no_grad()
def greedy_run(model, prompt: torch.Tensor, gen_len: int, cache_factory=None) -> dict:
    """One timed greedy decode: prefill seconds, decode seconds, the generated ids and the cache's bytes."""
    from transformers import DynamicCache

    cache = cache_factory() if cache_factory else DynamicCache(config=model.config)
    prompt = prompt.to(next(model.parameters()).device)
    t0 = time.perf_counter()
    out = forward(model, prompt, cache, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    generated = [nxt]
    for _ in range(gen_len - 1):
        out = forward(model, nxt, cache)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(nxt)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "ids": torch.cat(generated, 1).cpu(),
            "kv_cache_bytes": cache_nbytes(cache)}


def measure(model, prompt: torch.Tensor, gen_len: int, warmup: int = 1, repeats: int = 3, cache_factory=None,
            bar=None) -> dict:
    b, p = prompt.shape
    for _ in range(warmup):
        greedy_run(model, prompt, gen_len, cache_factory)
    runs = []
    for _ in range(repeats):
        runs.append(greedy_run(model, prompt, gen_len, cache_factory))
        if bar is not None:
            bar.update(1)
    prefill_s = statistics.median(r["prefill_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] for r in runs)
    steps = gen_len - 1
    return {
        "prefill_tok_s": b * p / prefill_s,
        "decode_tok_s": b * steps / decode_s if steps else None,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_ms_per_step": 1000 * decode_s / steps if steps else None,
        "kv_cache_bytes": runs[-1]["kv_cache_bytes"],
        "repeats_s": [[r["prefill_s"], r["decode_s"]] for r in runs],
    }


def prompt_batch(ids: torch.Tensor, batch_size: int, prompt_len: int) -> torch.Tensor:
    """`batch_size` consecutive, different prompts of real text (wrapping around a short text)."""
    flat = ids.flatten()
    need = batch_size * prompt_len
    if flat.numel() < need:
        flat = flat.repeat(need // flat.numel() + 1)
    return flat[:need].view(batch_size, prompt_len).clone()


def int4_model(model, qtensors: dict):
    """A copy of `model` whose quantized Linears run the int4 kernel (lm_head and embeddings stay in the model
    dtype), or (None, why not)."""
    from quant.kernels.int4_linear import Int4KernelError, swap_int4_linears

    if next(model.parameters()).device.type != "cpu":
        return None, "the int4 weight-only kernel used here is the CPU one"
    try:
        return swap_int4_linears(copy.deepcopy(model), qtensors), None
    except Int4KernelError as e:
        return None, str(e)


def model_under_test(ctx: EvalContext, int4_kernel: bool):
    """(model, description of its weights, the reason the int4 kernel is not used or None)."""
    if not ctx.qtensors:
        return ctx.model, f"unquantized ({ctx.cfg.model.dtype})", None
    if not int4_kernel:
        return ctx.model, "dequantized (eval.throughput.int4_kernel=false)", "disabled by config"
    m, why = int4_model(ctx.model, ctx.qtensors)
    if m is None:
        return ctx.model, f"dequantized weights: int4 kernel not used ({why})", why
    return m, "int4 kernel (aten._weight_int4pack_mm_for_cpu); lm_head and embeddings unquantized", None


def check_throughput_fits(cfg, model_config) -> None:
    from eval.memory import check_fits

    tc = cfg.eval.throughput
    for b in tc.batch_sizes:
        check_fits(model_config, b, tc.prompt_len + tc.gen_len, cfg.kv.bits, "eval.throughput.batch_sizes",
                   device=cfg.model.device, logits_positions=b)


@evaluator("throughput")
def evaluate_throughput(ctx: EvalContext) -> dict | None:
    tc = ctx.cfg.eval.throughput
    if not tc.enabled:
        return None
    from quant.kernels.int4_linear import weight_bytes

    check_throughput_fits(ctx.cfg, ctx.model.config)
    model, weights, fallback = model_under_test(ctx, tc.int4_kernel)
    ids = next(iter(ctx.windows.values()))
    out = {"weights": weights, "int4_kernel_fallback": fallback,
           "kv_cache": f"int{ctx.cfg.kv.bits} (QuantizedKVCache)" if ctx.kv_cache_factory else "fp16/bf16 DynamicCache",
           "weight_bytes": weight_bytes(model), "device": ctx.cfg.model.device, "threads": torch.get_num_threads(),
           "prompt_len": tc.prompt_len, "gen_len": tc.gen_len, "warmup": tc.warmup, "repeats": tc.repeats,
           "batch": {}}
    # what else ran: a CPU figure measured while other work held the cores is not this machine's speed (the report
    # leaves such cells out and says why)
    out["cpu_count"], load_before = os.cpu_count(), _load_1m()
    bar = tqdm(total=len(tc.batch_sizes) * tc.repeats, desc="throughput", disable=not ctx.progress, leave=False)
    for b in tc.batch_sizes:
        prompt = prompt_batch(ids, b, tc.prompt_len)
        out["batch"][str(b)] = measure(model, prompt, tc.gen_len, tc.warmup, tc.repeats, ctx.kv_cache_factory, bar)
    bar.close()
    out["load_average_1m"] = [load_before, _load_1m()]
    return out


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None
