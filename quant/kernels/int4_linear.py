"""Real int4 weight-only Linears through torch's own int4 kernel ("tinygemm", what torchao's int4 weight-only config
runs), on the CPU (torch >= 2.6) and on CUDA:

  CPU:  packed = aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, inner_k_tiles)
        y      = aten._weight_int4pack_mm_for_cpu(x bf16 [M, K], packed, group_size, scales_and_zeros bf16 [K/g, N, 2])
  CUDA: packed = aten._convert_weight_to_int4pack(uint8 [N, K/2]: code 2j in the high nibble, 2j+1 in the low, as
                 torchao's TensorCoreTiledLayout packs, inner_k_tiles)
        y      = aten._weight_int4pack_mm(x bf16 [M, K], packed, group_size, scales_and_zeros bf16 [K/g, N, 2])

The kernel dequantizes w = (q - 8) * scale + zero with a floating-point zero (tinygemm's convention, as torchao's
Int4CPULayout). AWQ's integer zero point z gives w = (q - z) * s = (q - 8) * s + (8 - z) * s, so zero = (8 - z) * s.
The packed layout depends on the device (and the CPU's ISA), so packing happens here, at swap time, never in a
checkpoint. Shape limits: group_size in {32, 64, 128, 256}, K divisible by group_size, N divisible by 16 (CPU) / 8
(CUDA); on CUDA K divisible by 16 * inner_k_tiles (the largest of 8, 4, 2 that divides it is taken).
"""
from __future__ import annotations

import torch
from torch import nn

from quant.primitives import QTensor
from harness.storage_bytes import distinct_param_bytes

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
KERNEL_N_MULTIPLE = 16
CUDA_INNER_K_TILES = (8, 4, 2)
COMPUTE_DTYPE = torch.bfloat16  # the fast path (AVX-512/AMX); float32 also runs, exactly but ~30x slower: for checks


class Int4KernelError(RuntimeError):
    pass


def _ops(device: str = "cpu"):
    aten = torch.ops.aten
    if device == "cuda":
        if not (hasattr(aten, "_convert_weight_to_int4pack") and hasattr(aten, "_weight_int4pack_mm")):
            raise Int4KernelError(f"torch {torch.__version__} lacks aten._convert_weight_to_int4pack / _weight_int4pack_mm")
        return aten._convert_weight_to_int4pack, aten._weight_int4pack_mm
    if not (hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")):
        raise Int4KernelError(f"torch {torch.__version__} lacks aten._convert_weight_to_int4pack_for_cpu / "
                              f"_weight_int4pack_mm_for_cpu (needs torch >= 2.6, CPU build)")
    return aten._convert_weight_to_int4pack_for_cpu, aten._weight_int4pack_mm_for_cpu


def cuda_inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in CUDA_INNER_K_TILES if in_features % (16 * t) == 0), None)


