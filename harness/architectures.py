"""Architecture knowledge as data, in one registry used by quantization (which Linears, AWQ's scaling groups),
synthetic checkpoints (every tensor's name and shape) and export alike.

A family (llama, internlm2, ...) names its decoder blocks, its Linears with the role that fixes each one's shape, its
norms, and AWQ's scaling groups (AutoAWQ's `prev_op / layers / module2inspect`). `config.model_type` picks the
family; adding an architecture is one entry here.
"""
from __future__ import annotations

import math
import dataclasses
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
    # the module whose input is the group's input, when the Linears see only part of it (a mixture of experts: each
    # expert's gate/up see their routed tokens, the MoE block all of them); None: the first Linear's input. Such a
    # group does not make its Linears share an observed input (input_keys)
    input: Optional[str] = None
    # modules that read the same input but are not quantized (an MoE's router): their input columns are scaled too,
    # so the FP output stays unchanged
    also_scaled: tuple[str, ...] = ()


@dataclass(frozen=True)
class RotationPoints:
    """Where a QuaRot rotation (quant/rotation) goes, as roles of the block's Linears (linear_roles). The norms that
    feed the residual stream's readers are the scaling groups' norms (`groups`, prev_kind norm | norm_plus_one) and
    the final norm before the LM head; every other Linear of the block must write the residual stream."""

    # None: the residual stream can be rotated exactly (norms fused into their readers, embedding and writers rotated);
    # else why not, and the rotation keeps to the per-head and online rotations, exact on every architecture here
    residual_inexact: Optional[str] = None
    writers: tuple[str, ...] = ("o", "down")  # roles whose output is added to the residual stream
    heads: tuple[str, str] = ("v", "o")  # R2, per attention head: the values' rows, the output's input columns
    online: tuple[str, ...] = ("down",)  # R4: roles whose input gets a Hadamard online (absorbed by their weight)


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
    # mixtures of experts: a routed expert's MLP, the shared expert's, the router and the shared expert's gate
    "expert_gate": lambda d: (d["moe_inter"], d["h"]),
    "expert_up": lambda d: (d["moe_inter"], d["h"]),
    "expert_down": lambda d: (d["h"], d["moe_inter"]),
    "shared_gate_proj": lambda d: (d["shared_inter"], d["h"]),
    "shared_up_proj": lambda d: (d["shared_inter"], d["h"]),
    "shared_down_proj": lambda d: (d["h"], d["shared_inter"]),
    "router": lambda d: (d["experts"], d["h"]),
    "shared_expert_gate": lambda d: (1, d["h"]),
}


def _cfg(c, *keys, default=None):
    """The first of `keys` set in a config (a config.json dict or a transformers config object)."""
    for k in keys:
        v = c.get(k) if isinstance(c, dict) else getattr(c, k, None)
        if v is not None:
            return v
    return default


@dataclass(frozen=True)
class MoE:
    """A sparse mixture-of-experts MLP, as data. Names are relative to the decoder block.

    transformers 5 builds the routed experts as one module holding fused 3-D tensors (`gate_up_proj` [E, 2I, h], gate
    rows first, and `down_proj` [E, h, I]); harness.moe_unfuse replaces it at load time by `experts.<e>.gate_proj /
    up_proj / down_proj` nn.Linears (the per-expert layout of the Qwen-MoE checkpoints and of AutoAWQ/vLLM), so every
    method sees ordinary Linears and a hook on an expert's Linear sees only the tokens routed to it.

    Quantized by default: the experts (and the shared expert). Kept in the model dtype: the router and the shared
    expert's sigmoid gate (tiny, and a rounding error there changes which experts run)."""

    block: str = "mlp"  # the sparse MoE module: the router and every expert read its input
    router: str = "mlp.gate"  # weight [E, h]: softmax over all experts, top-k (transformers' *TopKRouter)
    experts: str = "mlp.experts"
    expert_linears: tuple[tuple[str, str], ...] = (("gate_proj", "expert_gate"), ("up_proj", "expert_up"),
                                                   ("down_proj", "expert_down"))
    num_experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts")
    top_k_key: str = "num_experts_per_tok"
    # top-k weights renormalised to sum 1: True (Mixtral always), or the config key that says (Qwen, OLMoE)
    norm_topk_prob: bool | str = True
    shared_expert: Optional[str] = None  # an always-on MLP beside the routed ones (Qwen2-MoE), quantized
    shared_expert_gate: Optional[str] = None  # its sigmoid gate, weight [1, h]: kept
    n_experts: int = 0  # set by Architecture.bind from the model's config
    top_k: int = 0

    def expert_names(self, e: int) -> tuple[str, ...]:
        return tuple(f"{self.experts}.{e}.{n}" for n, _ in self.expert_linears)

    def kept(self) -> tuple[str, ...]:
        """Linear-like modules of the MoE left in the model dtype (never planned, never quantized)."""
        return (self.router,) + ((self.shared_expert_gate,) if self.shared_expert_gate else ())


