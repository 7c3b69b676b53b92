"""One sequential calibration runner for every calibrated method (#16; llm-compressor's sequential pipeline, llm-awq's
run_awq loop): capture block 0's inputs and each block's own kwargs, then block by block

  1. onload the block (quant.onload.Placement);
  2. run it over this rank's calibration sequences, each Linear the method observes feeding an Observer;
  3. reduce the observers over ranks and call the method's `quantize_block`, which quantizes the block in place;
  4. checkpoint the finished block (quant.calibration.checkpoint) and offload it;
  5. compute the next block's inputs: the outputs of the block as it was before step 3 (`propagate="fp16"`: llm-awq,
     AutoAWQ) or of the quantized block (`"quantized"`: llm-compressor's default, so later blocks calibrate on the
     errors of earlier ones).

A method is an object with two functions (BlockMethod); names of Linears are relative to the block
("self_attn.q_proj"). Only the decoder blocks change; everything outside them is left as it was.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from harness.architectures import Architecture, get_blocks
from harness.config import MoEConfig
from harness.log import logger
from quant.calibration.capture import capture_block_inputs, forward_block
from quant.calibration.checkpoint import BlockCheckpoints
from quant.calibration.reduce import Reducer
from quant.moe.coverage import BlockCoverage, mark
from quant.onload import Placement
from quant.primitives import QTensor

PROPAGATE = ("fp16", "quantized")
log = logger("quant")


class Observer(Protocol):
    """What a method keeps of one Linear's input: `add` sees every minibatch [b, T, in] of this rank's sequences;
    `result` is called once, after the block's forward, with the Reducer to combine ranks."""

    def add(self, x: torch.Tensor) -> None: ...

    def result(self, reduce: Reducer) -> Any: ...


