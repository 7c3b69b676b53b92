"""Quality through the deployed kernel: token PPL of each split with the W4A16 weights running in a real int4
kernel (quant/kernels/w4a16.py: gemlite or torch's int4 kernel on CUDA, torch's int4 kernel on the CPU), beside the
fake-quantized simulation every other evaluator scores, on the same windows, with the paired difference.

The simulation multiplies by the dequantized weights in the model dtype; a kernel multiplies by its own weights
(gemlite: AWQ's (q - z) * s exactly; torch's int4 kernel: bf16 scale and float zero) and accumulates in its own order.
What this reports is how far a number measured on the simulation is from the deployed model's: the relative PPL
difference, the paired 95% interval of the PPL difference (the same windows resampled for both), and the mean |logit| difference on one batch.
Off by default (`eval.kernel_quality.enabled=true`); needs the perplexity evaluator's windows, not its results.
"""
from __future__ import annotations

import math

import torch

from eval.perplexity import ppl_metrics, window_nll
from eval.registry import EvalContext, evaluator


@evaluator("kernel_quality")
def evaluate_kernel_quality(ctx: EvalContext) -> dict | None:
    kc = ctx.cfg.eval.kernel_quality
    if not kc.enabled or not ctx.qtensors:
        return None
    from eval.throughput import kernel_model
    from harness.confidence import paired_ppl_diff_ci95

    model, info, why = kernel_model(ctx.model, ctx.qtensors, kc.kernel)
    if model is None:
        return {"kernel": None, "why_not": why}
    bs = ctx.cfg.eval.perplexity.batch_size
    out = {"kernel": info["kernel"], "description": info["description"], "exact_weights": info["exact"],
           "skipped": info["skipped"], "splits": {}}
    for split, windows in ctx.windows.items():
        sim = ctx.results.get("perplexity", {}).get(split)
        if sim is None or sim.get("windows") != windows.shape[0]:  # the simulation's figure for the same windows
            nll_sim, secs = window_nll(ctx.model, windows, bs, progress=ctx.progress, desc=f"sim {split}")
            sim = ppl_metrics(nll_sim, secs, windows.shape[1])
        nll, secs = window_nll(model, windows, bs, progress=ctx.progress, desc=f"kernel {split}")
        k = ppl_metrics(nll, secs, windows.shape[1])
        out["splits"][split] = {"token_ppl": k["token_ppl"], "simulated_token_ppl": sim["token_ppl"],
                                "rel_diff": k["token_ppl"] / sim["token_ppl"] - 1,
                                "ppl_diff_ci95": paired_ppl_diff_ci95(k["window_nll_mean"], sim["window_nll_mean"]),
                                "window_nll_mean": k["window_nll_mean"],
                                "tokens_per_s": k["tokens_per_s"]}
    with torch.no_grad():  # the logits themselves, on the first windows of the first split
        ids = next(iter(ctx.windows.values()))[:min(bs, 2)].to(next(model.parameters()).device)
        a, b = model(ids).logits.float(), ctx.model(ids).logits.float()
        out["logits_mean_abs_diff"] = (a - b).abs().mean().item()
        out["logits_rel_diff"] = ((a - b).norm() / b.norm()).item()
    out["max_abs_rel_ppl_diff"] = max(abs(s["rel_diff"]) for s in out["splits"].values()) if out["splits"] else math.nan
    return out