# roles of a block's first MLP Linear (the MLP's norms come before it)
_MLP_FIRST = ("gate", "up", "expert_gate", "shared_gate_proj")


def config_dims(c: dict) -> dict:
    """hidden, intermediate, heads, KV heads, head dim, vocabulary, layers of a config.json's dict."""
    nh = c["num_attention_heads"]
    return {"h": c["hidden_size"], "inter": c["intermediate_size"], "nh": nh,
            "nkv": c.get("num_key_value_heads") or nh, "hd": c.get("head_dim") or c["hidden_size"] // nh,
            "vocab": c["vocab_size"], "layers": c["num_hidden_layers"],
            "moe_inter": c.get("moe_intermediate_size") or c["intermediate_size"],
            "shared_inter": c.get("shared_expert_intermediate_size") or c["intermediate_size"],
            "experts": _cfg(c, "num_local_experts", "num_experts", default=0)}


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
    # Linears that read the same input without a scaling group (a routed expert's gate/up: the norm before them feeds
    # every expert, so no single expert's scale can be folded into it); first of each: the observed one
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    moe: Optional[MoE] = None  # a sparse MoE MLP; unbound (n_experts 0) in the registry, bound by `bind`
    rotation: Optional[RotationPoints] = None  # where quant/rotation rotates; None: it refuses this architecture
    # norms inside the attention (Qwen3's per-head q_norm/k_norm): (name relative to the block, width: "hd" one
    # head, "h" every query head, "kv" every KV head); they read no Linear's input, so only `tensors` lists them
    attn_norms: tuple[tuple[str, str], ...] = ()

    def bind(self, hf_config) -> "Architecture":
        """This architecture for one model's config: itself for a dense model; for a mixture of experts, the layer
        map with every expert's Linears spelled out (experts.<e>.gate_proj ...) and MoE.n_experts / top_k set."""
        if self.moe is None or self.moe.n_experts:
            return self
        m = self.moe
        n, k = int(_cfg(hf_config, *m.num_experts_keys, default=0)), int(_cfg(hf_config, m.top_k_key, default=0))
        if n <= 0 or k <= 0:
            raise ValueError(f"{self.family}: the config names no experts ({'/'.join(m.num_experts_keys)}) or no "
                             f"top-k ({m.top_k_key})")
        step, dense = _cfg(hf_config, "decoder_sparse_step", default=1), _cfg(hf_config, "mlp_only_layers", default=[])
        if step != 1 or dense:  # the layer map is one list of Linears for every block
            raise ValueError(f"{self.family}: blocks with a dense MLP among sparse ones (decoder_sparse_step={step}, "
                             f"mlp_only_layers={list(dense)}) are not supported yet: every block must be sparse")
        roles = list(self.linear_roles)
        for e in range(n):
            roles += [(f"{m.experts}.{e}.{rel}", role) for rel, role in m.expert_linears]
        experts = [m.expert_names(e) for e in range(n)]
        # the MLP's norm feeds the router and every expert: one scale for all of them, searched on the MoE block's
        # output over every token (AutoAWQ's Mixtral group), folded into the norm, the router's columns scaled too
        shared = tuple(n for n, r in self.linear_roles if r in ("shared_gate_proj", "shared_up_proj"))
        norm_group = ScaleGroup(self.block_norms[1], tuple(n for ex in experts for n in ex[:2]) + shared, m.block,
                                self.groups[0].prev_kind, input=m.block, also_scaled=m.kept())
        # an expert's up_proj -> down_proj: its own scale, folded inside the expert (exact, as for a dense MLP)
        groups = self.groups + (norm_group,) + tuple(ScaleGroup(ex[1], (ex[2],), None, "linear") for ex in experts)
        return dataclasses.replace(self, linear_roles=tuple(roles), groups=groups,
                                   shared_inputs=self.shared_inputs + tuple(ex[:2] for ex in experts),
                                   moe=dataclasses.replace(m, n_experts=n, top_k=k))

    @property
    def linears(self) -> tuple[str, ...]:
        """The quantized Linears of a block, relative to it."""
        return tuple(n for n, _ in self.linear_roles)

    def input_keys(self) -> dict[str, str]:
        """Linear -> the Linear whose input it shares (the first of its scaling group; itself when alone): the name
        under which a calibrated method observes that input once."""
        keys = {n: n for n in self.linears}
        for names in self.shared_inputs:
            for n in names:
                keys[n] = names[0]
        for g in self.groups:
            if g.input is None:
                for n in g.linears:
                    keys[n] = g.linears[0]
        return keys

    def _kept_roles(self) -> tuple[tuple[str, str], ...]:
        if self.moe is None:
            return ()
        m = self.moe
        return ((m.router, "router"),) + (((m.shared_expert_gate, "shared_expert_gate"),) if m.shared_expert_gate else ())

    def tensors(self, hf_config: dict) -> list[TensorSpec]:
        """Every tensor of a checkpoint with this config, in the model's order (norm names end in .weight)."""
        if self.moe is not None and not self.moe.n_experts:
            return self.bind(hf_config).tensors(hf_config)
        d = config_dims(hf_config)
        out = [TensorSpec(f"{self.embedding}.weight", (d["vocab"], d["h"]), "embedding")]
        for i in range(d["layers"]):
            p = f"{self.blocks}.{i}."
            # a block's first norm feeds attention, the rest sit before the MLP's first Linear
            out.append(TensorSpec(p + self.block_norms[0] + ".weight", (d["h"],), "norm"))
            mlp_start = next(j for j, (_, role) in enumerate(self.linear_roles) if role in _MLP_FIRST)
            for j, (name, role) in enumerate(self.linear_roles):
                if j == mlp_start:
                    width = {"hd": d["hd"], "h": d["nh"] * d["hd"], "kv": d["nkv"] * d["hd"]}
                    out += [TensorSpec(p + n + ".weight", (width[w],), "norm") for n, w in self.attn_norms]
                    out += [TensorSpec(p + n + ".weight", (d["h"],), "norm") for n in self.block_norms[1:]]
                    # the router (and the shared expert's gate) read the MLP's input: kept in the model dtype
                    out += [TensorSpec(p + n, _ROLE_SHAPES[r](d), "kept_linear") for n, r in self._kept_roles()]
                out.append(TensorSpec(p + name, _ROLE_SHAPES[role](d), "linear"))
        out.append(TensorSpec(f"{self.final_norm}.weight", (d["h"],), "norm"))
        if not hf_config.get("tie_word_embeddings", False):
            out.append(TensorSpec(self.lm_head, (d["vocab"], d["h"]), "lm_head"))
        return out


