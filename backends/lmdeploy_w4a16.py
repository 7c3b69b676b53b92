"""Opt-in: LMDeploy's PyTorch engine runs its AWQ W4A16 linears through one of the harness's kernels
(quant/kernels/w4a16.py: gemlite, torch's int4) instead of its own Triton `awq_linear`.

LMDeploy 0.18 builds every W4A16 linear of the PyTorch engine in one place,
`lmdeploy.pytorch.backends.cuda.awq_modules._build_linear_w4a16(spec)`, which returns an implementation with
`update_weights(qweight, scales, qzeros, bias)` (called once the checkpoint's AWQ GEMM tensors are loaded) and
`forward(x, qweight, scales, qzeros, bias, all_reduce, group)`. `install(kernel)` replaces that builder (the op
backend imports it at call time) with one returning `HarnessW4A16Impl`, which unpacks the loaded AWQ tensors into the
harness's QTensor (quant/export/awq.awq_to_qtensor: the exact inverse of the export) and packs them for the kernel;
`uninstall()` puts LMDeploy's builder back. The engine's own kernel stays available as the default
(`backend.w4a16_kernel=engine`), so both are rows of one benchmark. Single-GPU engines run the model in this process
(LMDeploy's `uni` executor), where the patch applies; `built_layers()` says how many linears were built through it,
so a run can check that the swap took effect.

`hybrid` keeps both: gemlite's GEMV/split-K kernel for calls of at most HYBRID_MAX_TOKENS tokens (decode steps of
small batches, where it reads the int4 weights near the bandwidth floor) and the engine's own kernel above (prefill and
large batches, where gemlite's GEMM lags: results/gpu/w4a16_2026-12-07/w4a16_kernels). It holds both packings, so its
int4 weights take twice the memory of either (still about half of fp16's); the label says so.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

ENGINE = "engine"  # LMDeploy's own kernel
HYBRID = "hybrid"  # gemlite for small calls, the engine's own kernel above
KERNELS = (ENGINE, "gemlite", "tinygemm", HYBRID)
HYBRID_MAX_TOKENS = 8  # from the kernel benchmark: gemlite 2.5x the engine's kernel at M=1, even at M=8, behind at 32
BUILDER_MODULE = "lmdeploy.pytorch.backends.cuda.awq_modules"
BUILDER = "_build_linear_w4a16"
_original: dict = {}
_built = {"layers": 0, "kernel": None}


class HarnessW4A16Impl:
    """LMDeploy's LinearW4A16Impl interface over a harness kernel module."""

    def __init__(self, in_features: int, out_features: int, w_bit: int, group_size: int, kernel: str):
        if w_bit != 4:
            raise ValueError(f"the harness's W4A16 kernels take 4-bit weights, not {w_bit}")
        self.in_features, self.out_features, self.group_size, self.kernel = in_features, out_features, group_size, kernel
        self.module = None

    def update_weights(self, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       bias: Optional[torch.Tensor] = None):
        from quant.export.awq import awq_to_qtensor
        from quant.kernels.w4a16 import resolve

        qt = awq_to_qtensor(qweight, qzeros, scales)
        if qt.group_size != self.group_size:
            raise ValueError(f"AWQ tensors have group size {qt.group_size}, the layer {self.group_size}")
        k, _ = resolve(self.kernel, qweight.device.type, scales.dtype, {"": qt})
        self.module = k.build(qt, bias, scales.dtype, qweight.device, "")
        _built["layers"] += 1
        _built["kernel"] = k.name
        return qweight, scales, qzeros, bias

    def forward(self, x, qweight=None, scales=None, qzeros=None, bias=None, all_reduce: bool = False, group=None):
        # LMDeploy's AWQ forward returns [1, tokens, out] for a 2-D input (`wq_gemm_forward`); so does this one
        out = self.module(x.flatten(0, -2)).reshape(*x.shape[:-1], -1)
        if out.dim() == 2:
            out = out.unsqueeze(0)
        if all_reduce:
            import lmdeploy.pytorch.distributed as dist

            dist.all_reduce(out, group=group)
        return out


class HybridW4A16Impl:
    """gemlite for calls of at most `max_tokens` tokens, LMDeploy's own implementation (`engine_impl`) above."""

    def __init__(self, engine_impl, spec, max_tokens: int = HYBRID_MAX_TOKENS, small_kernel: str = "gemlite"):
        self.engine = engine_impl
        self.small = HarnessW4A16Impl(spec.in_features, spec.out_features, spec.w_bit, spec.group_size, small_kernel)
        self.max_tokens = max_tokens
        self.calls = {"small": 0, "engine": 0}  # eager calls only: a captured graph replays without Python

    def update_weights(self, qweight, scales, qzeros, bias=None):
        self.small.update_weights(qweight, scales, qzeros, bias)  # packs a copy; the AWQ tensors stay as loaded
        own = getattr(self.engine, "update_weights", None)
        return own(qweight, scales, qzeros, bias) if own else (qweight, scales, qzeros, bias)

    def forward(self, x, qweight=None, scales=None, qzeros=None, bias=None, all_reduce: bool = False, group=None):
        if x.numel() // x.shape[-1] <= self.max_tokens:
            self.calls["small"] += 1
            return self.small.forward(x, qweight, scales, qzeros, bias, all_reduce, group)
        self.calls["engine"] += 1
        return self.engine.forward(x, qweight, scales, qzeros, bias, all_reduce, group)


def install(kernel: str, importer: Callable[[str], object] = importlib.import_module) -> None:
    """Make LMDeploy's PyTorch engine build its W4A16 linears with `kernel` (before the engine is created)."""
    if kernel not in KERNELS:
        raise ValueError(f"backend.w4a16_kernel={kernel!r}: choose one of {', '.join(KERNELS)}")
    mod = importer(BUILDER_MODULE)
    if kernel == ENGINE:
        uninstall(importer)
        return
    if BUILDER_MODULE not in _original:
        _original[BUILDER_MODULE] = getattr(mod, BUILDER)

    original = _original[BUILDER_MODULE]

    def build(spec):
        if kernel == HYBRID:
            return HybridW4A16Impl(original(spec), spec)
        return HarnessW4A16Impl(spec.in_features, spec.out_features, spec.w_bit, spec.group_size, kernel)

    build.harness_kernel = kernel
    setattr(mod, BUILDER, build)
    _built.update(layers=0, kernel=None)


def uninstall(importer: Callable[[str], object] = importlib.import_module) -> None:
    if BUILDER_MODULE in _original:
        setattr(importer(BUILDER_MODULE), BUILDER, _original.pop(BUILDER_MODULE))


def installed_kernel(importer: Callable[[str], object] = importlib.import_module) -> str:
    return getattr(getattr(importer(BUILDER_MODULE), BUILDER), "harness_kernel", ENGINE)


def built_layers() -> dict:
    """How many W4A16 linears the engine built through the harness's builder since `install`, and with which kernel."""
    return dict(_built)


def label(kernel: str) -> str:
    """How records and tables name the engine's W4A16 path."""
    if kernel == ENGINE:
        return "LMDeploy PyTorch engine (its Triton awq_linear)"
    if kernel == HYBRID:
        return (f"LMDeploy PyTorch engine + gemlite W4A16 up to {HYBRID_MAX_TOKENS} tokens per call, its own kernel "
                f"above (both packings held)")
    return f"LMDeploy PyTorch engine + {kernel} W4A16"
