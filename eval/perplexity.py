"""Paper-protocol token perplexity (GPTQ/AWQ convention): non-overlapping windows of `seqlen` tokens, each scored
from its own start, token PPL = exp(mean next-token NLL over every scored position).

The forward stops at the decoder's last hidden state; the cross-entropy goes through `lm_head` in chunks of positions
so the full fp32 [batch, seqlen, vocab] logits are never materialised (the vocab is 49k for SmolLM2).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.confidence import N_RESAMPLES, SEED, ppl_ci95
from eval.forward import forward
from eval.registry import EvalContext, evaluator

CE_CHUNK = 128  # positions per lm_head chunk: bounded memory, large enough for efficient matmuls


def _softcap(model) -> Optional[float]:
    return getattr(model.config, "final_logit_softcapping", None)


def chunked_logits(model, hidden: torch.Tensor):
    """Yield (start, fp32 logits) for chunks of positions of `hidden` [B, T, H]."""
    head = model.get_output_embeddings()
    cap = _softcap(model)
    for s in range(0, hidden.shape[1], CE_CHUNK):
        logits = head(hidden[:, s : s + CE_CHUNK]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        yield s, logits


@torch.no_grad()
def window_nll(
    model,
    windows: torch.Tensor,
    batch_size: int,
    cache_factory: Callable[[], object] | None = None,
    progress: bool = True,
    desc: str = "ppl",
) -> tuple[torch.Tensor, float]:
    """Per-token NLL [n_windows, seqlen-1] (float32) of each window scored independently, and the seconds taken.

    `cache_factory` gives a fresh KV cache per batch (e.g. a quantized one): attention then reads K/V back from it,
    so the score sees the cache's numerics.
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    out = torch.empty(windows.shape[0], windows.shape[1] - 1, dtype=torch.float32)
    t0 = time.perf_counter()
    bar = tqdm(total=windows.numel(), desc=desc, unit="tok", disable=not progress, leave=False)
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b : b + batch_size].to(device)
        hidden = forward(decoder, ids, cache_factory() if cache_factory else None).last_hidden_state
        targets = ids[:, 1:]
        for s, logits in chunked_logits(model, hidden[:, :-1]):
            tgt = targets[:, s : s + logits.shape[1]]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
            out[b : b + ids.shape[0], s : s + logits.shape[1]] = nll.view(tgt.shape).cpu()
        bar.update(ids.numel())
    bar.close()
    return out, time.perf_counter() - t0


def ppl_metrics(nll: torch.Tensor, seconds: float, seqlen: int) -> dict:
    """Token PPL of per-token NLL [n_windows, seqlen-1], with its 95% bootstrap interval over windows and the
    per-window mean NLLs (what a paired comparison of two runs on the same windows needs: harness/confidence.py)."""
    mean = nll.double().mean().item()
    window_mean = nll.double().mean(dim=1).tolist()
    ci = ppl_ci95(window_mean)
    return {
        "token_ppl": math.exp(mean),
        "nll_mean": mean,
        "windows": int(nll.shape[0]),
        "seqlen": seqlen,
        "tokens_scored": int(nll.numel()),
        "tokens_per_s": nll.shape[0] * seqlen / seconds if seconds > 0 else None,
        "seconds": seconds,
        "token_ppl_ci95": list(ci) if ci else None,
        "ci95_method": f"percentile bootstrap over windows, {N_RESAMPLES} resamples, seed {SEED}",
        "window_nll_mean": window_mean,
    }


@evaluator("perplexity")
def evaluate_perplexity(ctx: EvalContext) -> dict | None:
    pc = ctx.cfg.eval.perplexity
    if not pc.enabled:
        return None
    out = {}
    for split, windows in ctx.windows.items():
        nll, secs = window_nll(ctx.model, windows, pc.batch_size, ctx.kv_cache_factory, progress=ctx.progress,
                               desc=f"ppl {split}")
        out[split] = ppl_metrics(nll, secs, windows.shape[1])
    return out
