"""AWQ W4A16 (Lin et al. 2023) block by block, as llm-awq's run_awq does it, on the sequential calibration runner
(quant.calibration.runner: capture, onloading, propagation, checkpoints, data-parallel reductions):

for each decoder block, with the block's input from the unquantized model (quant.propagate=auto|fp16; `quantized`
feeds it the quantized blocks' outputs instead, llm-compressor's way):
  1. run the block once on all calibration sequences; of the input of every Linear keep running sums (mean |x|, the
     clipping search's Gram matrices) and the few sequences that score the scale grid (the runner, quant.awq.observe);
  2. for each scaling group (layer map), search s = mean|x|^alpha on a grid (or LMDeploy's fixed smoothing ratio);
  3. fold every s into its previous op and the group's Linears (FP output unchanged), rescale the Gram sums by 1/s;
  4. search each Linear's clipping threshold per group (q/k excepted, as in llm-awq), clip;
  5. quantize the block's Linears (RTN on the scaled, clipped weights).
Memory stays at one block's forward plus those few sequences. The activation statistics use every calibration
sequence; the grid losses use the first `search_samples` sequences, or, for groups scored token by token (MLP, single
Linears) when `search_tokens` > 0, that many tokens drawn at random over all sequences. Data-parallel (a
torch.distributed process group), each rank holds a contiguous shard of the sequences and these subsets keep their
global meaning: every sum over the data (mean |x|, grid losses, clip Gram matrices) and max |x| goes through the
runner's Reducer.
"""
from __future__ import annotations

import time

import torch

from quant.awq.config import AWQConfig
from quant.awq.fold import apply_scale_
from quant.awq.observe import AWQInputObserver, InputStats, scaled_gram
from quant.awq.search import apply_clip_, search_clip, search_scale, smoothing_scale, weight_absmean
from harness.architectures import Architecture
from quant.calibration.capture import MINIBATCH, block_out as _block_out, slice_batch as _slice_batch
from quant.calibration.reduce import Reducer
from quant.calibration.runner import BlockResult, run_sequential
from quant.primitives import fake_quantize
from quant.registry import Method, QuantOutcome, method
from quant.setup import Setup
from quant.surgery import quantize_linear_


def _inspect_fn(block, group, kwargs):
    mod = block.get_submodule(group.inspect or group.linears[0])

    def fwd(x):
        outs = []
        for i in range(0, x.shape[0], MINIBATCH):
            xb = x[i : i + MINIBATCH]
            if group.inspect_takes_block_kwargs:
                outs.append(_block_out(mod(hidden_states=xb, **_slice_batch(kwargs, xb.shape[0]))))
            else:
                outs.append(_block_out(mod(xb)))
        return torch.cat(outs)

    return fwd


class AWQBlocks:
    """AWQ's per-block step for the sequential runner (quant.calibration.runner.BlockMethod). Of every captured input
    it keeps running sums and a few sequences (quant.awq.observe), never the whole activations."""

    def __init__(self, cfg: AWQConfig, arch: Architecture, specs: dict, search_idx, clip_idx,
                 samples_shape: tuple[int, int], reduce: Reducer):
        self.cfg, self.arch, self.specs = cfg, arch, specs
        # global subsets of the calibration data, as this rank's rows and tokens (reduce.shard): the first
        # `search_samples` sequences of all, the random tokens of all (one process: all of them, unchanged)
        n, seqlen = samples_shape
        shard = reduce.shard(n)
        self.search_rows = max(0, min(cfg.search_samples, shard.stop) - shard.start)
        self.search_idx, self.clip_idx = (_local(idx, shard.start * seqlen, shard.stop * seqlen)
                                          for idx in (search_idx, clip_idx))
        self.keys = arch.input_keys()
        # a group with its own input (a mixture of experts' MoE block) is observed there
        self.capture = sorted(set(self.keys.values()) | {g.input for g in arch.groups if g.input})
        # inputs whose group is scored token by token (no block kwargs) when search_tokens > 0
        self.tokenwise = {g.input or g.linears[0] for g in arch.groups if not g.inspect_takes_block_kwargs}

    def observers(self, block, index: int) -> dict[str, AWQInputObserver]:
        prefix = f"{self.arch.blocks}.{index}"
        grams: dict[str, set] = {name: set() for name in self.capture}
        if self.cfg.clip:
            for rel in self.arch.linears:
                sp = self.specs[f"{prefix}.{rel}"]
                if rel not in self.arch.no_clip and not sp.skip:
                    grams[self.keys[rel]].add(sp.group_size)
        return {name: AWQInputObserver(
            self.search_rows, self.search_idx if name in self.tokenwise else None, self.clip_idx,
            tuple(sorted(grams[name])), absmax=not self.cfg.search_scale) for name in self.capture}

    def quantize_block(self, block, index: int, stats: dict, kwargs: dict, reduce: Reducer) -> BlockResult:
        qtensors, chosen_alpha, t_acc = {}, {}, {}
        _awq_block(block, index, stats, kwargs, self.arch, self.cfg, self.specs, self.keys, qtensors, chosen_alpha,
                   t_acc, reduce)
        return BlockResult(qtensors, {"alpha": chosen_alpha, "seconds": t_acc})


