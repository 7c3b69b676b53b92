"""Architecture knowledge as data, in one registry used by quantization (which Linears, AWQ's scaling groups),
synthetic checkpoints (every tensor's name and shape) and export alike.

A family (llama, internlm2, ...) names its decoder blocks, its Linears with the role that fixes each one's shape, its
norms, and AWQ's scaling groups (AutoAWQ's `prev_op / layers / module2inspect`). `config.model_type` picks the
family; adding an architecture is one entry here.
"""
from __future__ import annotations

import math
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
class TensorSpec:
    name: str  # for a linear layer: the module name, without .weight
    shape: tuple[int, ...]  # linear: (out_features, in_features), as in nn.Linear
    kind: str  # linear | embedding | lm_head | norm


# (out_features, in_features) of a Linear by its role, from the config's dimensions
_ROLE_SHAPES: dict[str, Callable[[dict], tuple[int, int]]] = {
    "q": lambda d: (d["nh"] * d["hd"], d["h"]),
    "k": lambda d: (d["nkv"] * d["hd"], d["h"]),
    "v": lambda d: (d["nkv"] * d["hd"], d["h"]),
    "qkv": lambda d: ((d["nh"] + 2 * d["nkv"]) * d["hd"], d["h"]),
    "o": lambda d: (d["h"], d["nh"] * d["hd"]),
    "gate": lambda d: (d["inter"], d["h"]),
    "up": lambda d: (d["inter"], d["h"]),
    "down": lambda d: (d["h"], d["inter"]),
}


def config_dims(c: dict) -> dict:
    """hidden, intermediate, heads, KV heads, head dim, vocabulary, layers of a config.json's dict."""
    nh = c["num_attention_heads"]
    return {"h": c["hidden_size"], "inter": c["intermediate_size"], "nh": nh,
            "nkv": c.get("num_key_value_heads") or nh, "hd": c.get("head_dim") or c["hidden_size"] // nh,
            "vocab": c["vocab_size"], "layers": c["num_hidden_layers"]}


@dataclass(frozen=True)
class Architecture:
    family: str
    linear_roles: tuple[tuple[str, str], ...]  # (Linear of a block, relative to it; its role in _ROLE_SHAPES)
    block_norms: tuple[str, ...]  # norm weights of a block, relative to it
    groups: tuple[ScaleGroup, ...]
    # Linears whose clipping search llm-awq skips: q/k feed the softmax, where output MSE is a poor proxy
    no_clip: tuple[str, ...] = ()
    blocks: str = "model.layers"  # attribute path of the nn.ModuleList of decoder blocks
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        """The quantized Linears of a block, relative to it."""
        return tuple(n for n, _ in self.linear_roles)

    def input_keys(self) -> dict[str, str]:
        """Linear -> the Linear whose input it shares (the first of its scaling group; itself when alone): the name
        under which a calibrated method observes that input once."""
        keys = {n: n for n in self.linears}
        for g in self.groups:
            for n in g.linears:
                keys[n] = g.linears[0]
        return keys

    def tensors(self, hf_config: dict) -> list[TensorSpec]:
        """Every tensor of a checkpoint with this config, in the model's order (norm names end in .weight)."""
        d = config_dims(hf_config)
        out = [TensorSpec(f"{self.embedding}.weight", (d["vocab"], d["h"]), "embedding")]
        for i in range(d["layers"]):
            p = f"{self.blocks}.{i}."
            # a block's first norm feeds attention, the rest sit before the MLP's first Linear
            out.append(TensorSpec(p + self.block_norms[0] + ".weight", (d["h"],), "norm"))
            mlp_start = next(j for j, (_, role) in enumerate(self.linear_roles) if role in ("gate", "up"))
            for j, (name, role) in enumerate(self.linear_roles):
                if j == mlp_start:
                    out += [TensorSpec(p + n + ".weight", (d["h"],), "norm") for n in self.block_norms[1:]]
                out.append(TensorSpec(p + name, _ROLE_SHAPES[role](d), "linear"))
        out.append(TensorSpec(f"{self.final_norm}.weight", (d["h"],), "norm"))
        if not hf_config.get("tie_word_embeddings", False):
            out.append(TensorSpec(self.lm_head, (d["vocab"], d["h"]), "lm_head"))
        return out


def parameter_count(arch: Architecture, hf_config: dict) -> dict:
    n = {"linear": 0, "embedding": 0, "lm_head": 0, "norm": 0}
    for t in arch.tensors(hf_config):
        n[t.kind] += math.prod(t.shape)
    n["total"] = sum(n.values())
    # weights in a matrix product per token: linears plus the LM head (the tied embedding when there is none)
    n["matmul"] = n["linear"] + (n["lm_head"] or n["embedding"])
    return n


ARCHITECTURES: Registry[Architecture] = Registry("architecture (by config.model_type)")
FAMILIES: Registry[Architecture] = Registry("architecture family")


def _same_shape(a: str, b: str) -> Callable[[nn.Module], bool]:
    return lambda block: block.get_submodule(a).weight.shape == block.get_submodule(b).weight.shape


def _llama_like(family: str, mlp_norm: str = "post_attention_layernorm", norm_kind: str = "norm") -> Architecture:
    return Architecture(
        family=family,
        linear_roles=(("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                      ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                      ("mlp.down_proj", "down")),
        block_norms=("input_layernorm", mlp_norm),
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", norm_kind,
                       inspect_takes_block_kwargs=True),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), None, "linear", _same_shape("self_attn.v_proj", "self_attn.o_proj")),
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", norm_kind),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), None, "linear"),
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    )


LLAMA = FAMILIES.add("llama", _llama_like("llama"))
for _t in ("llama", "mistral", "qwen2", "qwen3"):
    ARCHITECTURES.add(_t, LLAMA)
# Gemma's RMSNorm multiplies by (1 + weight); Gemma 2/3 put the MLP input norm in pre_feedforward_layernorm
ARCHITECTURES.add("gemma", FAMILIES.add("gemma", _llama_like("gemma", "post_attention_layernorm", "norm_plus_one")))
_GEMMA2 = FAMILIES.add("gemma2", _llama_like("gemma2", "pre_feedforward_layernorm", "norm_plus_one"))
for _t in ("gemma2", "gemma3_text"):
    ARCHITECTURES.add(_t, _GEMMA2)

# InternLM2: fused wqkv, wo, w1 (gate) / w3 (up) / w2 (down), attention_norm / ffn_norm, `output` as the LM head
ARCHITECTURES.add("internlm2", FAMILIES.add("internlm2", Architecture(
    family="internlm2",
    linear_roles=(("attention.wqkv", "qkv"), ("attention.wo", "o"), ("feed_forward.w1", "gate"),
                  ("feed_forward.w3", "up"), ("feed_forward.w2", "down")),
    block_norms=("attention_norm", "ffn_norm"),
    groups=(
        ScaleGroup("attention_norm", ("attention.wqkv",), "attention", "norm", inspect_takes_block_kwargs=True),
        ScaleGroup("ffn_norm", ("feed_forward.w1", "feed_forward.w3"), "feed_forward", "norm"),
        ScaleGroup("feed_forward.w3", ("feed_forward.w2",), None, "linear"),
    ),
    no_clip=("attention.wqkv",),
    embedding="model.tok_embeddings",
    lm_head="output",
)))


def architecture_for(model) -> Architecture:
    return ARCHITECTURES.get(model.config.model_type)


def get_blocks(model, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)
