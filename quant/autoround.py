"""AutoRound (SignRound: Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization
of LLMs"; the `auto-round` package's algorithm) W4A16 block by block on the shared sequential runner
(quant/calibration/runner.py):

for each decoder block, with the block's inputs x from the runner (propagate=quantized: the quantized blocks before
it, as the package's enable_quanted_input) and its FP outputs y = block(x) as the target:
  1. every Linear gets learnable rounding offsets V [out, in] (init 0, in [-0.5, 0.5]) and, per group, min/max
     clipping factors alpha, beta (init 1, in [0.5, 1]: paper section 3); its weight is quantize-dequantized as
        s = (beta max(W) - alpha min(W)) / (2^b - 1),  z = round(-alpha min(W) / s),
        W~ = s (clamp(round(W / s + V) + z, 0, 2^b - 1) - z)
     with a straight-through estimator for round (at V = 0, alpha = beta = 1 this is RTN's grid exactly);
  2. `iters` steps of signed gradient descent (SignSGD: p -= lr sign(grad)) on the MSE between the block's output
     with W~ and y, over a minibatch of `batch_size` sequences per step, lr = 1/iters by default decayed linearly to 0
     (the package's LinearLR), the parameters of the best minibatch loss kept (the package's best-MSE snapshot);
  3. every Linear rounded once more, in fp32, with the best V, alpha, beta into integer codes, scales and zeros
     (quant.primitives.QTensor: RTN's layout, so AWQ export and the W4A16 kernels take them).
The forward and backward run under bf16 autocast when the block is fp32 (`amp`; the package's default); a bf16 or
fp16 block trains in its own dtype. Finished blocks are checkpointed by the runner, and each block draws its
minibatches from its own seeded generator, so a resumed run is the same run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from harness.config import CalibConfig, MoEConfig, WeightQuantConfig, _require
from quant.calibration.capture import MINIBATCH, block_out, forward_block, slice_batch
from quant.calibration.reduce import Reducer
from quant.calibration.runner import PROPAGATE, BlockResult, Keep, run_sequential
from quant.primitives import SCALE_EPS, QTensor, _grouped, effective_group_size
from quant.registry import Method, QuantContext, QuantOutcome, method
from quant.setup import Setup

V_RANGE = (-0.5, 0.5)  # rounding offsets: at most half a step either way (paper section 3)
MINMAX_RANGE = (0.5, 1.0)  # clipping factors of each group's min and max (paper section 3; the package clamps [0, 1])
# (At the default lr = 1/iters decayed linearly to 0 a parameter moves at most (iters + 1) / (2 iters) in all, so the
# bounds bind only for a larger lr: the paper's and the package's ranges give the same result there.)


@dataclass
class AutoRoundConfig(WeightQuantConfig):
    """SignRound's knobs, the `auto-round` package's defaults (its nsamples x seqlen are quant.calib's)."""

    method: str = "autoround"
    iters: int = 200  # SignSGD steps per block
    lr: Optional[float] = None  # of the rounding offsets V; None: 1 / iters
    minmax_lr: Optional[float] = None  # of the clipping factors alpha, beta; None: lr
    batch_size: int = 8  # calibration sequences per step
    enable_minmax_tuning: bool = True  # tune alpha, beta (else the group's full range, RTN's)
    amp: bool = True  # an fp32 block trains under bf16 autocast (the final rounding is fp32 either way)
    # the next block's inputs: the quantized block's outputs (the package's enable_quanted_input) or the FP block's
    propagate: str = "quantized"
    seed: int = 0  # the minibatch draws (each block its own generator: seed, block index)
    calib: CalibConfig = field(default_factory=CalibConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)  # routed experts' calibration (a mixture of experts only)
    late_fields = WeightQuantConfig.late_fields + ("moe",)

    @property
    def round_lr(self) -> float:
        return 1.0 / max(self.iters, 1) if self.lr is None else self.lr

    @property
    def clip_lr(self) -> float:
        return self.round_lr if self.minmax_lr is None else self.minmax_lr

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        text, key = WeightQuantConfig.label_detail(q)
        iters = q.get("iters", 200)
        return text + (f" ({iters} iters)" if iters != 200 else ""), key

    def validate(self) -> "AutoRoundConfig":
        super().validate()
        _require(self.iters >= 0, "quant.iters", f"must be >= 0 (0: RTN's codes), got {self.iters}")
        for name in ("lr", "minmax_lr"):
            v = getattr(self, name)
            _require(v is None or v > 0, f"quant.{name}", f"must be > 0 or null (the default), got {v}")
        # the block kwargs (masks, rotary tables) are captured for the runner's minibatch of MINIBATCH sequences
        _require(1 <= self.batch_size <= MINIBATCH, "quant.batch_size",
                 f"must be in 1..{MINIBATCH} (the runner's minibatch), got {self.batch_size}")
        _require(self.propagate in PROPAGATE, "quant.propagate",
                 f"{self.propagate!r} is not one of {', '.join(PROPAGATE)}")
        self.calib.validate()
        self.moe.validate()
        return self


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def signround_qdq(w: torch.Tensor, v: torch.Tensor, alpha: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                  w_bit: int, group_size: int, zero_point: bool = True, ste: bool = True):
    """SignRound's quantize-dequantize of w [out, in] with rounding offsets v [out, in] and clipping factors alpha,
    beta [out, n_groups] of each group's min and max (None: 1). Returns (w~ [out, in], codes [out, in] as floats,
    scales, zeros [out, n_groups]; zeros None when symmetric). `ste`: differentiable in v, alpha, beta through
    round_ste; False: plain rounding (the final codes). At v = 0, alpha = beta = 1 it is quant.primitives' RTN grid."""
    rnd = round_ste if ste else torch.round
    wg = _grouped(w, group_size)
    vg = v.reshape(wg.shape)
    mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
    if alpha is not None:
        mn, mx = mn * alpha, mx * beta
    if zero_point:
        max_int = 2**w_bit - 1
        scales = (mx - mn).clamp(min=SCALE_EPS) / max_int
        zeros = (-rnd(mn / scales)).clamp(0, max_int)
        q = torch.clamp(rnd(wg / scales[..., None] + vg) + zeros[..., None], 0, max_int)
        w_hat = (q - zeros[..., None]) * scales[..., None]
    else:
        max_int = 2 ** (w_bit - 1) - 1
        scales = torch.maximum(-mn, mx).clamp(min=SCALE_EPS) / max_int
        zeros = None
        q = torch.clamp(rnd(wg / scales[..., None] + vg), -max_int - 1, max_int)
        w_hat = q * scales[..., None]
    return w_hat.reshape(w.shape), q.reshape(w.shape), scales, zeros


class BlockTuner:
    """SignRound's state for one block: per tuned Linear (name relative to the block) its fp32 weight, V and alpha,
    beta; `loss` runs the block with the quantize-dequantized weights, `step` is one SignSGD step."""

    def __init__(self, block: nn.Module, specs: dict, enable_minmax_tuning: bool = True):
        self.block, self.specs = block, specs  # rel -> LayerSpec (not skipped)
        self.w, self.v, self.alpha, self.beta = {}, {}, {}, {}
        for rel, sp in specs.items():
            w = block.get_submodule(rel).weight.detach()
            n_groups = w.shape[1] // effective_group_size(w.shape[1], sp.group_size)
            pdtype = torch.float64 if w.dtype == torch.float64 else torch.float32  # the package's params are fp32
            self.w[rel] = w.to(pdtype, copy=True)  # never the module's own tensor: `finish` writes that one
            self.v[rel] = torch.zeros(w.shape, dtype=pdtype, device=w.device, requires_grad=True)
            if enable_minmax_tuning:
                self.alpha[rel] = torch.ones(w.shape[0], n_groups, dtype=pdtype, device=w.device, requires_grad=True)
                self.beta[rel] = torch.ones(w.shape[0], n_groups, dtype=pdtype, device=w.device, requires_grad=True)

    def round_params(self) -> list[torch.Tensor]:
        return list(self.v.values())

    def minmax_params(self) -> list[torch.Tensor]:
        return list(self.alpha.values()) + list(self.beta.values())

    def state(self) -> dict:
        """A copy of V, alpha, beta (the best-loss snapshot)."""
        return {k: {rel: p.detach().clone() for rel, p in d.items()}
                for k, d in (("v", self.v), ("alpha", self.alpha), ("beta", self.beta))}

    def qdq(self, rel: str, ste: bool = True):
        sp = self.specs[rel]
        return signround_qdq(self.w[rel], self.v[rel], self.alpha.get(rel), self.beta.get(rel), sp.w_bit,
                             sp.group_size, sp.zero_point, ste)

    def loss(self, x: torch.Tensor, y: torch.Tensor, kwargs: dict, amp: bool = True) -> torch.Tensor:
        """MSE (fp32, mean) between the block's output on x with every tuned Linear's w~ and the target y."""
        weights = {f"{rel}.weight": self.qdq(rel)[0].to(self.block.get_submodule(rel).weight.dtype)
                   for rel in self.specs}
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp and x.dtype == torch.float32):
            out = block_out(functional_call(self.block, weights, (x,), slice_batch(kwargs, x.shape[0]), strict=False))
        return F.mse_loss(out.float(), y.float())

    @torch.no_grad()
    def step(self, lr: float, minmax_lr: float, reduce: Reducer = Reducer()) -> None:
        """p -= lr sign(grad) (gradients summed over ranks first), then each parameter clamped to its range."""
        for params, rate, (lo, hi) in ((self.round_params(), lr, V_RANGE),
                                       (self.minmax_params(), minmax_lr, MINMAX_RANGE)):
            for p in params:
                if p.grad is None:
                    continue
                p.sub_(rate * torch.sign(reduce.sum(p.grad))).clamp_(lo, hi)
                p.grad = None

    @torch.no_grad()
    def load(self, snapshot: dict) -> None:
        for k, d in (("v", self.v), ("alpha", self.alpha), ("beta", self.beta)):
            for rel, p in d.items():
                p.copy_(snapshot[k][rel])

    @torch.no_grad()
    def finish(self) -> dict[str, QTensor]:
        """Round every tuned Linear with the current V, alpha, beta (plain rounding, fp32), write the dequantized
        codes into its weight and return the codes."""
        out = {}
        for rel, sp in self.specs.items():
            _, q, scales, zeros = self.qdq(rel, ste=False)
            w = self.w[rel]
            qt = QTensor(q.to(torch.uint8 if sp.zero_point else torch.int8), scales.float(),
                         None if zeros is None else zeros.float(), sp.w_bit, effective_group_size(w.shape[1],
                                                                                                 sp.group_size))
            lin = self.block.get_submodule(rel)
            lin.weight.data.copy_(qt.dequantize(lin.weight.dtype))
            out[rel] = qt
        return out