@method
class AWQ(Method):
    name, config = "awq", AWQConfig
    needs_calibration = True
    formats = ("awq", "compressed-tensors")
    rounds = True
    streams = True  # one pass over the blocks in order (quant.streaming)
    prepares = {"round_weights": False}  # scales (and clipping) folded, the rounding left to the recipe's last step
    order = 2  # after RTN, the baseline it improves on

    def quantize(self, model, cfg: AWQConfig, ctx, setup: Setup) -> QuantOutcome:
        samples, arch, place = setup.samples, setup.arch, setup.placement
        reduce = Reducer.current()  # data-parallel when a process group is initialized (#18)
        # clipping scores a seeded random subset of calibration tokens. (llm-awq takes every k-th token; with k a
        # divisor of seqlen that oversamples the first position of every sequence, whose activations are outliers.)
        n_tok = samples.numel()
        clip_idx = None  # clip_tokens 0: every calibration token
        if 0 < cfg.clip_tokens < n_tok:
            clip_idx = torch.randperm(n_tok, generator=torch.Generator().manual_seed(cfg.calib.seed))[: cfg.clip_tokens]
        # token-wise groups may score a random subset of all calibration tokens (more varied text for the same cost)
        search_idx = None
        if cfg.search_tokens > 0:
            search_idx = torch.randperm(n_tok, generator=torch.Generator().manual_seed(cfg.calib.seed + 1))
            search_idx = search_idx[: cfg.search_tokens].sort().values
        # llm-awq / AutoAWQ feed each block the unquantized model's hidden states (fp16 propagation)
        propagate = "fp16" if cfg.propagate == "auto" else cfg.propagate
        blocks = AWQBlocks(cfg, arch, setup.plan.specs, search_idx, clip_idx, tuple(samples.shape), reduce)
        run = run_sequential(model, arch, blocks, samples, place, propagate=propagate,
                             checkpoint_dir=ctx.checkpoint_dir, reduce=reduce,
                             desc=f"awq w{cfg.w_bit} g{cfg.group_size}", progress=ctx.progress, experts=setup.moe)
        qtensors = run.qtensors
        alpha = {f"{arch.blocks}.{i}.{rel}": a for i, info in enumerate(run.infos) for rel, a in info["alpha"].items()}
        stage = {k: sum(info["seconds"][k] for info in run.infos) for k in ("search", "clip", "quant")}
        timings = dict(calibration_capture=run.timings_s["calibration_capture"],
                       block_forward=run.timings_s["block_forward"], scale_search=stage["search"],
                       clip_search=stage["clip"], quantize=stage["quant"])
        if run.resumed_from:
            timings["resume_replay"] = run.timings_s["resume_replay"]
        summary = self.summary(
            cfg, setup, model, qtensors,
            calibration={"search_samples": min(cfg.search_samples, cfg.calib.n_samples),
                         "search_tokens": min(cfg.search_tokens, cfg.calib.n_samples * cfg.calib.seqlen)},
            search_scale=cfg.search_scale, duo_scaling=cfg.duo_scaling, clip=cfg.clip, propagate=propagate,
            scale_grid=cfg.scale_grid, alpha_mean=sum(alpha.values()) / len(alpha) if alpha else None,
            block_seconds=run.block_seconds, resumed_from_block=run.resumed_from)
        return QuantOutcome(summary=summary, timings_s=timings, qtensors=qtensors)


