"""GPTQ W4A16 block by block on the shared sequential runner (quant/calibration/runner.py), as llm-compressor's
sequential pipeline runs it:

for each decoder block, with the block's inputs from the already quantized blocks before it (propagate=quantized):
  1. run the block on this rank's calibration sequences, accumulating the Hessian H = 2/n sum x x^T of every distinct
     Linear input (q/k/v share one, gate/up share one: the layer map's scaling groups), all-reduced over ranks;
  2. quantize every Linear with GPTQ (quant/gptq/algorithm.py) to its LayerSpec (bits and group size on the integer
     grid, or an FP4 format); Linears that share an input are quantized as one matrix (their rows stacked: GPTQ treats
     rows independently given H, so the codes are the same; an NVFP4 global scale stays per Linear);
  3. the runner runs the quantized block to get the next block's inputs (llm-compressor propagates through the
     quantized block; AutoGPTQ does too). Finished blocks are checkpointed, so a killed run resumes inside itself.
"""
from __future__ import annotations

import time

import torch

from harness.architectures import Architecture
from quant.calibration.reduce import Reducer
from quant.calibration.runner import BlockResult, run_sequential
from quant.gptq.algorithm import accumulate_hessian, gptq_quantize
from quant.gptq.config import GPTQConfig
from quant.registry import Method, QuantContext, QuantOutcome, method
from quant.setup import Setup
from quant.surgery import format_summary


class HessianObserver:
    """The running average H = 2/n sum x x^T of one Linear input over this rank's tokens; `result` reduces it over
    ranks as a sum of H * n and of n, so every rank gets the Hessian of all calibration tokens."""

    def __init__(self):
        self.H, self.n = None, 0

    def add(self, x: torch.Tensor) -> None:
        self.H, self.n = accumulate_hessian(self.H, self.n, x)

    def result(self, reduce: Reducer) -> torch.Tensor:
        if not reduce.parallel:
            return self.H
        (n,) = reduce.sum_float(self.n)
        return reduce.sum(self.H * self.n) / n


class GPTQBlocks:
    """GPTQ's per-block step for the sequential runner (quant.calibration.runner.BlockMethod)."""

    def __init__(self, cfg, arch: Architecture, specs: dict):
        self.cfg, self.arch, self.specs = cfg, arch, specs
        keys = arch.input_keys()  # Linear -> the Linear whose input it shares
        self.shared: dict[str, list[str]] = {}
        for rel in arch.linears:
            self.shared.setdefault(keys[rel], []).append(rel)

    def observers(self, block, index: int) -> dict:
        return {key: HessianObserver() for key in self.shared}

    @torch.no_grad()
    def quantize_block(self, block, index: int, stats: dict, kwargs, reduce: Reducer) -> BlockResult:
        g, prefix = self.cfg, f"{self.arch.blocks}.{index}"
        done, losses = {}, {}
        t = time.perf_counter()
        for key, rels in self.shared.items():
            H = stats[key]
            if not torch.isfinite(H).all():
                raise FloatingPointError(f"calibration activations at the input of {prefix}.{key} contain NaN/Inf "
                                         f"(check model.dtype and the calibration data)")
            rels = [r for r in rels if not self.specs[f"{prefix}.{r}"].skip]
            if not rels:
                continue
            shape = lambda r: (self.specs[f"{prefix}.{r}"].w_bit, self.specs[f"{prefix}.{r}"].group_size,  # noqa: E731
                               self.specs[f"{prefix}.{r}"].zero_point, self.specs[f"{prefix}.{r}"].format)
            groups = [[r for r in rels if shape(r) == s] for s in sorted({shape(r) for r in rels})]
            for members in groups:  # Linears of one input with the same bits, grouping, format: one stacked matrix
                sp = self.specs[f"{prefix}.{members[0]}"]
                lins = [block.get_submodule(r) for r in members]
                W = torch.cat([lin.weight for lin in lins])
                try:
                    res = gptq_quantize(W, H.clone(), sp.w_bit, sp.group_size, sp.zero_point, g.damp_percent,
                                        g.block_size, g.act_order, g.static_groups, g.grid, fmt=sp.format,
                                        segments=[lin.out_features for lin in lins])
                except FloatingPointError as e:
                    raise FloatingPointError(f"{prefix}.{key}: {e}") from None
                losses[f"{key}:{'+'.join(members)}"] = float(res.loss)
                r0 = 0
                for rel, lin in zip(members, lins):
                    qt = res.to_qtensor(slice(r0, r0 + lin.out_features))
                    r0 += lin.out_features
                    lin.weight.data.copy_(qt.dequantize(lin.weight.dtype))
                    done[rel] = qt
        return BlockResult(done, {"loss": losses, "seconds": time.perf_counter() - t})


def run_gptq(model, cfg, ctx: QuantContext, setup: Setup) -> tuple:
    """GPTQ over every block of `model` on the setup's samples, architecture and plan (AWQ->GPTQ calls it after
    AWQ's fold); returns (the runner's RunResult: qtensors, block seconds, the block it resumed from; losses, timings)."""
    arch = setup.arch
    propagate = "quantized" if getattr(cfg, "propagate", "auto") == "auto" else cfg.propagate
    # the block checkpoints (quant.calibration.checkpoint) read codes back as integer QTensors, without an FP4
    # format or NVFP4's global scale: an FP4 run keeps none (it is not resumable) rather than resume with wrong codes
    ckpt = ctx.checkpoint_dir if cfg.format == "int" else None
    run = run_sequential(model, arch, GPTQBlocks(cfg, arch, setup.plan.specs), setup.samples, setup.placement,
                         propagate=propagate, checkpoint_dir=ckpt, reduce=Reducer.current(),
                         desc=f"gptq {cfg.format if cfg.format != 'int' else f'w{cfg.w_bit} g{cfg.group_size}'}",
                         progress=ctx.progress, experts=setup.moe)
    losses = {f"{arch.blocks}.{i}.{k}": v for i, info in enumerate(run.infos) for k, v in info["loss"].items()}
    timings = {"calibration_capture": run.timings_s["calibration_capture"],
               "block_forward": run.timings_s["block_forward"],
               "gptq": sum(info["seconds"] for info in run.infos)}
    return run, losses, timings


@method
class GPTQ(Method):
    name, config = "gptq", GPTQConfig
    needs_calibration = True
    formats = ("awq", "compressed-tensors")  # static groups: g_idx = k // g, which both layouts imply
    rounds = True
    streams = True  # one pass over the blocks in order (quant.streaming)

    def quantize(self, model, cfg: GPTQConfig, ctx, setup: Setup) -> QuantOutcome:
        run, losses, timings = run_gptq(model, cfg, ctx, setup)
        summary = self.summary(
            cfg, setup, model, run.qtensors, damp_percent=cfg.damp_percent, block_size=cfg.block_size,
            act_order=cfg.act_order, static_groups=cfg.static_groups, grid=cfg.grid, propagate="quantized",
            gptq_loss=losses,  # GPTQ's own error estimate per quantized input group (AutoGPTQ logs it as "avg loss")
            block_seconds=run.block_seconds, resumed_from_block=run.resumed_from, **format_summary(cfg))
        return QuantOutcome(summary=summary, timings_s=timings, qtensors=run.qtensors)
