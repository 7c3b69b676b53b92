"""What a decoder block sees during calibration: the hidden states entering block 0 and the keyword arguments the
model's own forward passes to each block (captured with pre-hooks), and one block's forward over every calibration
sequence in minibatches, with hooks on the Linears a method observes."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from harness.architectures import Architecture, get_blocks

MINIBATCH = 16  # sequences per block forward


class _Stop(Exception):
    pass


def slice_batch(kwargs: dict, n: int) -> dict:
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

    Every block's forward is replaced, for the duration, by a recorder that keeps what it is given and passes the
    hidden states through untouched: the model computes its rotary tables and masks from the token ids alone, so the
    recorded kwargs are exactly the real forward's, and no block's weights are read (on a GPU with offloading, no
    block leaves host memory: a 7B's capture no longer streams all 13 GB of weights to the GPU). The kwargs come from
    the first minibatch (it stops at the last block); every later minibatch stops at block 0. They are kept by
    reference: blocks that get the same objects (one rotary tuple for all Llama layers) share them, so memory is one
    set of rotary tables and masks per distinct object, not per block."""
    blocks = get_blocks(model, arch)
    store: dict[str, Any] = {"x": [], "kwargs": [None] * len(blocks)}

    def recorder(i):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                store["x"].append(h)
            if store["kwargs"][i] is None:
                store["kwargs"][i] = _clean_kwargs(kwargs)
            if (i == 0 and store["kwargs"][-1] is not None) or i == len(blocks) - 1:
                raise _Stop
            return h  # what the next recorder sees is never used: only block 0's inputs are kept
        return forward

    for i, b in enumerate(blocks):
        b.forward = recorder(i)  # an instance attribute shadows the class's forward (nn.Module.__call__ calls it)
    device = next(model.parameters()).device
    try:
        for i in range(0, samples.shape[0], MINIBATCH):
            try:
                model(input_ids=samples[i : i + MINIBATCH].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for b in blocks:
            del b.forward
    return torch.cat(store["x"]), store["kwargs"]


def block_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward_block(block: nn.Module, x: torch.Tensor, kwargs: dict,
                  observe: dict[str, Callable[[torch.Tensor], None]] | None = None) -> torch.Tensor:
    """The block's outputs for all sequences of `x`, minibatch by minibatch; `observe[name](input)` sees the input of
    the Linear `name` (relative to the block) for every minibatch. Hooks only read, so the outputs are the same
    with and without them."""
    observe = observe or {}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, o, f=f: f(a[0])) for n, f in observe.items()]
    outs = []
    try:
        for i in range(0, x.shape[0], MINIBATCH):
            xb = x[i : i + MINIBATCH]
            outs.append(block_out(block(xb, **slice_batch(kwargs, xb.shape[0]))))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(outs) if outs else x[:0]


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, capture: list[str]) -> tuple[torch.Tensor, dict]:
    """Block outputs for all sequences, and the inputs of the named Linears (concatenated over minibatches)."""
    feats: dict[str, list] = {n: [] for n in capture}
    out = forward_block(block, x, kwargs, {n: feats[n].append for n in capture})
    return out, {n: torch.cat(v) for n, v in feats.items()}
