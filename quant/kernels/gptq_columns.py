"""GPTQ's column loop for one block of columns with fixed grids (static groups) as one Triton kernel.

The loop (quant.gptq.algorithm._static_columns) quantizes the block's columns one after the other and spreads each
column's rounding error over the block's later columns; every row of the weight goes through it independently, given
the inverse Hessian's factor. Eager PyTorch runs about ten small kernels per column; a 7B decoder block has 23,296
columns, so the loop is bound by kernel launches (about 1.1 s of GPU time per block on an H200, even replayed as a CUDA
graph). Here each program holds a tile [block columns, BLOCK_R rows] of the transposed weights in registers and runs
the whole loop over it: one launch per block of columns.

Per column i of the block, for the program's rows r (the eager loop's formulas, float32):
    q = clamp(round_half_even(w[i, r] / s[i, r]) + z[i, r], lo, hi)
    e = (w[i, r] - (q - z[i, r]) * s[i, r]) / Hinv[i, i]
    w[k, r] -= Hinv[i, k] * e        for k >= i
The division is IEEE-rounded (div_rn) and fused multiply-adds are turned off, so each column's codes are the eager
loop's up to the last-bit rounding of the rank-one update (where torch's `addr_` may fuse and this does not); tests
compare the codes with the eager loop's on the CPU through Triton's interpreter (TRITON_INTERPRET=1) and on a GPU.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton: the eager loop runs
    triton = None

BLOCK_R = 64  # rows per program: a [128, 64] float32 tile is 64 registers per thread at 4 warps
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on `device` (a GPU with triton, or any device under the interpreter)."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


if triton is not None:

    @triton.jit
    def _columns_kernel(W, S, Z, H, INV, Q, E, R, stride_h, lo, hi, B: tl.constexpr, BP: tl.constexpr,
                        BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.arange(0, BP)
        rmask = r < R
        kmask = k < B
        tile = tl.load(W + k[:, None] * R + r[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0)
        for i in range(B):
            w = tl.sum(tl.where((k == i)[:, None], tile, 0.0), axis=0)  # row i of the tile
            s = tl.load(S + i * R + r, mask=rmask, other=1.0)
            z = tl.load(Z + i * R + r, mask=rmask, other=0.0)
            x = tl.math.div_rn(w, s)
            f = tl.floor(x)
            d = x - f  # exact for |x| < 2^23
            odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
            up = (d > 0.5) | ((d == 0.5) & odd)  # round half to even, as torch.round
            q = tl.minimum(tl.maximum(f + tl.where(up, 1.0, 0.0) + z, lo), hi)
            e = (w - (q - z) * s) * tl.load(INV + i)
            tl.store(Q + i * R + r, q, mask=rmask)
            tl.store(E + i * R + r, e, mask=rmask)
            h = tl.load(H + i * stride_h + k, mask=kmask & (k >= i), other=0.0)
            tile = tile - h[:, None] * e[None, :]


def static_block(Wt1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, Hinv1: torch.Tensor, inv_d: torch.Tensor,
                 lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [b, rows] (float32) and scaled errors (Wt1's dtype) of one block of b <= 128 columns, given as rows of
    the transposed weights Wt1 [b, rows] with their grids S1, Z1 [b, rows]; Hinv1 [b, b] is the block's part of the
    upper Cholesky factor of H^-1, inv_d = 1 / its diagonal. Wt1 is not changed. float32 only."""
    b, rows = Wt1.shape
    if Wt1.dtype != torch.float32 or b > 128:
        raise ValueError(f"the kernel takes float32 blocks of at most 128 columns (got {Wt1.dtype}, {b})")
    W = Wt1.contiguous()
    S, Z = S1.to(torch.float32).contiguous(), Z1.to(torch.float32).contiguous()
    H = Hinv1 if Hinv1.stride(1) == 1 else Hinv1.contiguous()
    inv = inv_d.to(torch.float32).contiguous()
    Q = torch.empty(b, rows, dtype=torch.float32, device=W.device)
    E = torch.empty_like(W)
    extra = {} if INTERPRET else {"enable_fp_fusion": False}
    _columns_kernel[(triton.cdiv(rows, BLOCK_R),)](W, S, Z, H, inv, Q, E, rows, H.stride(0), float(lo), float(hi),
                                                   B=b, BP=triton.next_power_of_2(b), BLOCK_R=BLOCK_R, num_warps=4,
                                                   **extra)
    return Q, E
