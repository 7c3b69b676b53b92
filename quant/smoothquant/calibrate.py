"""Calibration statistics as LMDeploy's `calibrate` collects them for `smooth_quant` (lite/quantization/
calibration.py `CalibrationContext`, activation/observer.py `ActivationObserver.absmax_val`): the per-input-channel
max |x| of every observed Linear's input over every calibration token, from one pass of the unquantized model.
(Smoothing leaves the FP model's outputs unchanged, so statistics from one FP pass equal those a block-by-block pass
would see; nothing is quantized until every scale is folded.)"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.awq.search import act_absmax

MINIBATCH = 16  # sequences per forward


@torch.no_grad()
def input_absmax(model: nn.Module, base: nn.Module, names: list[str], samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> fp32 max|x| per input channel of the module `name` (qualified in `model`), over all `samples`
    [n, seqlen] run through `base` (the decoder without the LM head, as LMDeploy runs `model.model`)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(_mod, args):
            m = act_absmax(args[0])
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for i in range(0, samples.shape[0], MINIBATCH):
            base(input_ids=samples[i : i + MINIBATCH].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for n, m in stats.items():
        if not bool(torch.isfinite(m).all()):
            raise FloatingPointError(f"calibration activations at the input of {n} contain NaN/Inf "
                                     f"(check model.dtype and the calibration data)")
    return stats
