"""One forward (or generate) that passes a KV cache under the name the installed transformers takes.

transformers 5.x renamed the forward argument `past_key_values` to `cache` (5.24 warns that the old name goes in
5.40; 5.17, on the GPU machine, knows only the old one). The name is read from the model's own forward signature,
so every pinned version works and none warns."""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_arg(forward_fn) -> str:
    params = inspect.signature(forward_fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """Keyword arguments that hand `cache` to `module` (a model or its decoder): {name: cache, use_cache: True}, or
    {use_cache: False} when `cache` is None."""
    if cache is None:
        return {"use_cache": False}
    return {_cache_arg(type(module).forward): cache, "use_cache": True}


def forward(module, input_ids, cache=None, **kw):
    """`module(input_ids=..., <cache name>=cache, use_cache=...)`."""
    return module(input_ids=input_ids, **cache_kwargs(module, cache), **kw)
