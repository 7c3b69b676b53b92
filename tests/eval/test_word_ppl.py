"""lm-eval's rolling word perplexity through the harness's adapter: its loglikelihood equals a float64
recomputation of the protocol written out by hand, and word PPL / bits per byte follow lm-eval's wikitext formulas."""
from __future__ import annotations

import math
import re

import pytest
import torch

from eval.lm_eval_adapter import HarnessLM
from eval.word_perplexity import rolling_word_perplexity, truncate_words


def test_truncate_words_cuts_at_whitespace():
    text = "alpha beta gamma\ndelta epsilon"
    assert truncate_words(text, None) == text and truncate_words(text, 1000) == text
    assert truncate_words(text, 13) == "alpha beta"
    assert truncate_words(text, 19) == "alpha beta gamma"


@torch.no_grad()
def _rolling_ll_by_hand(model, toks: list[int], prefix: int, L: int) -> float:
    """Every token scored once: the first L after a prefix token, then windows of L inputs whose first input is
    the previous window's last token; the last, partial window conditions on the L tokens before its end.
    Every window has L inputs, so they run as one batch."""
    n, inputs, scored = len(toks), [], []
    for start in range(0, n, L):
        end = min(start + L, n)
        inputs.append([prefix] + toks[: end - 1] if start == 0 else toks[end - L - 1 : end - 1])
        scored.append((end - start, toks[start:end]))  # score the last k positions
    logp = torch.log_softmax(model(torch.tensor(inputs)).logits.double(), -1)
    return sum(logp[i, -k:].gather(-1, torch.tensor(t)[:, None]).sum().item() for i, (k, t) in enumerate(scored))


def test_rolling_loglikelihood_matches_hand_protocol(smollm2_fp32_shared, tokenizer):
    from harness.data import load_text

    doc = truncate_words(load_text("milton"), 500)
    lm = HarnessLM(smollm2_fp32_shared, tokenizer, batch_size=4, max_length=32)
    res = rolling_word_perplexity(lm, doc)
    toks = lm.tok_encode(doc)
    assert res["tokens"] == len(toks) and len(toks) > 3 * 32  # several full windows and a partial one
    ref = _rolling_ll_by_hand(smollm2_fp32_shared, toks, lm.prefix_token_id, 32)
    assert abs(res["loglikelihood"] - ref) < 1e-4 * abs(ref)

    words, n_bytes = len(re.split(r"\s+", doc)), len(doc.encode("utf-8"))
    assert res["words"] == words and res["bytes"] == n_bytes
    assert math.isclose(res["word_perplexity"], math.exp(-res["loglikelihood"] / words), rel_tol=1e-12)
    assert math.isclose(res["bits_per_byte"], -res["loglikelihood"] / n_bytes / math.log(2), rel_tol=1e-12)
    assert math.isclose(res["rolling_token_ppl"], math.exp(-res["loglikelihood"] / len(toks)), rel_tol=1e-12)
    # the disagreement users ask about: the same loglikelihood per word is per token ** (tokens / words)
    assert math.isclose(res["word_perplexity"], res["rolling_token_ppl"] ** (len(toks) / words), rel_tol=1e-9)


@pytest.mark.slow
@torch.no_grad()
def test_bf16_model_log_likelihoods_are_summed_in_fp32(smollm2_bf16_shared, tokenizer):
    """Word PPL and task log-likelihoods of the bf16 model (the lm-eval LM every run builds, eval.lm_eval_adapter.
    from_context) equal an fp32 log-softmax + float64 sum over the same bf16 logits to 1e-4; bf16 log-softmax and
    sums miss by ~1e-3 and land on a coarse grid (the -42048.0 of issue 14)."""
    from types import SimpleNamespace

    from lm_eval.api.instance import Instance

    from eval.lm_eval_adapter import from_context
    from harness.data import load_text

    m = smollm2_bf16_shared
    ctx = SimpleNamespace(model=m, tokenizer=tokenizer, kv_cache_factory=None,
                          cfg=SimpleNamespace(data=SimpleNamespace(add_bos="auto")))
    lm = from_context(ctx, batch_size=1, max_length=256)
    doc = truncate_words(load_text("milton"), 600)
    toks = lm.tok_encode(doc)
    assert 60 < len(toks) < 256  # one window: the same forward as the recomputation below
    ll = rolling_word_perplexity(lm, doc)["loglikelihood"]
    ref = _rolling_ll_by_hand(m, toks, lm.prefix_token_id, 256)
    assert abs(ll - ref) < 1e-4 * abs(ref), (ll, ref)

    context, cont = doc[:300], doc[300:600]
    (task_ll, _), = lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=(context, cont), idx=0)],
                                     disable_tqdm=True)
    c_toks, k_toks = lm._encode_pair(context, cont)
    inp = torch.tensor([(c_toks + k_toks)[:-1]])
    logp = torch.log_softmax(m(inp).logits.double(), -1)[0, -len(k_toks):]
    ref_task = logp.gather(-1, torch.tensor(k_toks)[:, None]).sum().item()
    assert abs(task_ll - ref_task) < 1e-4 * abs(ref_task), (task_ll, ref_task)