class MinibatchSampler:
    """The sequences of each step: a seeded shuffle of all of them, taken batch_size at a time, reshuffled when fewer
    than batch_size are left (the package's IndexSampler)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.bs, self.gen = n, min(batch_size, n), generator
        self.order, self.at = torch.randperm(n, generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.at + self.bs > self.n:
            self.order, self.at = torch.randperm(self.n, generator=self.gen), 0
        self.at += self.bs
        return self.order[self.at - self.bs : self.at]


def tune_block(tuner: BlockTuner, x: torch.Tensor, y: torch.Tensor, kwargs: dict, cfg: AutoRoundConfig,
               generator: torch.Generator, reduce: Reducer = Reducer()) -> dict:
    """SignRound's loop over one block (section 3 of the paper; the package's quantize_block): `iters` SignSGD steps
    on minibatches of this rank's sequences x with targets y, lr decayed linearly to 0, the parameters of the best
    minibatch loss (summed over ranks) loaded at the end. Returns the losses for the block's info."""
    sampler = MinibatchSampler(x.shape[0], cfg.batch_size, generator)
    best, best_loss, best_iter, init_loss = tuner.state(), float("inf"), -1, None
    block_params = [p for p in tuner.block.parameters()]
    needs_grad = [p.requires_grad for p in block_params]
    try:
        for p in block_params:  # only V, alpha, beta learn: the block's own weights get no gradients
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in range(cfg.iters):
                idx = sampler.next()
                loss = tuner.loss(x[idx], y[idx], kwargs, cfg.amp)
                loss.backward()
                (total,) = reduce.sum_float(loss.item())
                if init_loss is None:
                    init_loss = total
                if total < best_loss:  # the snapshot is of the parameters that gave this loss (before the step)
                    best, best_loss, best_iter = tuner.state(), total, i
                decay = 1.0 - i / cfg.iters  # torch LinearLR(start_factor=1, end_factor=0, total_iters=iters)
                tuner.step(cfg.round_lr * decay, cfg.clip_lr * decay, reduce)
    finally:
        for p, g in zip(block_params, needs_grad):
            p.requires_grad_(g)
    tuner.load(best)
    return {"loss_init": init_loss, "loss_best": None if best_iter < 0 else best_loss, "best_iter": best_iter}


