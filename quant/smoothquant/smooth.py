"""Folding SmoothQuant's scales into a decoder block (LMDeploy lite/quantization/awq.py `smooth_layers`): for each
scaling group of the architecture's layer map (harness.architectures: norm -> q/k/v, v -> o when the shapes allow it,
norm -> gate/up, up -> down; the same pairs as LMDeploy's NORM_FCS_MAP / FC_FCS_MAP, with v -> o skipped under
grouped-query attention as `smooth_fc_fcs` skips it), s from the group input's max|x| and the group's weights, folded
with the repo's fold helpers (quant.awq.fold): the previous op divided by s, the Linears' input columns multiplied."""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.architectures import Architecture
from quant.awq.fold import apply_scale_
from quant.awq.search import weight_absmean
from quant.smoothquant.numerics import smooth_scale


def _keep(prev: nn.Module, kind: str) -> torch.Tensor | None:
    """Channels a norm can scale: `smooth_ln_fcs` leaves s = 1 where the norm's weight is 0 (its output is 0 there)."""
    if kind == "norm":
        return prev.weight.detach().float() != 0
    if kind == "norm_plus_one":
        return (1.0 + prev.weight.detach().float()) != 0
    return None


@torch.no_grad()
def smooth_block_(block: nn.Module, arch: Architecture, x_absmax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Fold every applicable group's scale into `block` in place. `x_absmax`: group's first Linear (relative name) ->
    max|x| of its input. Returns first Linear -> s. Every s is computed from the block as it was (LMDeploy smooths the
    norms first, then the Linear pairs; no group's statistic reads a weight an earlier fold changed)."""
    plans = []
    for grp in arch.groups:
        if grp.when is not None and not grp.when(block):
            continue
        lins = [block.get_submodule(n) for n in grp.linears]
        w_stat = weight_absmean([lin.weight for lin in lins], -1)  # LMDeploy get_weight_scale, group_size -1
        s = smooth_scale(x_absmax[grp.linears[0]], w_stat, alpha, _keep(block.get_submodule(grp.prev_op), grp.prev_kind))
        plans.append((grp, s))
    for grp, s in plans:
        apply_scale_(block, grp.prev_op, grp.prev_kind, grp.linears, s)
    return {grp.linears[0]: s for grp, s in plans}
