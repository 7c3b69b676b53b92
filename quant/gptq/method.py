"""GPTQ W4A16 block by block, as llm-compressor's sequential pipeline runs it:

for each decoder block, with the block's inputs from the already quantized blocks before it:
  1. run the block once on all calibration sequences, accumulating the Hessian of every distinct Linear input
     (q/k/v share one, gate/up share one: the layer map's scaling groups);
  2. quantize every Linear with GPTQ (quant/gptq/algorithm.py); Linears that share an input are quantized as one
     matrix (their rows stacked: GPTQ treats rows independently given H, so the codes are the same);
  3. run the quantized block to get the next block's inputs (llm-compressor propagates through the quantized block;
     AutoGPTQ does too, after its last sub-group).
Memory is one block's Hessians plus the calibration hidden states; the capture is AWQ's (quant/awq/method.py).
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from harness.architectures import Architecture, architecture_for, get_blocks
from harness.storage_bytes import packed_weight_bytes
from quant.awq.method import _input_keys, capture_block_inputs, run_block
from quant.gptq.algorithm import accumulate_hessian, gptq_quantize
from quant.gptq.config import GPTQConfig
from quant.primitives import QTensor
from quant.registry import QuantContext, QuantOutcome, method
from quant.surgery import plan_group_sizes


@method("gptq", needs_calibration=True)
def gptq(model, cfg, ctx: QuantContext) -> QuantOutcome:
    g = GPTQConfig.from_any(cfg)  # bad knob: fails here, naming the field
    arch = architecture_for(model)  # unsupported architecture: fails here, naming the registry
    sizes, fallbacks = plan_group_sizes(model, g)  # bad group size: fails here, naming the layer
    timings: dict[str, float] = {"calibration_capture": 0.0, "hessian": 0.0, "gptq": 0.0, "propagate": 0.0}

    t = time.perf_counter()
    samples = ctx.calibration()
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(samples.max()) >= vocab:
        raise ValueError(f"calibration token id {int(samples.max())} is outside the model's vocabulary ({vocab})")
    place = ctx.placement
    blocks = get_blocks(model, arch)
    with place.capture(model, blocks):
        x, block_kwargs = capture_block_inputs(model, arch, samples)
    timings["calibration_capture"] = time.perf_counter() - t

    qtensors: dict[str, QTensor] = {}
    losses: dict[str, float] = {}
    block_s = []
    bar = tqdm(blocks, desc=f"gptq w{g.w_bit} g{g.group_size}", disable=not ctx.progress, leave=False)
    for i, block in enumerate(bar):
        t_block = time.perf_counter()
        with place.block(block):
            x, done = gptq_block(block, x, block_kwargs[i], f"{arch.blocks}.{i}", arch, g, sizes, timings, losses)
        place.to_host(done)
        qtensors.update(done)
        block_s.append(time.perf_counter() - t_block)

    summary = {
        "method": "gptq", "w_bit": g.w_bit, "group_size": g.group_size, "zero_point": g.zero_point,
        "damp_percent": g.damp_percent, "block_size": g.block_size, "act_order": g.act_order,
        "static_groups": g.static_groups,
        "calibration": {"dataset": g.calib.dataset, "n_samples": g.calib.n_samples, "seqlen": g.calib.seqlen,
                        "seed": g.calib.seed},
        "layers_quantized": len(qtensors), "group_fallback_layers": fallbacks,
        "gptq_loss": losses,  # GPTQ's own error estimate per quantized input group (AutoGPTQ logs it as "avg loss")
        "block_seconds": block_s, "placement": {"compute": str(place.compute), "offload": place.offload},
        **packed_weight_bytes(model, qtensors),
    }
    return QuantOutcome(summary=summary, timings_s=timings, qtensors=qtensors)


@torch.no_grad()
def gptq_block(block, x: torch.Tensor, kwargs: dict, prefix: str, arch: Architecture, g: GPTQConfig,
               sizes: dict[str, int], timings: dict[str, float], losses: dict[str, float]):
    """One decoder block, on whatever device it and `x` are on: Hessians, GPTQ, propagation through the quantized
    block. Returns (the next block's inputs, {qualified Linear name: QTensor}); adds stage seconds to `timings`."""
    keys = _input_keys(arch)  # Linear -> the Linear whose input it shares
    shared: dict[str, list[str]] = {}
    for rel in arch.linears:
        shared.setdefault(keys[rel], []).append(rel)

    t = time.perf_counter()
    hess: dict[str, tuple] = {k: (None, 0) for k in shared}

    def hook(key):
        def fn(_mod, args, _out):
            hess[key] = accumulate_hessian(*hess[key], args[0])
        return fn

    hooks = [block.get_submodule(k).register_forward_hook(hook(k)) for k in shared]
    try:
        run_block(block, x, kwargs, [])
    finally:
        for h in hooks:
            h.remove()
    timings["hessian"] += time.perf_counter() - t

    t = time.perf_counter()
    done: dict[str, QTensor] = {}
    for key, rels in shared.items():
        H = hess.pop(key)[0]
        if not torch.isfinite(H).all():
            raise FloatingPointError(f"calibration activations at the input of {prefix}.{key} contain NaN/Inf "
                                     f"(check model.dtype and the calibration data)")
        lins = [block.get_submodule(r) for r in rels]
        gsz = {sizes[f"{prefix}.{r}"] for r in rels}
        assert len(gsz) == 1, f"{prefix}: Linears sharing one input got group sizes {gsz}"
        W = torch.cat([lin.weight for lin in lins])
        try:
            res = gptq_quantize(W, H, g.w_bit, gsz.pop(), g.zero_point, g.damp_percent, g.block_size, g.act_order,
                                g.static_groups)
        except FloatingPointError as e:
            raise FloatingPointError(f"{prefix}.{key}: {e}") from None
        losses[f"{prefix}.{key}"] = float(res.loss)
        r0 = 0
        for rel, lin in zip(rels, lins):
            qt = res.to_qtensor(slice(r0, r0 + lin.out_features))
            r0 += lin.out_features
            lin.weight.data.copy_(qt.dequantize(lin.weight.dtype))
            done[f"{prefix}.{rel}"] = qt
        del H
    timings["gptq"] += time.perf_counter() - t

    t = time.perf_counter()
    x_next, _ = run_block(block, x, kwargs, [])  # the quantized block's outputs feed the next block
    timings["propagate"] += time.perf_counter() - t
    return x_next, done
