"""Calibration coverage of routed experts, inside the shared sequential runner (quant.calibration.runner).

A routed expert's Linears see only the tokens routed to it (harness.moe_unfuse: a hook on an expert's Linear sees its
tokens), so with a small calibration set some experts get few tokens or none, and their statistics (GPTQ's Hessian,
AWQ's mean |x|) are noise or missing: the failures the peers' trackers report (llm-compressor #2826, #2167; GPTQModel
#2271). During each block's forward the runner counts the tokens every expert receives; an expert below the
threshold gets the stated fallback (quant.moe.fallback, harness.config.MoEConfig), for every calibrated method alike:

  fallback "all_tokens": its observers are replaced by fresh ones that see every calibration token entering the MoE
  (the expert run on all of them, its output discarded): llm-compressor's `moe_calibrate_all_experts`, for that expert
  only. The block's output, and so the next block's input, stays the routed one.

`calibrate_all_experts` applies it to every expert. The counts, the threshold and the experts that fell back are kept
per block (in the runner's per-block info, so a resumed run keeps them) and go into the record's quant summary
(`expert_summary`), never a silent skip. A method's config carries the choice as `quant.moe` (every calibrated method
has it); the shared setup checks it against the model (`expert_calibration`) and hands it to the runner.
"""
from __future__ import annotations

import dataclasses
import statistics

import torch
import torch.nn as nn

from harness.architectures import Architecture
from harness.config import EXPERT_FALLBACKS, MoEConfig, user_error

MINIBATCH_TOKENS = 4096  # tokens per expert forward in the fallback pass


def expert_calibration(cfg, arch: Architecture) -> MoEConfig:
    """The run's routed-expert calibration: the method config's `quant.moe` (the defaults for a method without one).
    On a dense model anything but the defaults is refused: it would change the run_id and nothing else."""
    moe = getattr(cfg, "moe", None) or MoEConfig()
    moe.validate()
    if arch.moe is None and not moe.is_default():
        changed = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(moe).items()
                            if v != getattr(MoEConfig(), k))
        raise user_error("quant.moe", changed, f"the model ({arch.family}) has no routed experts, so the option "
                         f"would change the run_id and nothing else", "leave quant.moe at its defaults")
    return moe


class BlockCoverage:
    """One block's routed-token counts and MoE inputs, recorded by hooks during the runner's forward."""

    def __init__(self, block: nn.Module, arch: Architecture, cal: MoEConfig):
        self.arch, self.cal, m = arch, cal, arch.moe
        self.experts = block.get_submodule(m.experts)
        self.counts = torch.zeros(m.n_experts, dtype=torch.float64)
        self.inputs: list[torch.Tensor] = []
        self.hooks = [self.experts.register_forward_pre_hook(self._keep)]
        self.hooks += [self.experts[e].register_forward_hook(self._count(e)) for e in range(m.n_experts)]

    def _keep(self, module, args):
        self.inputs.append(args[0].detach())

    def _count(self, e: int):
        def hook(module, args, out):
            self.counts[e] += args[0].shape[0]
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def expert_of(self, name: str) -> int | None:
        """The expert a Linear (relative to the block) belongs to, or None."""
        prefix = self.arch.moe.experts + "."
        return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None

    def routed_observed(self, obs: dict) -> dict:
        """The observers the forward feeds: all of them, or without the experts' under calibrate_all_experts."""
        if not self.cal.calibrate_all_experts:
            return obs
        return {k: o for k, o in obs.items() if self.expert_of(k) is None}

    @torch.no_grad()
    def finish(self, method, block, index: int, obs: dict, reduce) -> dict:
        """After the forward: sum the counts over ranks, pick the under-covered experts, give each one fresh
        observers fed with every token of the MoE's input (in place in `obs`), and return the block's coverage facts."""
        self.remove()
        counts = reduce.sum(self.counts)
        total = float(counts.sum())
        threshold = self.cal.min_share * total / len(counts)
        below = [e for e, c in enumerate(counts.tolist()) if c == 0 or c < threshold]
        low = list(range(len(counts))) if self.cal.calibrate_all_experts else below
        if low:
            fresh = method.observers(block, index)
            x = torch.cat(self.inputs) if self.inputs else None
            for e in low:
                mine = {k: o for k, o in fresh.items() if self.expert_of(k) == e}
                if not mine:
                    continue
                for k, o in mine.items():
                    obs[k] = o
                if x is None or x.shape[0] == 0:
                    continue
                expert = self.experts[e]
                hooks = [block.get_submodule(k).register_forward_hook(lambda m, a, out, f=o.add: f(a[0]))
                         for k, o in mine.items()]
                try:
                    for i in range(0, x.shape[0], MINIBATCH_TOKENS):
                        expert(x[i : i + MINIBATCH_TOKENS])
                finally:
                    for h in hooks:
                        h.remove()
        self.inputs = []
        return {"tokens": [int(c) for c in counts.tolist()], "threshold_tokens": threshold, "below": below,
                "all_tokens": low, "calibrate_all_experts": self.cal.calibrate_all_experts,
                "min_share": self.cal.min_share, "fallback": self.cal.fallback}


