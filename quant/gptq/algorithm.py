"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) as pure functions over tensors.

The steps follow AutoGPTQ's `GPTQ.fasterquant` (auto_gptq/quantization/gptq.py) and llm-compressor's
`quantize_weight` (modifiers/gptq/gptq_quantize.py):
  H = 2/n sum_x x x^T over the calibration tokens (a running average, as `add_batch`);
  dead inputs (H_kk = 0) get H_kk = 1 and their weight column zeroed;
  with act_order, columns are processed in order of decreasing H_kk;
  H += damp_percent * mean(diag H) * I, and Hinv = the upper Cholesky factor of H^-1 (paper section 3.3);
  columns are quantized one at a time, each one's error spread over the not yet quantized columns of its block
  through Hinv's row, and the block's errors applied to the columns after it in one matrix product (the "lazy batch
  updates" of section 3.3).
The quantization grid is the repository's (quant/primitives.py: llm-awq's asymmetric min/max grid), so GPTQ, RTN and
AWQ differ only in how codes are chosen. Group parameters are computed either when a group starts, on the weights as
updated so far (dynamic groups: the paper's and AutoGPTQ's default; AutoGPTQ reads the group's columns before the
in-block updates of the current block, here they are read after them, which is what the column-by-column algorithm
computes), or all at once on the original weights before reordering (static groups: AutoGPTQ `static_groups`,
llm-compressor's actorder="static"), which keeps the checkpoint's g_idx the trivial k // group_size.

FP4 formats (quant/formats/fp4.py; llm-compressor's and GPTQModel's NVFP4/MXFP4 GPTQ): every block's scale (and
NVFP4's per-tensor global scale) is computed from the original weights before the column loop, as static groups are,
by the format's own definition (the scales RTN would use); each column's updated values are then rounded onto the
e2m1 grid under its block's factor, and the error spread as for integers. Stacked Linears (q/k/v) keep one global
scale each (`segments`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from quant.formats.fp4 import (FP4_FORMATS, FP4Tensor, block_scales, dequantize_blocks, e2m1_codes, e2m1_values,
                               fp4_scales)
from quant.kernels import gptq_columns
from quant.primitives import (QTensor, _grouped, check_group_size, dequantize, effective_group_size, quant_params, quantize,
                              range_params)


def accumulate_hessian(H: Optional[torch.Tensor], n_tokens: int, x: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Add the inputs x [..., in] of one Linear to the running average H = 2/n sum x x^T; returns (H, n).

    AutoGPTQ counts sequences in n, llm-compressor counts them and divides at the end; here n counts tokens. The
    scale of H does not change GPTQ's result (the dampening is relative, and only ratios of Hinv enter the updates).
    Accumulated in float32 (llm-compressor's GPTQ_PRECISION) on x's device."""
    x = x.reshape(-1, x.shape[-1])
    if H is None:
        H = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
    total = n_tokens + x.shape[0]
    xf = x.to(H.dtype)
    H.addmm_(xf.t(), xf, beta=n_tokens / total, alpha=2.0 / total)
    return H, total


def inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = damp_percent * mean(diag H): row k of U divided by U_kk is
    the update that spreads column k's rounding error over the columns after it (paper section 3.3). H is changed."""
    damp = damp_percent * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:  # llm-compressor falls back to RTN here; a silent fallback hides it
        raise FloatingPointError(f"the dampened Hessian is not positive definite ({str(e).splitlines()[0]}); "
                                 f"raise damp_percent or use more calibration tokens") from None


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop's ops touch a few thousand numbers each: on the CPU, splitting them across threads costs more
    than it saves (measured on this 2-core machine under load: 230 vs 1,550 us per column of a [192, 576] weight with
    1 vs 2 threads). The thread count is restored afterwards; the block-wide matrix products run outside."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class GPTQResult:
    """Codes [out, in] in the original column order; scales / zeros [out, n_groups]; g_idx [in]: the group of each
    input column (k // group_size unless act_order runs with dynamic groups); perm: the processing order."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    g_idx: torch.Tensor
    w_bit: int
    group_size: int
    perm: Optional[torch.Tensor]
    loss: torch.Tensor  # GPTQ's own error estimate, sum of (w - q)^2 / Hinv_kk^2 / 2 (AutoGPTQ logs it as "avg loss")
    # an FP4 result (format nvfp4 | mxfp4): q holds e2m1 codes, scales the format's block scales (fp8 e4m3 / e8m0
    # exponents) and global_scale NVFP4's per-tensor scale repeated per row [out, 1] (stacked tensors: each its own)
    format: str = "int"
    global_scale: Optional[torch.Tensor] = None

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.format != "int":
            return dequantize_blocks(self.q, block_scales(self.scales, self.global_scale, self.format),
                                     self.format).to(dtype)
        g = self.g_idx.long()
        qf = self.q.float()
        if self.zeros is not None:
            qf = qf - self.zeros[:, g]
        return (qf * self.scales[:, g]).to(dtype)

    def trivial_g_idx(self) -> bool:
        cols = self.q.shape[1]
        return torch.equal(self.g_idx.long(), torch.arange(cols, device=self.g_idx.device) // self.group_size)

    def to_qtensor(self, rows: slice = slice(None)) -> QTensor | FP4Tensor:
        """The rows' codes as the QTensor RTN and AWQ produce (needs the trivial g_idx: static groups), or, for an FP4
        result, as the FP4Tensor RTN produces (the rows of one stacked tensor: one global scale)."""
        if self.format != "int":
            g = None
            if self.global_scale is not None:
                g = self.global_scale[rows]
                if not torch.equal(g, g[:1].expand_as(g)):
                    raise ValueError("rows of more than one NVFP4 tensor (their global scales differ)")
                g = g[0].clone().reshape(1)
            return FP4Tensor(self.q[rows].clone(), self.scales[rows].clone(), g, self.format)
        if not self.trivial_g_idx():
            raise ValueError("GPTQ result with a permuted g_idx (act_order with dynamic groups) has no QTensor form")
        z = None if self.zeros is None else self.zeros[rows].clone()  # clones: a row slice owns its storage
        return QTensor(self.q[rows].clone(), self.scales[rows].clone(), z, self.w_bit, self.group_size)


GRIDS = ("minmax", "mse")
# the GPTQ reference's MSE grid (Frantar et al.'s quant.py Quantizer(mse=True), AutoGPTQ's `mse` option)
MSE_STEPS, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4


def group_grid(w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool, grid: str = "minmax"):
    """Scales and zeros [out, n_groups] for the groups of w [out, in]. "minmax": each group's own range (RTN's grid,
    llm-compressor's default observer). "mse": that range shrunk by 1 - k/100 for k < 80, keeping per group the
    shrink with the least sum |w - q(w)|^2.4 (the GPTQ reference implementation's `mse` search)."""
    if grid == "minmax":
        return quant_params(w, w_bit, group_size, zero_point)
    if grid != "mse":
        raise ValueError(f"unknown GPTQ grid {grid!r} ({', '.join(GRIDS)})")
    wg = _grouped(w.float(), group_size)  # [out, G, g]
    mx, mn = (wg.amax(-1), wg.amin(-1)) if zero_point else (wg.abs().amax(-1), None)
    best = torch.full(mx.shape, float("inf"), device=w.device)
    scales, zeros = range_params(mx, mn, w_bit, zero_point)
    lo, hi = (0, 2**w_bit - 1) if zero_point else (-(2 ** (w_bit - 1)), 2 ** (w_bit - 1) - 1)
    for k in range(int(MSE_MAX_SHRINK * MSE_STEPS)):
        p = 1 - k / MSE_STEPS
        s, z = range_params(mx * p, None if mn is None else mn * p, w_bit, zero_point)
        z0 = 0 if z is None else z[..., None]
        q = torch.clamp(torch.round(wg / s[..., None]) + z0, lo, hi)
        err = ((q - z0) * s[..., None] - wg).abs().pow(MSE_NORM).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scales = torch.where(better, s, scales)
        if z is not None:
            zeros = torch.where(better, z, zeros)
    return scales, zeros


def _group_columns(Wt, Wt1, Errt1, Hinv, i1, i2, i, g):
    """Columns j..j+g (j = i1 + i) of the weights as updated by every column before j, as rows of the transposed
    weights: inside the block they are in Wt1; past the block they still lack this block's updates so far (Errt1 is
    zero from row i on)."""
    j = i1 + i
    inside = Wt1[i : i + g]
    if j + g <= i2:
        return inside
    past = Wt[i2 : j + g] - Hinv[i1:i2, i2 : j + g].t() @ Errt1
    return torch.cat([inside, past])


def _column(Wt1, i, s, z, Hinv1, inv_d, lo, hi):
    """Quantize column i of the block (row i of the transposed weights Wt1) on the grid (s, z), spread its error over
    the block's later columns in place; returns (its codes, its scaled error)."""
    w = Wt1[i]
    q = torch.clamp(torch.round(w.float() / s) + z, lo, hi)
    err = (w - ((q - z) * s).to(Wt1.dtype)) * inv_d[i]
    Wt1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
    return q, err


def _static_columns(Wt1, S1, Z1, Hinv1, inv_d, lo, hi, Qt1, Errt1):
    """The column loop of one block whose grids S1, Z1 [block, rows] are fixed in advance (static groups), writing
    Qt1 and Errt1 in place: the same ops in the same order for every block of one shape."""
    for i in range(Wt1.shape[0]):
        Qt1[i], Errt1[i] = _column(Wt1, i, S1[i], Z1[i], Hinv1, inv_d, lo, hi)


class _BlockGraph:
    """`_static_columns` captured once as a CUDA graph for one (block, rows, dtype, grid range) shape and replayed for
    every block of that shape: about ten small kernels per column are one launch per block instead (eager, a 7B's
    23,296 columns per decoder block are launch-bound). The replay computes exactly what the eager loop computes."""

    def __init__(self, shape, dtype, grid_dtype, device, lo, hi):
        b, rows = shape
        z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.W, self.H, self.inv = z(b, rows), z(b, b), z(b)
        self.S, self.Z = z(b, rows, dt=grid_dtype), z(b, rows, dt=grid_dtype)
        self.Q, self.E = torch.zeros(b, rows, dtype=torch.float32, device=device), z(b, rows)
        args = (self.W, self.S, self.Z, self.H, self.inv, lo, hi, self.Q, self.E)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
            _static_columns(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _static_columns(*args)

    def run(self, Wt1, S1, Z1, Hinv1, inv_d):
        for dst, src in ((self.W, Wt1), (self.S, S1), (self.Z, Z1), (self.H, Hinv1), (self.inv, inv_d)):
            dst.copy_(src)
        self.graph.replay()
        return self.Q.clone(), self.E.clone()


_GRAPHS: dict[tuple, _BlockGraph] = {}
USE_CUDA_GRAPHS = True  # tests turn it off to compare with the eager loop
USE_KERNEL = True  # the Triton kernel (quant/kernels/gptq_columns.py) where it runs; tests turn it off


def _fp4_block(Wt1, F1, Hinv1, inv_d):
    """Codes [block, rows] (float32) and scaled errors of one block of columns rounded onto the e2m1 grid under the
    fixed factors F1 [block, rows] (each column's block scale / global scale, or 2^e); Wt1 is not changed. The eager
    loop on every device (the Triton kernel and the CUDA graphs hold the integer grid)."""
    Wt1 = Wt1.clone()
    Qt1 = torch.zeros(Wt1.shape, dtype=torch.float32, device=Wt1.device)
    Errt1 = torch.zeros_like(Wt1)
    with _one_cpu_thread(Wt1.device):
        for i in range(Wt1.shape[0]):
            w = Wt1[i]
            c = e2m1_codes(w.float() / F1[i])  # quant.formats.fp4.quantize_blocks on one column
            err = (w - (e2m1_values(c) * F1[i]).to(Wt1.dtype)) * inv_d[i]
            Wt1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Qt1[i], Errt1[i] = c.float(), err
    return Qt1, Errt1


def fp4_grid(W: torch.Tensor, fmt: str, segments: Optional[list[int]] = None):
    """(block scales [out, in // block], global scale per row [out, 1] or None, factors [out, in // block]) of W in
    `fmt`, each of the stacked tensors of `segments` rows (default: W is one) with its own NVFP4 global scale."""
    segments = segments or [W.shape[0]]
    if sum(segments) != W.shape[0]:
        raise ValueError(f"segments {segments} do not add up to the {W.shape[0]} rows")
    scales, globals_, r0 = [], [], 0
    for n in segments:
        sc, g = fp4_scales(W[r0 : r0 + n], fmt)
        scales.append(sc)
        if g is not None:
            globals_.append(g.reshape(1, 1).expand(n, 1))
        r0 += n
    scales = torch.cat(scales)
    g = torch.cat(globals_) if globals_ else None
    return scales, g, block_scales(scales, g, fmt)


def _static_block(Wt1, S1, Z1, Hinv1, inv_d, lo, hi):
    """Codes [block, rows] (float32) and scaled errors of one block of columns with fixed grids; Wt1 is not changed.
    On a GPU: one Triton kernel per block (float32, the method's precision), else one replayed CUDA graph; on the
    CPU: the eager loop."""
    dev = Wt1.device
    if USE_KERNEL and Wt1.dtype == torch.float32 and gptq_columns.available(dev):
        return gptq_columns.static_block(Wt1, S1, Z1, Hinv1, inv_d, lo, hi)
    if dev.type == "cuda" and USE_CUDA_GRAPHS:
        key = (tuple(Wt1.shape), Wt1.dtype, S1.dtype, str(dev), lo, hi)
        if key not in _GRAPHS:
            _GRAPHS[key] = _BlockGraph(tuple(Wt1.shape), Wt1.dtype, S1.dtype, dev, lo, hi)
        return _GRAPHS[key].run(Wt1, S1, Z1.to(S1.dtype), Hinv1, inv_d)
    Wt1 = Wt1.clone()
    Qt1 = torch.zeros(Wt1.shape, dtype=torch.float32, device=dev)
    Errt1 = torch.zeros_like(Wt1)
    with _one_cpu_thread(dev):
        _static_columns(Wt1, S1, Z1, Hinv1, inv_d, lo, hi, Qt1, Errt1)
    return Qt1, Errt1


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True,
                  damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True,
                  static_groups: bool = True, grid: str = "minmax", fmt: str = "int",
                  segments: Optional[list[int]] = None) -> GPTQResult:
    """GPTQ codes for the weight W [out, in] of a Linear whose inputs have the Hessian H [in, in] (from
    `accumulate_hessian`). Computes in H's dtype (float32 upstream) on W's device; W and H are left unchanged.
    `fmt` nvfp4 / mxfp4: e2m1 codes under the format's block scales (group_size must be its block, static groups,
    the min/max grid: the format defines the scales); `segments`: row counts of the tensors stacked in W (each its
    own NVFP4 global scale)."""
    rows, cols = W.shape
    if fmt != "int":
        if group_size != FP4_FORMATS[fmt] or zero_point or not static_groups or grid != "minmax":
            raise ValueError(f"GPTQ in {fmt} takes group_size={FP4_FORMATS[fmt]}, no zero point, static groups and "
                             f"the format's own scales (grid=minmax); got group_size={group_size}, "
                             f"zero_point={zero_point}, static_groups={static_groups}, grid={grid}")
    check_group_size(cols, group_size)
    g = effective_group_size(cols, group_size)
    dev, dt = W.device, H.dtype
    W = W.to(dt).clone()
    H = H.clone()
    dead = torch.diag(H) == 0  # an input that is always zero: any weight works; AutoGPTQ zeroes it
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = cols // g
    global_scale = None
    if fmt != "int":  # the format's scales from the original weights, as static groups (factors: the loop's grid)
        scales, global_scale, factors = fp4_grid(W, fmt, segments)
        zeros = None
    elif static_groups:  # every group's grid from the original weights, in the original column order
        scales, zeros = group_grid(W, w_bit, g, zero_point, grid)
    else:
        scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=dev)
        zeros = torch.zeros(rows, n_groups, dtype=torch.float32, device=dev) if zero_point else None

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    order = perm.tolist() if perm is not None else list(range(cols))
    # the group whose grid quantizes processing position j: the original column's group (static), else j's own
    gid = [c // g for c in order] if static_groups else [j // g for j in range(cols)]

    Hinv = inverse_hessian_factor(H, damp_percent)
    # The loop works on transposed copies, so that a weight column, its grid and its codes are contiguous rows. Each
    # column is quantized with quant/primitives.py's formulas written out (quantize: clamp(round(w / s) + z, lo, hi);
    # dequantize: (q - z) * s; in float32; symmetric: z = 0), which saves the per-call reshapes of a column loop that
    # runs once per input channel; tests/quant/test_gptq.py checks the codes against a reference that calls them.
    Wt = W.t().contiguous()
    st = (factors if fmt != "int" else scales).t().contiguous()
    zt = zeros.t().contiguous() if zeros is not None else torch.zeros_like(st)
    lo, hi = (0, 2**w_bit - 1) if zero_point else (-(2 ** (w_bit - 1)), 2 ** (w_bit - 1) - 1)
    Qt = torch.zeros(cols, rows, dtype=torch.float32, device=dev)
    loss = torch.zeros((), dtype=dt, device=dev)
    gid_t = torch.tensor(gid, device=dev)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Hinv1 = Hinv[i1:i2, i1:i2]
        inv_d = 1.0 / torch.diagonal(Hinv1)
        if fmt != "int":
            Qt[i1:i2], Errt1 = _fp4_block(Wt[i1:i2], st[gid_t[i1:i2]], Hinv1, inv_d)
        elif static_groups:  # every column's grid is known: the block's loop is one fixed sequence of ops
            S1, Z1 = st[gid_t[i1:i2]], zt[gid_t[i1:i2]]
            Qt[i1:i2], Errt1 = _static_block(Wt[i1:i2], S1, Z1, Hinv1, inv_d, lo, hi)
        else:
            Wt1 = Wt[i1:i2].clone()
            Errt1 = torch.zeros_like(Wt1)
            with _one_cpu_thread(dev):
                for i in range(i2 - i1):
                    j = i1 + i
                    if j % g == 0:
                        cur = _group_columns(Wt, Wt1, Errt1, Hinv, i1, i2, i, g).t()
                        s, z = group_grid(cur, w_bit, -1, zero_point, grid)
                        st[j // g] = s[:, 0]
                        if zeros is not None:
                            zt[j // g] = z[:, 0]
                    Qt[j], Errt1[i] = _column(Wt1, i, st[gid[j]], zt[gid[j]], Hinv1, inv_d, lo, hi)
        loss += Errt1.pow(2).sum() / 2
        Wt[i2:].sub_(Hinv[i1:i2, i2:].t() @ Errt1)

    Q = Qt.t().to(torch.uint8 if zero_point or fmt != "int" else torch.int8).contiguous()
    if fmt == "int":
        scales = st.t().contiguous()
    zeros = zt.t().contiguous() if zeros is not None else None
    g_idx = torch.arange(cols, device=dev, dtype=torch.int32) // g
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        if not static_groups:
            g_idx = g_idx[invperm]  # original column perm[j] was quantized with position j's group
    return GPTQResult(Q, scales, zeros, g_idx, w_bit, g, perm, loss, fmt, global_scale)