class AutoRoundBlocks:
    """AutoRound's per-block step for the sequential runner (quant.calibration.runner.BlockMethod): it observes the
    block's own input (the observer named "" hooks the block itself)."""

    def __init__(self, cfg: AutoRoundConfig, prefix: str, linears, specs: dict):
        self.cfg, self.prefix, self.linears, self.specs = cfg, prefix, linears, specs

    def observers(self, block, index: int) -> dict:
        return {"": Keep()}

    def quantize_block(self, block, index: int, stats: dict, kwargs, reduce: Reducer) -> BlockResult:
        t = time.perf_counter()
        x = stats[""]
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"calibration activations at the input of {self.prefix}.{index} contain NaN/Inf "
                                     f"(check model.dtype and the calibration data)")
        specs = {rel: self.specs[f"{self.prefix}.{index}.{rel}"] for rel in self.linears}
        tuner = BlockTuner(block, {r: s for r, s in specs.items() if not s.skip}, self.cfg.enable_minmax_tuning)
        y = forward_block(block, x, kwargs)  # the FP block's outputs: the target
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        info = tune_block(tuner, x, y, kwargs, self.cfg, gen, reduce)
        del y
        done = tuner.finish()
        return BlockResult(done, {**info, "seconds": time.perf_counter() - t})


