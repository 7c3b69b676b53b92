"""W4A16 through gemlite (mobiusml/gemlite 0.6: Triton kernels, GEMV for one token, split-K GEMM for a few, GEMM
beyond), on CUDA. Its dequantization with `fma_mode=False` is `(q - zero) * scale` with the zero an integer held in
the activation dtype: AWQ's, so the kernel multiplies by the AWQ checkpoint's weights bit for bit (scales rounded to
the activation dtype, as the checkpoint stores them in fp16).

Autotuning: gemlite picks a Triton config per (M bucket, N, K, group) by timing candidates on first use. The configs it
found are kept per GPU model in `results/gpu/gemlite_autotune/<gpu>.json` (`save_autotune`) and loaded before the
first call (`load_autotune`), so a later run on the same GPU spends no device time on it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from quant.kernels.w4a16 import W4A16Kernel, W4A16KernelError, check_w4, register
from quant.primitives import QTensor

GEMLITE_VERSION = "0.6.0.post2"
AUTOTUNE_DIR = Path(__file__).resolve().parents[2] / "results" / "gpu" / "gemlite_autotune"
MIN_IN_FEATURES_MULTIPLE = 32  # gemlite packs 8 codes per int32 along K and tiles K by 32
_DTYPES = {torch.float16: "FP16", torch.bfloat16: "BF16"}
_loaded: set[str] = set()


def _gemlite():
    try:
        import gemlite
    except Exception as e:  # not installed, or no CUDA/triton driver here
        raise W4A16KernelError(f"gemlite does not import here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                               f"pip install gemlite=={GEMLITE_VERSION} on a CUDA machine") from None
    return gemlite


def unavailable(device: str, dtype: torch.dtype) -> str | None:
    if device != "cuda":
        return "gemlite's kernels run on CUDA only"
    if dtype not in _DTYPES:
        return f"gemlite takes fp16 or bf16 activations, not {dtype}"
    try:
        _gemlite()
    except W4A16KernelError as e:
        return str(e)
    return None


def check(qt: QTensor, where: str) -> None:
    check_w4(qt, where)
    out, inn = qt.q.shape
    if inn % MIN_IN_FEATURES_MULTIPLE or qt.group_size < 16:
        raise W4A16KernelError(f"{where}: gemlite needs in_features % {MIN_IN_FEATURES_MULTIPLE} == 0 and group size "
                               f">= 16 (got in_features={inn}, group size {qt.group_size})")


def pack_inputs(qt: QTensor, dtype: torch.dtype):
    """What `GemLiteLinearTriton.pack` takes for AWQ's convention: codes uint8 [N, K], scales and integer zeros
    [N, K/g] in the activation dtype (zeros 0..15 are exact in fp16/bf16)."""
    return qt.q.to(torch.uint8).contiguous(), qt.scales.to(dtype).contiguous(), qt.zeros.to(dtype).contiguous()


def autotune_path(gpu_name: str) -> Path:
    return AUTOTUNE_DIR / (re.sub(r"[^a-z0-9]+", "_", gpu_name.lower()).strip("_") + ".json")


def load_autotune(path: Path | None = None) -> Path | None:
    """Load this GPU's cached gemlite configs (once per process); the path loaded, or None when there is none."""
    gemlite = _gemlite()
    path = path or autotune_path(torch.cuda.get_device_name())
    if str(path) in _loaded or not path.is_file():
        return path if str(path) in _loaded else None
    gemlite.load_config(str(path))
    _loaded.add(str(path))
    return path


def save_autotune(path: Path | None = None) -> Path:
    gemlite = _gemlite()
    path = path or autotune_path(torch.cuda.get_device_name())
    path.parent.mkdir(parents=True, exist_ok=True)
    gemlite.cache_config(str(path))
    return path


class GemliteW4A16Linear(nn.Module):
    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype, device, where: str = ""):
        super().__init__()
        check(qt, where)
        gemlite = _gemlite()
        self.out_features, self.in_features = qt.q.shape
        self.group_size = qt.group_size
        dt = getattr(gemlite.DType, _DTYPES[dtype])
        q, s, z = (t.to(device) for t in pack_inputs(qt, dtype))
        self.inner = gemlite.GemLiteLinearTriton(W_nbits=4, group_size=qt.group_size, in_features=self.in_features,
                                                 out_features=self.out_features, input_dtype=dt, output_dtype=dt)
        self.inner.pack(q, s, z, bias=None if bias is None else bias.detach().to(device=device, dtype=dtype),
                        fma_mode=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.inner.W_q, self.inner.scales, self.inner.zeros))


register(W4A16Kernel(
    name="gemlite", description=f"gemlite {GEMLITE_VERSION} W4A16 (Triton GEMV / split-K GEMM)",
    build=lambda qt, bias, dtype, device, where: GemliteW4A16Linear(qt, bias, dtype, device, where),
    unavailable=unavailable, check=check, exact=True))