def _local(idx: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """The global token indices in [lo, hi), in their order, as indices into this rank's tokens."""
    return None if idx is None else idx[(idx >= lo) & (idx < hi)] - lo


def _absmean(st: InputStats, reduce: Reducer) -> torch.Tensor:
    (n,) = reduce.sum_float(st.n)
    return (reduce.sum(st.abssum) / n).float()


def _awq_block(block, i, stats: dict[str, InputStats], kwargs, arch, cfg, specs, keys, qtensors, chosen_alpha,
               t_acc, reduce) -> None:
    """One decoder block, on whatever device it and its captured statistics `stats` are on: scale search and fold,
    clip search, quantize. Fills qtensors (by name relative to the block) / chosen_alpha, sets stage seconds in t_acc."""
    t_search = t_clip = t_quant = 0.0
    prefix = f"{arch.blocks}.{i}"
    t = time.perf_counter()
    # mean |x| per input channel of every captured input: AWQ's statistic, and a NaN/Inf anywhere makes it non-finite
    x_means = {name: _absmean(st, reduce) for name, st in stats.items()}
    t_search += time.perf_counter() - t
    for name, m in x_means.items():
        if not torch.isfinite(m).all():
            raise FloatingPointError(f"calibration activations at the input of {prefix}.{name} contain NaN/Inf "
                                     f"(check model.dtype and the calibration data)")

    # 2-3. scales: search every group on the original block, then fold them all (llm-awq auto_scale_block)
    t = time.perf_counter()
    plans = []
    for grp in arch.groups:
        if grp.when is not None and not grp.when(block):
            continue
        lins = [block.get_submodule(n) for n in grp.linears]
        spec = [specs[f"{prefix}.{n}"] for n in grp.linears]  # per layer (quant.surgery.plan_layers)
        gsz = [sp.group_size for sp in spec]
        key = grp.input or keys[grp.linears[0]]
        st = stats[key]
        if cfg.search_scale:
            def qw(w, j, spec=spec):  # a skipped Linear stays FP16: no quantization error to weigh
                return w if spec[j].skip else fake_quantize(w, spec[j].w_bit, spec[j].group_size, spec[j].zero_point)
            w_mean = weight_absmean([lin.weight for lin in lins], gsz[0]) if cfg.duo_scaling else None
            # this rank's part of the first search_samples sequences, or of the random tokens (one pseudo-sequence)
            s, alpha, _ = search_scale(_inspect_fn(block, grp, kwargs), st.search, lins, x_means[key],
                                       qw, cfg.n_grid, w_mean, cfg.scale_grid, reduce)
            chosen_alpha[grp.linears[0]] = alpha
        else:
            s = smoothing_scale(reduce.max(st.absmax), weight_absmean([lin.weight for lin in lins], gsz[0]),
                                cfg.smooth_ratio)
        plans.append((grp, s))
    for grp, s in plans:
        apply_scale_(block, grp.prev_op, grp.prev_kind, grp.linears + grp.also_scaled, s)
        for key in dict.fromkeys(keys[n] for n in grp.linears):  # the clip search sees the scaled inputs x / s
            st = stats[key]  # (one input per group, or each expert's own)
            st.grams = {g: scaled_gram(h, s) for g, h in st.grams.items()}
    t_search += time.perf_counter() - t

    # 4. clipping search on the scaled weights and inputs (one Gram matrix per input and group size)
    t = time.perf_counter()
    if cfg.clip:
        grams: dict[tuple[str, int], torch.Tensor] = {}
        for rel in arch.linears:
            if rel in arch.no_clip:
                continue
            lin, sp = block.get_submodule(rel), specs[f"{prefix}.{rel}"]
            if sp.skip:
                continue
            key = (keys[rel], sp.group_size)
            if key not in grams:
                st = stats[keys[rel]]
                (n,) = reduce.sum_float(st.gram_n)
                grams[key] = reduce.sum(st.grams[sp.group_size]) / n
            max_val = search_clip(lin.weight.data, None, sp.w_bit, sp.group_size, sp.zero_point, cfg.clip_n_grid,
                                  cfg.clip_max_shrink, gram=grams[key])
            apply_clip_(lin, max_val)
        del grams
    t_clip += time.perf_counter() - t

    # 5. quantize (unless a recipe rounds the smoothed weights itself: awq_gptq, quant/gptq/awq_gptq.py)
    t = time.perf_counter()
    for rel in arch.linears if cfg.round_weights else ():
        sp = specs[f"{prefix}.{rel}"]
        if not sp.skip:
            qtensors[rel] = quantize_linear_(block.get_submodule(rel), sp.w_bit, sp.group_size, sp.zero_point)
    t_quant += time.perf_counter() - t
    t_acc.update(search=t_search, clip=t_clip, quant=t_quant)