def parameter_count(arch: Architecture, hf_config: dict) -> dict:
    n = {"linear": 0, "embedding": 0, "lm_head": 0, "norm": 0}
    for t in arch.tensors(hf_config):
        n[t.kind] = n.get(t.kind, 0) + math.prod(t.shape)  # kept_linear: an MoE's router, in the model dtype
    n["total"] = sum(n.values())
    # weights in a matrix product per token: linears plus the LM head (the tied embedding when there is none)
    n["matmul"] = n["linear"] + (n["lm_head"] or n["embedding"])
    return n


ARCHITECTURES: Registry[Architecture] = Registry("architecture (by config.model_type)")
FAMILIES: Registry[Architecture] = Registry("architecture family")


def _same_shape(a: str, b: str) -> Callable[[nn.Module], bool]:
    return lambda block: block.get_submodule(a).weight.shape == block.get_submodule(b).weight.shape


def _llama_like(family: str, mlp_norm: str = "post_attention_layernorm", norm_kind: str = "norm",
                rotation: Optional[RotationPoints] = RotationPoints()) -> Architecture:
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
        rotation=rotation,
    )


LLAMA = FAMILIES.add("llama", _llama_like("llama"))
for _t in ("llama", "mistral", "qwen2", "qwen3"):
    ARCHITECTURES.add(_t, LLAMA)
