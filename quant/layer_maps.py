"""Architecture knowledge as data: for each `config.model_type`, where the decoder blocks are, which Linears to
quantize, and AWQ's scaling groups (AutoAWQ's `prev_op / layers / module2inspect`). One registry, looked up by
model type; adding an architecture is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

from harness.registry import Registry


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, the op that produces it, and the module whose output scores a scale."""

    prev_op: str  # a norm or a Linear, relative to the block
    linears: tuple[str, ...]
    inspect: Optional[str]  # module whose output is compared (None: the single linear itself)
    prev_kind: str = "norm"  # norm (y = n(x) * w) | norm_plus_one (Gemma: y = n(x) * (1 + w)) | linear
    # only scale when this holds (v_proj -> o_proj needs equal shapes: skipped under grouped-query attention)
    when: Optional[Callable[[nn.Module], bool]] = None
    # the inspected module is the attention, which needs the block's kwargs (position embeddings, mask)
    inspect_takes_block_kwargs: bool = False


@dataclass(frozen=True)
class LayerMap:
    blocks: str  # attribute path of the nn.ModuleList of decoder blocks
    linears: tuple[str, ...]  # quantized Linears of a block, relative to it
    groups: tuple[ScaleGroup, ...]
    # Linears whose clipping search llm-awq skips: q/k feed the softmax, where output MSE is a poor proxy
    no_clip: tuple[str, ...] = ()


LAYER_MAPS: Registry[LayerMap] = Registry("architecture layer map (by config.model_type)")


def _same_shape(a: str, b: str) -> Callable[[nn.Module], bool]:
    return lambda block: block.get_submodule(a).weight.shape == block.get_submodule(b).weight.shape


def _llama_like(mlp_norm: str = "post_attention_layernorm", norm_kind: str = "norm") -> LayerMap:
    return LayerMap(
        blocks="model.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", norm_kind,
                       inspect_takes_block_kwargs=True),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), None, "linear", _same_shape("self_attn.v_proj", "self_attn.o_proj")),
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", norm_kind),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), None, "linear"),
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    )


for _t in ("llama", "mistral", "qwen2", "qwen3"):
    LAYER_MAPS.add(_t, _llama_like())
# Gemma's RMSNorm multiplies by (1 + weight); Gemma 2/3 put the MLP input norm in pre_feedforward_layernorm
LAYER_MAPS.add("gemma", _llama_like("post_attention_layernorm", "norm_plus_one"))
for _t in ("gemma2", "gemma3_text"):
    LAYER_MAPS.add(_t, _llama_like("pre_feedforward_layernorm", "norm_plus_one"))

# InternLM2: fused wqkv, wo, w1 (gate) / w3 (up) / w2 (down), attention_norm / ffn_norm
LAYER_MAPS.add("internlm2", LayerMap(
    blocks="model.layers",
    linears=("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"),
    groups=(
        ScaleGroup("attention_norm", ("attention.wqkv",), "attention", "norm", inspect_takes_block_kwargs=True),
        ScaleGroup("ffn_norm", ("feed_forward.w1", "feed_forward.w3"), "feed_forward", "norm"),
        ScaleGroup("feed_forward.w3", ("feed_forward.w2",), None, "linear"),
    ),
    no_clip=("attention.wqkv",),
))


def layer_map_for(model) -> LayerMap:
    return LAYER_MAPS.get(model.config.model_type)


def get_blocks(model, lmap: LayerMap) -> nn.ModuleList:
    return model.get_submodule(lmap.blocks)
