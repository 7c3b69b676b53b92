"""The preamble every method shares, run by quant.registry.Method before the method's own `quantize`, so a bad config,
an unsupported architecture, a group size that does not divide a layer or a calibration token outside the vocabulary
fails before any long work; and the summary every method's record carries (layers, placement, bytes)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from harness.architectures import Architecture, architecture_for
from harness.config import MoEConfig, QuantConfig, WeightQuantConfig
from quant.moe.coverage import expert_calibration
from quant.onload import Placement
from quant.surgery import LayerPlan, plan_layers


@dataclass
class Setup:
    """What a method's `quantize` starts from."""

    arch: Architecture  # the model's layer map (harness.architectures)
    plan: Optional[LayerPlan]  # one LayerSpec per Linear for a weight-only config (quant.surgery), else None
    samples: Optional[torch.Tensor]  # calibration token ids [n_samples, seqlen] (a method that calibrates), else None
    placement: Placement  # where blocks compute and weights rest (quant.onload)
    started_s: float  # time.perf_counter() when the setup began: the method's total time counts from here
    samples_s: float = 0.0  # seconds spent drawing the calibration samples
    # how the calibration runner treats routed experts (the config's quant.moe; the defaults for a method without one)
    moe: MoEConfig = field(default_factory=MoEConfig)


def setup(model, cfg: QuantConfig, ctx, needs_calibration: bool) -> Setup:
    started = time.perf_counter()
    cfg.validate()
    arch = architecture_for(model)  # unsupported architecture: fails here, naming the registry
    plan = plan_layers(model, cfg) if isinstance(cfg, WeightQuantConfig) else None  # bad group size or override
    moe = expert_calibration(cfg, arch)  # quant.moe other than its defaults on a dense model: refused
    samples, t = None, time.perf_counter()
    if needs_calibration:
        samples = ctx.calibration()
        check_token_ids(samples, model)
    return Setup(arch, plan, samples, ctx.placement, started, time.perf_counter() - t, moe)


def check_token_ids(samples: torch.Tensor, model) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(samples.max()) >= vocab:
        raise ValueError(f"calibration token id {int(samples.max())} is outside the model's vocabulary ({vocab})")