# Gemma's RMSNorm multiplies by (1 + weight); Gemma 2/3 put the MLP input norm in pre_feedforward_layernorm
ARCHITECTURES.add("gemma", FAMILIES.add("gemma", _llama_like("gemma", "post_attention_layernorm", "norm_plus_one")))
# Gemma 2/3's sandwich norms scale each branch's output by (1 + w) before it joins the residual stream: a rotation
# of the stream would have to commute with that diagonal, which no dense orthogonal matrix does
_GEMMA2 = FAMILIES.add("gemma2", _llama_like("gemma2", "pre_feedforward_layernorm", "norm_plus_one", RotationPoints(
    residual_inexact="sandwich norms (post_attention_layernorm, post_feedforward_layernorm) scale each branch's "
                     "output by (1 + w) before the residual add; no rotation of the stream commutes with them")))
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



def _moe_like(family: str, moe: MoE, attn_norms: tuple[tuple[str, str], ...] = ()) -> Architecture:
    """A Llama-like block whose MLP is a sparse MoE (transformers 5: `mlp.gate` router, `mlp.experts`). AWQ's groups
    are the attention's and, once bound, each expert's up -> down; the post-attention norm feeds the router and every
    expert, so a scale folded into it must be searched over all experts together (not a per-expert group)."""
    dense = _llama_like(family)
    attn = tuple((n, r) for n, r in dense.linear_roles if n.startswith("self_attn."))
    roles, groups, shared = attn, dense.groups[:2], ()
    if moe.shared_expert:
        se = moe.shared_expert
        roles += ((f"{se}.gate_proj", "shared_gate_proj"), (f"{se}.up_proj", "shared_up_proj"),
                  (f"{se}.down_proj", "shared_down_proj"))
        groups += (ScaleGroup(f"{se}.up_proj", (f"{se}.down_proj",), None, "linear"),)
        shared = ((f"{se}.gate_proj", f"{se}.up_proj"),)
    # no rotation points yet: the router and every expert would need theirs
    return dataclasses.replace(dense, linear_roles=roles, groups=groups, shared_inputs=shared, moe=moe, rotation=None,
                               attn_norms=attn_norms)


# Mixtral: softmax over the experts, top-2, renormalised; every expert's intermediate size is intermediate_size
ARCHITECTURES.add("mixtral", FAMILIES.add("mixtral", _moe_like("mixtral", MoE())))
# Qwen3-MoE: expert size moe_intermediate_size; renormalised top-k only when config.norm_topk_prob
ARCHITECTURES.add("qwen3_moe", FAMILIES.add("qwen3_moe", _moe_like("qwen3_moe", MoE(norm_topk_prob="norm_topk_prob"),
                                                                  (("self_attn.q_norm", "hd"), ("self_attn.k_norm", "hd")))))
# Qwen2-MoE: Qwen3-MoE's routed experts plus an always-on shared expert (quantized) behind a sigmoid gate (kept)
ARCHITECTURES.add("qwen2_moe", FAMILIES.add("qwen2_moe", _moe_like("qwen2_moe", MoE(
    norm_topk_prob="norm_topk_prob", shared_expert="mlp.shared_expert",
    shared_expert_gate="mlp.shared_expert_gate"))))
# OLMoE: Mixtral's layout (q_norm/k_norm, over all heads, on the attention's outputs change no Linear's input)
ARCHITECTURES.add("olmoe", FAMILIES.add("olmoe", _moe_like("olmoe", MoE(norm_topk_prob="norm_topk_prob"),
                                                          (("self_attn.q_norm", "h"), ("self_attn.k_norm", "kv")))))


def architecture_for(model) -> Architecture:
    """The layer map of a loaded model (a mixture of experts: bound to its config, every expert spelled out)."""
    return ARCHITECTURES.get(model.config.model_type).bind(model.config)


def get_blocks(model, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)
