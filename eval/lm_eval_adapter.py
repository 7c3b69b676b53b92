"""The harness's (quantized) model as an lm-eval `LM`, so lm-eval's own request handling (tokenization, rolling
windows, continuation scoring, aggregation) runs on it unchanged.

`HarnessLM` is lm-eval's `HFLM` given the already-built model (HFLM accepts a `PreTrainedModel` as `pretrained`);
the only change is that, when the run quantizes the KV cache, every forward and every `generate` gets a fresh
quantized cache, so the scores see the cache's numerics as the harness's own perplexity does (eval/perplexity.py).
Without a KV cache factory it *is* HFLM: same code path, same numbers. Log-softmax and the sums over tokens run in
float32 (HFLM's `softmax_dtype`) whatever the model's dtype: in bf16 a sum of log-probs of a few hundred tokens keeps 2-3
significant digits (a word-PPL record once read -42048.0).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Optional

import torch
from lm_eval.models.huggingface import HFLM

from eval.forward import cache_kwargs, forward


class HarnessLM(HFLM):
    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 8, max_length: Optional[int] = None,
                 kv_cache_factory: Optional[Callable[[], object]] = None, softmax_dtype=torch.float32,
                 add_bos_token: Optional[bool] = None):
        # HFLM warns at length that a pre-built model skips its loading options; that is the point here
        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        super().__init__(pretrained=model, tokenizer=copy.deepcopy(tokenizer),  # HFLM may set a pad token on it
                         backend="causal", batch_size=batch_size, max_length=max_length, softmax_dtype=softmax_dtype,
                         add_bos_token=add_bos_token)
        self.kv_cache_factory = kv_cache_factory

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.kv_cache_factory is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return forward(self.model, inps, self.kv_cache_factory()).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if self.kv_cache_factory is not None:
            generation_kwargs.update(cache_kwargs(self.model, self.kv_cache_factory()))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        # HFLM asks the hub for the sha of `pretrained`; the harness's record carries the model's identity instead
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype)}


# data.add_bos -> HFLM's add_bos_token: None is lm-eval's own default (the tokenizer's add_special_tokens behaviour),
# the convention `auto` follows for the harness's windows (harness.data.bos_token_id)
ADD_BOS_TOKEN = {"auto": None, "true": True, "false": False}


def from_context(ctx, batch_size: int, max_length: Optional[int] = None) -> HarnessLM:
    """The run's model under test (weights and KV numerics as configured) as an lm-eval LM."""
    return HarnessLM(ctx.model, ctx.tokenizer, batch_size=batch_size, max_length=max_length,
                     kv_cache_factory=ctx.kv_cache_factory, add_bos_token=ADD_BOS_TOKEN[ctx.cfg.data.add_bos])
