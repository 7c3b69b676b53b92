"""Routed experts as ordinary Linears. transformers 5 builds a mixture of experts' routed experts as one module holding
fused 3-D tensors (`gate_up_proj` [E, 2I, h] with the gate rows first, `down_proj` [E, h, I]); `unfuse_experts`
replaces that module, in every block, by `UnfusedExperts`: `experts.<e>.gate_proj / up_proj / down_proj` nn.Linears
(the per-expert layout of the Qwen-MoE checkpoints, AutoAWQ and vLLM) with the same forward, token for token.

Done once, when the model loads (harness.models.load_model), so every stage after it (the layer plan, the calibration
runner's per-Linear hooks, the quantized cache, export) sees ordinary Linears, and a hook on an expert's Linear sees
exactly the tokens routed to it. Lives in harness, not quant, because loading does it (a layer never imports a
higher one)."""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.architectures import ARCHITECTURES, get_blocks


class Expert(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x)), a dense Llama MLP of the expert's size."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return lin


class UnfusedExperts(nn.ModuleList):
    """The routed experts as a list of Expert modules, called like transformers' fused *Experts module:
    (hidden_states [N, h], top_k_index [N, k], top_k_weights [N, k]) -> [N, h]. The same loop as transformers'
    eager implementation: each expert that received tokens runs on those tokens only, its output weighted by the
    router's weight (upcast as the weights are) and summed into the token's row."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, N]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(mask[e])
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_module(fused: nn.Module) -> UnfusedExperts:
    """The UnfusedExperts of one fused experts module (its tensors copied, so the fused one can be freed)."""
    if getattr(fused, "gate_up_proj_bias", None) is not None or getattr(fused, "has_bias", False):
        raise NotImplementedError(f"{type(fused).__name__}: fused experts with biases are not supported")
    gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
    n, two_i, h = gate_up.shape
    if down.shape != (n, h, two_i // 2):
        raise ValueError(f"{type(fused).__name__}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                         f"{tuple(down.shape)} are not the [E, 2I, h] / [E, h, I] layout")
    i = two_i // 2
    return UnfusedExperts([Expert(gate_up[e, :i], gate_up[e, i:], down[e], fused.act_fn) for e in range(n)])


@torch.no_grad()
def unfuse_experts(model) -> int:
    """Replace the fused routed experts of every block of a registered MoE architecture by UnfusedExperts, in
    place; returns how many blocks changed (0 for a dense model, an unregistered one, or one already unfused)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES or ARCHITECTURES.get(model_type).moe is None:
        return 0
    arch = ARCHITECTURES.get(model_type).bind(model.config)
    changed = 0
    for block in get_blocks(model, arch):
        fused = block.get_submodule(arch.moe.experts)
        if isinstance(fused, UnfusedExperts):
            continue
        new = unfuse_module(fused)
        if len(new) != arch.moe.n_experts:
            raise ValueError(f"{model_type}: {len(new)} experts in the weights, {arch.moe.n_experts} in the config")
        block.set_submodule(arch.moe.experts, new)
        changed += 1
    return changed
