"""A second perplexity protocol, lm-eval's: rolling-window loglikelihood over the whole text, reported per word and
per byte (the `wikitext` task's word_perplexity / bits_per_byte), beside the harness's paper-protocol token PPL.

Why the two disagree, term by term (both are printed so a reader can check):
- normalisation: word PPL = exp(-LL / words), token PPL = exp(-LL / tokens); with ~1.3-1.5 tokens per word here,
  word PPL is roughly token PPL ** (tokens / words), far larger;
- windows: lm-eval scores *every* token: the first window after a prefix token (BOS/EOS), each later one with one
  token of carried context (`get_rolling_token_windows(context_len=1)`; the last, partial window conditions on the
  `max_length` tokens before its end); the paper protocol cuts non-overlapping `seqlen` windows, drops the
  remainder and never scores a window's first token;
- text: lm-eval counts words as `len(re.split(r"\\s+", doc))` and bytes as UTF-8 bytes of the document, here the first
  `max_chars` characters of the split (cut at whitespace); the paper protocol scores `max_windows` windows.
The loglikelihood comes from lm-eval's own `HFLM.loglikelihood_rolling` run on the harness's model
(eval/lm_eval_adapter.py), so this is lm-eval's number, not a re-implementation; the aggregation is lm-eval's
`weighted_perplexity` / `bits_per_byte`.
"""
from __future__ import annotations

import math
import re
import time
from typing import Optional

from eval.registry import EvalContext, evaluator

PROTOCOL = "lm-eval loglikelihood_rolling (HFLM), word/byte normalised"


def truncate_words(text: str, max_chars: Optional[int]) -> str:
    """The first max_chars characters, cut back to the last whitespace so no word is split."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    ws = max(cut.rfind(" "), cut.rfind("\n"))
    return cut[:ws] if ws > 0 else cut


def rolling_word_perplexity(lm, doc: str, progress: bool = False) -> dict:
    """Score one document with lm-eval's rolling loglikelihood; aggregate as lm-eval's wikitext task does."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    req = Instance(request_type="loglikelihood_rolling", doc={"text": doc}, arguments=(doc,), idx=0)
    t0 = time.perf_counter()
    (ll,) = lm.loglikelihood_rolling([req], disable_tqdm=not progress)
    secs = time.perf_counter() - t0
    words = len(re.split(r"\s+", doc))  # lm-eval's wikitext process_results
    n_bytes = len(doc.encode("utf-8"))
    tokens = len(lm.tok_encode(doc))
    return {
        "protocol": PROTOCOL,
        "word_perplexity": weighted_perplexity([(ll, words)]),
        "byte_perplexity": weighted_perplexity([(ll, n_bytes)]),
        "bits_per_byte": bits_per_byte([(ll, n_bytes)]),
        "rolling_token_ppl": math.exp(-ll / tokens),  # the same LL per token, for comparison with token_ppl
        "loglikelihood": ll,
        "words": words,
        "bytes": n_bytes,
        "tokens": tokens,
        "tokens_per_word": tokens / words,
        "max_length": lm.max_length,
        "tokens_per_s": tokens / secs if secs > 0 else None,
        "seconds": secs,
    }


@evaluator("word_perplexity")
def evaluate_word_perplexity(ctx: EvalContext) -> dict | None:
    wc = ctx.cfg.eval.word_perplexity
    if not wc.enabled:
        return None
    from eval.lm_eval_adapter import from_context
    from eval.memory import check_fits

    check_fits(ctx.model.config, wc.batch_size, wc.max_length, ctx.cfg.kv.bits, "eval.word_perplexity.batch_size",
               device=ctx.cfg.model.device)
    lm = from_context(ctx, wc.batch_size, wc.max_length)
    out = {}
    for split, text in ctx.texts.items():
        doc = truncate_words(text, wc.max_chars)
        out[split] = {**rolling_word_perplexity(lm, doc, ctx.progress), "chars": len(doc)}
    return out
