"""Prefill and decode throughput of the model under test, at fixed prompt / generation lengths and several batch
sizes: `warmup` untimed runs, then the median of `repeats` timed runs.

One run is a greedy decode written out (what `generate` does, minus its logits processors): a prefill forward over
[batch, prompt_len] real tokens that fills the KV cache and keeps the last position's logits, then `gen_len - 1`
single-token decode steps. prefill tok/s = batch * prompt_len / prefill time; decode tok/s = batch * (gen_len - 1) /
decode time (the first generated token comes from the prefill).

What runs: W4A16 through a real int4 kernel (eval.throughput.kernel, quant/kernels/w4a16.py: gemlite or torch's
int4 kernel on CUDA, torch's int4 kernel on the CPU; swapped into a copy of the model, built from the run's integer
codes), never through dequantized weights unless no kernel can take the config (then the record says so and why);
the KV cache is the run's (QuantizedKVCache at kv.bits 8/4, else transformers' DynamicCache). On CUDA with an
unquantized KV cache the decode runs through a static KV cache and one CUDA graph per step (eval/static_decode.py),
for FP16 and quantized weights alike, so a ratio between them is the kernels' and not Python's. The KV bytes the cache really held after a run are recorded beside the arithmetic of eval/memory.py.
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


def kernel_model(model, qtensors: dict, kernel: str):
    """A copy of `model` whose quantized Linears run the chosen W4A16 kernel (quant/kernels/w4a16.py; lm_head and
    embeddings stay in the model dtype), and what ran; or (None, why not)."""
    from quant.kernels.w4a16 import W4A16KernelError, swap_w4a16_linears

    try:
        m = copy.deepcopy(model)
        return m, swap_w4a16_linears(m, qtensors, kernel), None
    except W4A16KernelError as e:
        return None, None, str(e)


def model_under_test(ctx: EvalContext, int4_kernel: bool):
    """(model, description of its weights, the reason a real kernel is not used or None, the kernel's name)."""
    if not ctx.qtensors:
        return ctx.model, f"unquantized ({ctx.cfg.model.dtype})", None, None
    if not int4_kernel:
        return ctx.model, "dequantized (eval.throughput.int4_kernel=false)", "disabled by config", None
    m, info, why = kernel_model(ctx.model, ctx.qtensors, ctx.cfg.eval.throughput.kernel)
    if m is None:
        return ctx.model, f"dequantized weights: int4 kernel not used ({why})", why, None
    if info["kernel"] == "dequant":  # auto found no real kernel here
        return m, f"dequantized weights: {'; '.join(info['skipped']) or 'eval.throughput.kernel=dequant'}", \
            "; ".join(info["skipped"]) or "eval.throughput.kernel=dequant", "dequant"
    return m, f"{info['description']}; lm_head and embeddings unquantized", None, info["kernel"]


def decode_loop(ctx: EvalContext, model) -> tuple[str, object]:
    """Which decode loop measures: on CUDA with an unquantized KV cache, the static cache and one CUDA graph per step
    (eval/static_decode.py: the kernels' time, not Python's); otherwise the eager loop above."""
    tc = ctx.cfg.eval.throughput
    if next(model.parameters()).device.type != "cuda" or not tc.cuda_graph:
        return "eager", None
    if ctx.kv_cache_factory is not None:
        return "eager (the CUDA-graph loop keeps an unquantized KV cache)", None
    from eval.static_decode import check_supported

    try:
        check_supported(model, tc.prompt_len + tc.gen_len)
    except NotImplementedError as e:
        return f"eager ({e})", None
    return "static KV cache + CUDA graph", "graph"


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
    from quant.kernels.w4a16 import packed_bytes

    check_throughput_fits(ctx.cfg, ctx.model.config)
    model, weights, fallback, kernel = model_under_test(ctx, tc.int4_kernel)
    loop, graph = decode_loop(ctx, model)
    ids = next(iter(ctx.windows.values()))
    out = {"weights": weights, "int4_kernel_fallback": fallback, "kernel": kernel, "decode_loop": loop,
           "kv_cache": f"int{ctx.cfg.kv.bits} (QuantizedKVCache)" if ctx.kv_cache_factory else "fp16/bf16 DynamicCache",
           "weight_bytes": packed_bytes(model), "device": ctx.cfg.model.device, "threads": torch.get_num_threads(),
           "prompt_len": tc.prompt_len, "gen_len": tc.gen_len, "warmup": tc.warmup, "repeats": tc.repeats,
           "batch": {}}
    # what else ran: the 1-min load average before and after the measurement, and the cores. A figure measured
    # while more threads were runnable than there are cores is not this machine's speed: the report forms no ratio
    # to FP16 from it, nor across machines (report.record_view.decode_ratio_refusal), and says why
    out["cpu_count"], load_before = os.cpu_count(), _load_1m()
    dense = kernel not in (None, "dequant")  # a real kernel ran: time the dense weights too, in this run
    bar = tqdm(total=len(tc.batch_sizes) * tc.repeats * (1 + dense), desc="throughput", disable=not ctx.progress,
               leave=False)
    out["batch"] = _measure_batches(ctx, model, graph, ids, bar)
    if dense:  # FP16's speed (the dequantized weights in the model dtype: the same shapes, dense matmuls), so the
        # record holds its own ratio, both sides from one machine under one load
        out["dense_baseline"] = {"weights": f"dense {ctx.cfg.model.dtype} (the dequantized weights): FP16's speed",
                                 "batch": _measure_batches(ctx, ctx.model, graph, ids, bar)}
        out["speedup_vs_dense"] = {b: r["decode_tok_s"] / out["dense_baseline"]["batch"][b]["decode_tok_s"]
                                   for b, r in out["batch"].items() if r.get("decode_tok_s")}
    bar.close()
    out["load_average_1m"] = [load_before, _load_1m()]
    return out


def _measure_batches(ctx: EvalContext, model, graph, ids, bar) -> dict:
    tc = ctx.cfg.eval.throughput
    res = {}
    for b in tc.batch_sizes:
        prompt = prompt_batch(ids, b, tc.prompt_len)
        if graph:
            from eval.static_decode import time_decode

            m = time_decode(model, prompt.to(ctx.cfg.model.device), tc.gen_len, tc.warmup, tc.repeats)
            res[str(b)] = {k: v for k, v in m.items() if k != "ids"}
            bar.update(tc.repeats)
        else:
            res[str(b)] = measure(model, prompt, tc.gen_len, tc.warmup, tc.repeats, ctx.kv_cache_factory, bar)
    return res


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None
