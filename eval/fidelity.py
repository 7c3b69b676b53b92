"""Fidelity to the unquantized ("FP16") model on the same tokens: per split, over the first `max_windows`
paper-protocol windows, at every scored position (the next-token distribution after each prefix):

    KL(P_fp16 || Q_quant) mean and p99 (nats), top-1 agreement (argmax P == argmax Q), and the PPL ratio
    exp(mean NLL_Q - mean NLL_P) on those same tokens.

The reference is computed once per (model_sha, dtype, split text, seqlen, windows, versions) and cached under
cache_dir()/reference/, so a quantized run never runs the reference model. What is cached, and why it is exact:
the reference decoder's last hidden state h [windows, seqlen-1, hidden] (after the final norm) in the model dtype,
plus the reference output embedding W (and bias) once per model. The reference logits are W h, recomputed here by
the same chunked projection the quantized side uses: that *is* the reference forward's last step, so the cached
reference reproduces its logits bit for bit, at ~1/85 of the size of the full fp16 log-probs (SmolLM2: 576 vs 49,152
values per position; 4.7 MB per 8x512 windows, plus 57 MB for W per model). A top-k store would be smaller still but
makes KL approximate (the tail mass is unknown); this makes it exact. Cost: one extra lm_head matmul per position.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eval.forward import forward
from eval.perplexity import CE_CHUNK
from eval.registry import EvalContext, evaluator
from harness.assets import load_cached_tensors, save_cached_tensors
from harness.environment import package_versions

REFERENCE_VERSION = 1


def _versions() -> str:
    v = package_versions(("torch", "transformers"))
    return f"torch {v['torch']}, transformers {v['transformers']}"


def reference_key(model_sha: str, dtype: torch.dtype, device: str, windows: torch.Tensor) -> str:
    """Content address of a reference: the model, its dtype and device, the exact token windows, and the versions
    whose kernels produced it."""
    h = hashlib.sha256()
    h.update(json.dumps([REFERENCE_VERSION, model_sha, str(dtype), device, _versions(), list(windows.shape)]).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _head_key(model_sha: str, dtype: torch.dtype) -> str:
    return hashlib.sha256(json.dumps([REFERENCE_VERSION, model_sha, str(dtype)]).encode()).hexdigest()[:24]


def _reference_dir() -> Path:
    from harness.assets import cache_dir

    d = cache_dir() / "reference"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _softcap(model):
    return getattr(model.config, "final_logit_softcapping", None)


def _head_logits(h: torch.Tensor, weight: torch.Tensor, bias, cap) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def last_hidden(model, windows: torch.Tensor, batch_size: int, cache_factory=None, progress: bool = False,
                desc: str = "") -> torch.Tensor:
    """Decoder output (after the final norm) at every position but the last, [n, seqlen-1, hidden], model dtype."""
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    out = []
    for b in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[b : b + batch_size].to(device)
        out.append(forward(decoder, ids, cache_factory() if cache_factory else None).last_hidden_state[:, :-1].cpu())
    return torch.cat(out)


class ReferenceStore:
    """FP16 reference outputs, content-addressed on disk; the reference model is loaded only on a miss."""

    def __init__(self, model_sha: str, dtype: torch.dtype, device: str, load_model, batch_size: int,
                 progress: bool = False, root: Path | None = None):
        self.model_sha, self.dtype, self.device = model_sha, dtype, device
        self.load_model, self.batch_size, self.progress = load_model, batch_size, progress
        self.root = root or _reference_dir()
        self._model = None
        self.misses = 0

    def _ref_model(self):
        if self._model is None:
            if self.load_model is None:
                raise RuntimeError("fidelity: the reference is not cached and no reference model loader was given")
            self._model = self.load_model()
        return self._model

    def head(self) -> dict:
        path = self.root / f"head-{_head_key(self.model_sha, self.dtype)}.pt"
        cached = load_cached_tensors(path)
        if cached is not None:
            return cached
        m = self._ref_model()
        lin = m.get_output_embeddings()
        head = {"weight": lin.weight.detach().cpu().clone(),
                "bias": None if lin.bias is None else lin.bias.detach().cpu().clone(), "softcap": _softcap(m)}
        save_cached_tensors(head, path)
        return head

    def hidden(self, windows: torch.Tensor, split: str = "") -> tuple[torch.Tensor, str, bool]:
        key = reference_key(self.model_sha, self.dtype, self.device, windows)
        path = self.root / f"hidden-{key}.pt"
        cached = load_cached_tensors(path)
        if cached is not None:
            return cached, key, True
        self.misses += 1
        h = last_hidden(self._ref_model(), windows, self.batch_size, None, self.progress, f"fp16 reference {split}")
        save_cached_tensors(h, path)
        return h, key, False

    def release(self) -> None:
        self._model = None


@torch.no_grad()
def compare(model, windows: torch.Tensor, ref_hidden: torch.Tensor, ref_head: dict, batch_size: int,
            cache_factory=None, progress: bool = False, desc: str = "fidelity") -> dict:
    """KL(P_ref || Q_model), top-1 agreement and NLLs at every scored position of `windows`, Q from a transformers
    model (its decoder once per batch, its head chunk by chunk)."""
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    cap = _softcap(model)

    def q_chunks(ids):
        hq = forward(decoder, ids.to(device), cache_factory() if cache_factory else None).last_hidden_state[:, :-1]
        for s in range(0, ids.shape[1] - 1, CE_CHUNK):
            lq = head(hq[:, s : s + CE_CHUNK]).float()
            yield slice(s, s + CE_CHUNK), (torch.tanh(lq / cap) * cap if cap else lq)

    return compare_logits(q_chunks, windows, ref_hidden, ref_head, batch_size, device, progress, desc)


@torch.no_grad()
def compare_logits(q_chunks, windows: torch.Tensor, ref_hidden: torch.Tensor, ref_head: dict, batch_size: int,
                   device, progress: bool = False, desc: str = "fidelity") -> dict:
    """The comparison itself, for any source of the compared model's logits: `q_chunks(ids [b, T])` yields
    (position slice, logits [b, len, vocab]) covering positions 0..T-2 (transformers chunk by chunk, or an engine's
    whole-sequence logits: backends/lmdeploy.py). Log-softmax, KL and NLLs in fp32."""
    w_ref = ref_head["weight"].to(device)
    b_ref = None if ref_head["bias"] is None else ref_head["bias"].to(device)
    n, T = windows.shape
    kl = torch.full((n, T - 1), float("nan"))
    agree = torch.zeros(n, T - 1, dtype=torch.bool)
    nll_q = torch.full((n, T - 1), float("nan"))
    nll_p = torch.full((n, T - 1), float("nan"))
    for b in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[b : b + batch_size].to(device)
        hp = ref_hidden[b : b + batch_size].to(device)
        tgt = ids[:, 1:]
        rows = slice(b, b + ids.shape[0])
        for sl, lq in q_chunks(ids):
            logq = F.log_softmax(lq.to(device).float(), dim=-1)
            logp = F.log_softmax(_head_logits(hp[:, sl], w_ref, b_ref, ref_head["softcap"]), dim=-1)
            kl[rows, sl] = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1).cpu()
            agree[rows, sl] = (logq.argmax(-1) == logp.argmax(-1)).cpu()
            t = tgt[:, sl, None]
            nll_q[rows, sl] = -logq.gather(-1, t)[..., 0].cpu()
            nll_p[rows, sl] = -logp.gather(-1, t)[..., 0].cpu()
    if torch.isnan(kl).any():  # a source that skipped positions would silently score fewer tokens
        raise RuntimeError(f"fidelity: {int(torch.isnan(kl).sum())} of {kl.numel()} positions got no logits")
    kl = kl.clamp_min(0)  # fp32 rounding can leave -1e-9 where P == Q
    dq, dp = nll_q.double().mean().item(), nll_p.double().mean().item()
    return {
        "kl_mean": kl.double().mean().item(),
        "kl_p99": torch.quantile(kl.flatten().double(), 0.99).item(),
        "kl_max": kl.max().item(),
        "top1_agreement": agree.double().mean().item(),
        "ppl_ratio": math.exp(dq - dp),
        "token_ppl": math.exp(dq),
        "reference_token_ppl": math.exp(dp),
        "windows": n,
        "seqlen": T,
        "positions": kl.numel(),
    }


def references(ctx: EvalContext) -> dict:
    """split -> (windows, reference hidden, key, cached?) and the reference head, for the run's fidelity windows; the
    reference model (loaded only on a miss) is released before this returns."""
    fc = ctx.cfg.eval.fidelity
    dtype = next(ctx.model.parameters()).dtype
    store = ReferenceStore(ctx.model_sha, dtype, ctx.cfg.model.device, ctx.load_reference_model,
                           ctx.cfg.eval.perplexity.batch_size, ctx.progress)
    refs = {}
    for split, windows in ctx.windows.items():
        w = windows if fc.max_windows is None else windows[: fc.max_windows]
        refs[split] = (w, *store.hidden(w, split))
    head = store.head()
    store.release()
    return {"splits": refs, "head": head}


@evaluator("fidelity")
def evaluate_fidelity(ctx: EvalContext) -> dict | None:
    fc = ctx.cfg.eval.fidelity
    if not fc.enabled:
        return None
    batch_size = ctx.cfg.eval.perplexity.batch_size
    ref = references(ctx)
    out = {}
    for split, (w, hidden, key, hit) in ref["splits"].items():
        res = compare(ctx.model, w, hidden, ref["head"], batch_size, ctx.kv_cache_factory, ctx.progress,
                      f"fidelity {split}")
        out[split] = {**res, "reference": {"key": key, "cached": hit, "split_sha": ctx.split_sha.get(split)}}
    return out
