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
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

ENGINE = "engine"  # LMDeploy's own kernel
KERNELS = (ENGINE, "gemlite", "tinygemm")
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
        out = self.module(x)
        if out.dim() == 2:
            out = out.unsqueeze(0)
        if all_reduce:
            import lmdeploy.pytorch.distributed as dist

            dist.all_reduce(out, group=group)
        return out


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

    def build(spec):
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
    return f"LMDeploy PyTorch engine + {kernel} W4A16"