def mark(block: nn.Module, arch: Architecture, coverage: dict) -> None:
    """Keep a block's coverage facts on its experts module, for the record's summary (expert_summary)."""
    block.get_submodule(arch.moe.experts).calibration_coverage = coverage


def expert_summary(model: nn.Module, arch: Architecture, qtensors: dict) -> dict:
    """The quant summary's `moe` entry for a mixture of experts ({} for a dense model): experts, top-k, what is kept in
    the model dtype, how many expert Linears were quantized, and, after a calibrated method, the per-expert token
    counts (min, median, the experts below the threshold) and what was done for those."""
    if arch.moe is None:
        return {}
    from harness.architectures import get_blocks

    m = arch.moe
    blocks = get_blocks(model, arch)
    out: dict = {"experts": m.n_experts, "top_k": m.top_k, "kept_in_model_dtype": list(m.kept()),
           "expert_linears": len(blocks) * m.n_experts * len(m.expert_linears),
           "expert_linears_quantized": sum(1 for n in qtensors if f".{m.experts}." in n)}
    cov = [getattr(b.get_submodule(m.experts), "calibration_coverage", None) for b in blocks]
    if not any(cov):
        out["calibration"] = None  # no calibration data (RTN) or none recorded
        return {"moe": out}
    tokens = [t for c in cov if c for t in c["tokens"]]
    below = {f"{arch.blocks}.{i}.{m.experts}.{e}": c["tokens"][e] for i, c in enumerate(cov) if c for e in c["below"]}
    all_experts = any(c["calibrate_all_experts"] for c in cov if c)
    fallback = next((c.get("fallback", "all_tokens") for c in cov if c), "all_tokens")
    out["calibration"] = {
        "expert_tokens": [c["tokens"] if c else None for c in cov],  # per block, per expert: routed token slots
        "expert_tokens_min": min(tokens), "expert_tokens_median": statistics.median(tokens),
        "min_share": None if not cov[0] else cov[0].get("min_share"),
        "threshold_tokens": [round(c["threshold_tokens"], 1) if c else None for c in cov],
        "experts_below_threshold": below,  # qualified expert -> its routed tokens
        "calibrate_all_experts": all_experts,
        # what the experts below the threshold (every expert under calibrate_all_experts) were calibrated on: the
        # fallback's name (quant.moe.fallback; blocks resumed from checkpoints older than the field: all_tokens) and
        # what it means
        "fallback": fallback if below or all_experts else None,
        "fallback_means": EXPERT_FALLBACKS[fallback] if below or all_experts else None,
        "experts_fallen_back": sum(len(c["all_tokens"]) for c in cov if c),
    }
    return {"moe": out}