def pack_nibbles_cuda(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 -> uint8 [N, K/2], code 2j in the high nibble (what aten._convert_weight_to_int4pack
    takes on CUDA since torch 2.5)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()


def check_int4_kernel(qt: QTensor, where: str = "") -> None:
    at = f" ({where})" if where else ""
    out, inn = qt.q.shape
    if qt.w_bit != 4:
        raise Int4KernelError(f"quant.w_bit={qt.w_bit}{at}: the int4 kernel takes 4-bit weights only")
    if qt.zeros is None:
        raise Int4KernelError(f"quant.zero_point=False{at}: the int4 kernel takes unsigned codes with a zero point")
    if qt.group_size not in KERNEL_GROUP_SIZES:
        raise Int4KernelError(f"quant.group_size={qt.group_size}{at}: the int4 CPU kernel takes group sizes "
                              f"{KERNEL_GROUP_SIZES}")
    if inn % qt.group_size:
        raise Int4KernelError(f"quant.group_size={qt.group_size}{at} does not divide in_features={inn}")
    if out % KERNEL_N_MULTIPLE:
        raise Int4KernelError(f"out_features={out}{at} is not a multiple of {KERNEL_N_MULTIPLE}, which the int4 CPU "
                              f"kernel needs")


def scales_and_zeros(qt: QTensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """[K/g, N, 2]: tinygemm's per-group (scale, float zero), from AWQ's (scale, integer zero)."""
    scale = qt.scales.float()
    zero_f = (8.0 - qt.zeros.float()) * scale
    return torch.stack([scale.t(), zero_f.t()], dim=-1).to(dtype).contiguous()


def kernel_dequantize(qt: QTensor, dtype: torch.dtype = torch.float32,
                      compute_dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """The weight the kernel multiplies by: (q - 8) * scale + zero, scale and zero rounded to the compute dtype."""
    sz = scales_and_zeros(qt, compute_dtype).float()  # [G, N, 2]
    s, z = sz[..., 0].t(), sz[..., 1].t()  # [N, G]
    out, inn = qt.q.shape
    qg = qt.q.float().reshape(out, inn // qt.group_size, qt.group_size)
    return ((qg - 8.0) * s[..., None] + z[..., None]).reshape(out, inn).to(dtype)


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W^T + b with W held as packed int4 codes and per-group (scale, float zero) in the compute dtype."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None = None, where: str = "",
                 compute_dtype: torch.dtype = COMPUTE_DTYPE, device="cpu"):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.device_type = torch.device(device).type
        check_int4_kernel(qt, where)
        convert, _ = _ops(self.device_type)
        self.out_features, self.in_features = qt.q.shape
        self.group_size = qt.group_size
        try:
            if self.device_type == "cuda":
                tiles = cuda_inner_k_tiles(self.in_features)
                if tiles is None:
                    raise RuntimeError(f"in_features={self.in_features} is not a multiple of 32")
                packed = convert(pack_nibbles_cuda(qt.q).to(device), tiles)
            else:  # inner_k_tiles is a CUDA tiling knob; the CPU op ignores it (same packed bytes for 1, 2, 4, 8)
                packed = convert(qt.q.to(torch.int32).contiguous(), 1)
        except RuntimeError as e:
            raise Int4KernelError(f"{where or 'int4 pack'}: torch's int4 packing refused "
                                  f"[{self.out_features}, {self.in_features}]: {e}") from e
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros(qt, compute_dtype).to(device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device=device, dtype=compute_dtype).clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qt: QTensor, where: str = "",
                    compute_dtype: torch.dtype = COMPUTE_DTYPE) -> "Int4WeightOnlyLinear":
        if tuple(qt.q.shape) != tuple(linear.weight.shape):
            raise Int4KernelError(f"{where}: QTensor shape {tuple(qt.q.shape)} != weight shape {tuple(linear.weight.shape)}")
        return cls(qt, linear.bias, where, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, mm = _ops(self.device_type)
        shape = x.shape
        y = mm(x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous(), self.packed_weight, self.group_size,
               self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def packed_bytes(self) -> int:
        n = self.packed_weight.numel() * self.packed_weight.element_size()
        n += self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return n

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"int4, compute_dtype={self.compute_dtype}")


def swap_int4_linears(model: nn.Module, qtensors: dict[str, QTensor],
                      compute_dtype: torch.dtype = COMPUTE_DTYPE) -> nn.Module:
    """Replace each named nn.Linear by an Int4WeightOnlyLinear, in place. Everything else (lm_head, embeddings, norms)
    is left as it is: cast the model to bf16 first for an all-bf16 run. Checks every Linear before swapping any."""
    modules = dict(model.named_modules())
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, qt in qtensors.items():
        if not isinstance(modules.get(name), nn.Linear):
            raise Int4KernelError(f"{name}: not an nn.Linear of this model")
        if modules[name] is out_emb:
            raise Int4KernelError(f"{name}: the output embedding stays bf16 (tied to the input embedding in SmolLM2)")
        check_int4_kernel(qt, name)
    _ops()
    for name, qt in qtensors.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, Int4WeightOnlyLinear.from_linear(modules[name], qt, name, compute_dtype))
    return model


def weight_bytes(model: nn.Module) -> dict:
    """Bytes the model's weights really occupy: parameters (tied ones once) plus the int4 modules' packed buffers."""
    params = distinct_param_bytes(model)
    int4 = [m for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    packed = sum(m.packed_weight.numel() * m.packed_weight.element_size() for m in int4)
    sz = sum(m.scales_and_zeros.numel() * m.scales_and_zeros.element_size() for m in int4)
    return {"total_bytes": params + packed + sz, "param_bytes": params, "int4_packed_bytes": packed,
            "int4_scales_zeros_bytes": sz, "n_int4_linears": len(int4)}


def _tinygemm_unavailable(device: str, dtype: torch.dtype) -> str | None:
    if device not in ("cpu", "cuda"):
        return f"torch's int4 kernel runs on cpu and cuda, not {device}"
    try:
        _ops(device)
    except Int4KernelError as e:
        return str(e)
    return None


def _register():
    from quant.kernels.w4a16 import W4A16Kernel, W4A16KernelError, register

    def check(qt: QTensor, where: str) -> None:
        try:
            check_int4_kernel(qt, where)
        except Int4KernelError as e:
            raise W4A16KernelError(str(e)) from None

    def build(qt, bias, dtype, device, where):
        try:
            return Int4WeightOnlyLinear(qt, bias, where, COMPUTE_DTYPE, device)
        except Int4KernelError as e:
            raise W4A16KernelError(str(e)) from None

    # not exact: the float zero (8 - z) * s and the scale are rounded to bf16 (kernel_dequantize gives its weights)
    register(W4A16Kernel(name="tinygemm", description="torch int4 (aten._weight_int4pack_mm, tinygemm; bf16)",
                         build=build, unavailable=_tinygemm_unavailable, check=check, exact=False))


_register()