class Keep:
    """Every input of this rank, concatenated over minibatches: [n_local_sequences, T, in] (not reduced: a method
    that keeps whole inputs reduces what it computes from them)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.parts.append(x)

    def result(self, reduce: Reducer) -> torch.Tensor:
        return torch.cat(self.parts)


@dataclass
class BlockResult:
    qtensors: dict[str, QTensor]  # by Linear name relative to the block
    info: dict = field(default_factory=dict)  # JSON-able per-block facts (chosen alphas, seconds), kept on resume


class BlockMethod(Protocol):
    def observers(self, block: nn.Module, index: int) -> dict[str, Observer]:
        """Linear name -> the Observer of its input, fresh for block `index` ({} for a method without data)."""
        ...

    def quantize_block(self, block: nn.Module, index: int, stats: dict[str, Any], kwargs: dict | None,
                       reduce: Reducer) -> BlockResult:
        """Quantize `block` in place (on the compute device) from `stats` (name -> Observer.result), given the
        kwargs the model passes the block (None without data); every rank must make the same calls to `reduce`."""
        ...


@dataclass
class RunResult:
    qtensors: dict[str, QTensor]  # by qualified name, on the host when offloading
    infos: list[dict]  # BlockResult.info per block
    block_seconds: list[float]  # wall time per block (a resumed block's from its checkpoint)
    resumed_from: int  # first block computed in this process (0: a fresh run)
    timings_s: dict[str, float]


def _sha(samples: torch.Tensor | None) -> str | None:
    return None if samples is None else hashlib.sha256(samples.cpu().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def run_sequential(model: nn.Module, arch: Architecture, method: BlockMethod, samples: torch.Tensor | None,
                   placement: Placement = Placement(), *, propagate: str = "fp16", checkpoint_dir: Path | None = None,
                   reduce: Reducer = Reducer(), desc: str = "", progress: bool = True,
                   experts: MoEConfig = MoEConfig()) -> RunResult:
    """Run `method` over the decoder blocks of `model` in order. `samples`: [n, seqlen] token ids, all of them on
    every rank (each rank calibrates on reduce.shard(n)); None for a method without calibration data.
    `checkpoint_dir`: keep each finished block there and resume from the blocks found (None: no checkpoints).
    A mixture of experts (arch.moe) with data: every expert's routed tokens are counted, and experts with too few get
    `experts`' fallback (quant.moe.coverage; a method passes its quant.moe, quant.setup's `setup.moe`); the counts go
    into each block's info ("expert_coverage")."""
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate={propagate!r} is not one of {', '.join(PROPAGATE)}")
    if arch.moe is not None:
        experts.validate()
    blocks = get_blocks(model, arch)
    n, timings = len(blocks), {"calibration_capture": 0.0, "block_forward": 0.0, "resume_replay": 0.0}
    x = block_kwargs = None
    if samples is not None:
        t = time.perf_counter()
        with placement.capture(model, blocks):
            x, block_kwargs = capture_block_inputs(model, arch, samples[reduce.shard(samples.shape[0])])
        timings["calibration_capture"] = time.perf_counter() - t
    ckpt = None
    if checkpoint_dir is not None:
        identity = {"samples_sha256": _sha(samples), "blocks": n, "propagate": propagate, "world": reduce.world}
        if arch.moe is not None:  # the expert fallback changes the statistics (a dense identity is unchanged)
            identity["experts"] = dataclasses.asdict(experts)
        ckpt = BlockCheckpoints(checkpoint_dir, identity)
    qtensors: dict[str, QTensor] = {}
    infos: list[dict] = []
    block_s: list[float] = []
    t = time.perf_counter()
    start, x = _resume(ckpt, blocks, x, block_kwargs, placement, propagate, reduce, arch, qtensors, infos, block_s)
    timings["resume_replay"] = time.perf_counter() - t
    if start:
        log(f"{desc}: resumed from block {start} of {n} (blocks 0..{start - 1} from {checkpoint_dir})")
    bar = tqdm(total=n, initial=start, desc=desc + (f" (resumed from block {start})" if start else ""),
               disable=not progress, leave=False)
    for i in range(start, n):
        block, t_block = blocks[i], time.perf_counter()
        with placement.block(block):
            obs = method.observers(block, i)
            y = coverage = None
            if x is not None:
                t = time.perf_counter()
                cov = BlockCoverage(block, arch, experts) if arch.moe is not None else None
                try:
                    seen = obs if cov is None else cov.routed_observed(obs)
                    y = forward_block(block, x, block_kwargs[i], {name: o.add for name, o in seen.items()})
                finally:
                    if cov is not None:
                        cov.remove()
                if cov is not None:  # counts over ranks; experts with too few tokens get fresh, all-token observers
                    coverage = cov.finish(method, block, i, obs, reduce)
                timings["block_forward"] += time.perf_counter() - t
            elif obs:
                raise ValueError("a method that observes inputs needs calibration samples")
            stats = {name: o.result(reduce) for name, o in obs.items()}
            del obs
            res = method.quantize_block(block, i, stats, None if x is None else block_kwargs[i], reduce)
            del stats
            if coverage is not None:
                res.info["expert_coverage"] = coverage
                mark(block, arch, coverage)
            if x is not None and propagate == "quantized":
                t = time.perf_counter()
                y = forward_block(block, x, block_kwargs[i])
                timings["block_forward"] += time.perf_counter() - t
            placement.to_host(res.qtensors)
            block_s.append(time.perf_counter() - t_block)
            if ckpt is not None and reduce.rank == 0:
                ckpt.save(i, block, res.qtensors, res.info, block_s[-1])
        qtensors.update({f"{arch.blocks}.{i}.{name}": q for name, q in res.qtensors.items()})
        infos.append(res.info)
        x = y
        bar.update(1)
    bar.close()
    return RunResult(qtensors, infos, block_s, start, timings)


def _resume(ckpt, blocks, x, block_kwargs, placement, propagate, reduce, arch, qtensors, infos, block_s):
    """Load the leading checkpointed blocks (as many as every rank has) and recompute the inputs of the first block
    not checkpointed exactly as the interrupted run computed them: the fp16 block's outputs before its checkpoint
    is loaded, or the quantized block's after. Returns (first block to compute, its inputs)."""
    if ckpt is None:
        return 0, x
    k = ckpt.finished(len(blocks))
    if reduce.parallel:
        k = -int(reduce.max(torch.tensor([-k])).item())
    for j in range(k):
        with placement.block(blocks[j]):
            y = forward_block(blocks[j], x, block_kwargs[j]) if x is not None and propagate == "fp16" else None
            got = ckpt.load(j, blocks[j])
            if got is None:  # unusable: the block is untouched and computed again from here
                return j, x
            if x is not None and propagate == "quantized":
                y = forward_block(blocks[j], x, block_kwargs[j])
            device = next(blocks[j].parameters()).device  # codes rest where a fresh block's do
            for q in got[0].values():
                q.q, q.scales = q.q.to(device), q.scales.to(device)
                q.zeros = None if q.zeros is None else q.zeros.to(device)
            placement.to_host(got[0])
        qtensors.update({f"{arch.blocks}.{j}.{name}": q for name, q in got[0].items()})
        infos.append(got[1])
        if arch.moe is not None and "expert_coverage" in got[1]:
            mark(blocks[j], arch, got[1]["expert_coverage"])
        block_s.append(got[2])
        x = y
    return k, x