def autograd_bytes(model_config, cfg: AutoRoundConfig, act_bytes: int = 2) -> int:
    """What AutoRound holds beyond the runner's activations (eval.memory.calibration_bytes), for the calibration
    preflight: the autograd graph of one minibatch through one block (per token: about 16 hidden-size and 6
    MLP-size tensors in the training dtype, fp32 at the loss; per sequence and head: the attention probabilities,
    twice, fp32), and per weight of the block about 12 fp32 values (its fp32 copy, V, its gradient, the best
    snapshot, the quantize-dequantize intermediates autograd keeps). Its inputs and FP targets (hidden x 2 per
    calibration token) are within the runner's count, which holds the inputs of Linears AutoRound does not observe.
    A generous estimate: it never scales with n_samples, so a refusal still names n_samples only when that helps."""
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    h = text.hidden_size
    inter = getattr(text, "intermediate_size", 4 * h)
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", heads) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1
    b, t = min(cfg.batch_size, cfg.calib.n_samples), cfg.calib.seqlen
    acts = b * t * ((16 * h + 6 * inter) * max(act_bytes, 2) + 2 * h * 4) + 2 * b * heads * t * t * 4
    block_weights = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter * experts
    return acts + 12 * 4 * block_weights


@method
class AutoRound(Method):
    name, config = "autoround", AutoRoundConfig
    needs_calibration = True
    formats = ("awq", "compressed-tensors")  # integer codes, scales and zeros per group: RTN's layout
    rounds = True
    label, order = "AutoRound", 110

    def quantize(self, model, cfg: AutoRoundConfig, ctx: QuantContext, setup: Setup) -> QuantOutcome:
        arch = setup.arch
        run = run_sequential(model, arch, AutoRoundBlocks(cfg, arch.blocks, arch.linears, setup.plan.specs),
                             setup.samples, setup.placement, propagate=cfg.propagate,
                             checkpoint_dir=ctx.checkpoint_dir, reduce=Reducer.current(),
                             desc=f"autoround w{cfg.w_bit} g{cfg.group_size} ({cfg.iters} iters)",
                             progress=ctx.progress, experts=setup.moe)
        losses = {f"{arch.blocks}.{i}": {k: info[k] for k in ("loss_init", "loss_best", "best_iter")}
                  for i, info in enumerate(run.infos)}
        summary = self.summary(cfg, setup, model, run.qtensors, iters=cfg.iters, lr=cfg.round_lr,
                               minmax_lr=cfg.clip_lr, batch_size=cfg.batch_size,
                               enable_minmax_tuning=cfg.enable_minmax_tuning, amp=cfg.amp, propagate=cfg.propagate,
                               autoround_loss=losses, block_seconds=run.block_seconds,
                               resumed_from_block=run.resumed_from)
        timings = {"calibration_capture": run.timings_s["calibration_capture"],
                   "block_forward": run.timings_s["block_forward"],
                   "autoround": sum(info["seconds"] for info in run.infos)}
        return QuantOutcome(summary=summary, timings_s=timings, qtensors=run.qtensors)

    def extra_calibration_bytes(self, model_config, cfg: AutoRoundConfig, act_bytes: int = 2) -> int:
        return autograd_bytes(model_config, cfg, act_bytes)
