"""AWQ's searches as functions over tensors (Lin et al. 2023, Sec. 3.2-3.3; llm-awq auto_scale.py / auto_clip.py).

- activation statistics: per-input-channel mean |x| (AWQ) or max |x| (LMDeploy's smoothing path)
- scale candidates s = mean|x|^alpha (optionally / w_mean^(1 - alpha), AutoAWQ's "duo scaling"), normalised so
  sqrt(max(s) * min(s)) = 1
- LMDeploy `auto_awq` without search: s = max|x|^0.5 / w_mean^0.5 (SmoothQuant-style fixed ratio)
- clipping: shrink each group's max |w| over a grid, keep the one with the least output error
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from quant.calibration.reduce import Reducer
from quant.primitives import fake_quantize

SCALE_MIN = 1e-4  # llm-awq / LMDeploy clamp


CHUNK = 8192  # tokens per chunk for statistics over large activation tensors
# weights per step of the clipping search on a GPU: rows of 256 left a 7B block's search launch-bound (0.45 s a block)
CLIP_GPU_ELEMENTS = 1 << 24


def act_abssum(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-channel sum of |x| over every token (float64 over float32 chunk sums: no full-size float32 copy) and the
    number of tokens: the parts of `act_absmean` that add up over data-parallel ranks."""
    x = x.reshape(-1, x.shape[-1])
    total = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], CHUNK):
        total += x[i : i + CHUNK].abs().sum(0, dtype=torch.float32).double()
    return total, x.shape[0]


def act_absmean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean |x| over every token, accumulated in float32 (in chunks: no full-size float32 copy)."""
    total, n = act_abssum(x)
    return (total / n).float()


def act_absmax(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return torch.stack([x[i : i + CHUNK].abs().amax(0).float() for i in range(0, x.shape[0], CHUNK)]).amax(0)


def weight_absmean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per-input-channel mean of |w| / max|w| within its group, over the rows of the concatenated weights
    (llm-awq/AutoAWQ/LMDeploy `get_weight_scale`)."""
    w = torch.cat([x.float() for x in weights], dim=0)
    g = w.shape[1] if group_size == -1 else group_size
    wg = w.abs().reshape(-1, g)
    wg = wg / wg.amax(dim=1, keepdim=True).clamp(min=SCALE_MIN)
    return wg.reshape(w.shape).mean(0)


def _normalise(s: torch.Tensor) -> torch.Tensor:
    return s / (s.max() * s.min()).sqrt()


def awq_scale(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=SCALE_MIN)
    else:
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=SCALE_MIN)).clamp(min=SCALE_MIN)
    return _normalise(s)


def smoothing_scale(x_absmax: torch.Tensor, w_mean: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """LMDeploy `lite auto_awq` default (search_scale=False): a fixed smoothing ratio, no search."""
    return _normalise((x_absmax.pow(alpha) / w_mean.pow(1 - alpha)).clamp(min=SCALE_MIN))


def grid_points(n_grid: int, strategy: str, loss: Callable[[int], float]) -> list[int]:
    """Which of the grid points 0..n_grid-1 to score, given `loss(i)` (memoised by the caller).

    - "full": every point (llm-awq, AutoAWQ, LMDeploy --search-scale).
    - "coarse_fine": every 4th point, then the two neighbours at distance 2 of the best so far, then those at
      distance 1: 9 of 20 points, and the same minimum as "full" whenever the loss is unimodal along the grid.
    """
    if strategy == "full":
        for i in range(n_grid):
            loss(i)
        return list(range(n_grid))
    if strategy != "coarse_fine":
        raise ValueError(f"unknown scale grid strategy {strategy!r} (full, coarse_fine)")
    seen = list(range(0, n_grid, 4))
    for i in seen:
        loss(i)
    for step in (2, 1):
        best = min(seen, key=loss)
        for j in (best - step, best + step):
            if 0 <= j < n_grid and j not in seen:
                loss(j)
                seen.append(j)
    return sorted(seen)


@torch.no_grad()
def search_scale(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    linears: Sequence[nn.Linear],
    x_mean: torch.Tensor,
    quantize_w: Callable[[torch.Tensor, int], torch.Tensor],
    n_grid: int,
    w_mean: torch.Tensor | None = None,
    strategy: str = "full",
    reduce: Reducer = Reducer(),
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """Grid search of alpha in {0, 1/n, ..., (n-1)/n}: fake-quantize each linear's W * s, run `forward(x)` with
    W_q / s in place, and keep the s whose output is closest (MSE) to the unquantized output.

    `quantize_w(w, i)` fake-quantizes the weight of linears[i]. Weights are restored before returning. Returns the
    best s, its alpha and the loss of every alpha scored (`strategy`: see `grid_points`).

    Data-parallel (`reduce` over several ranks, each holding its part of x, maybe none): the loss is the float64 sum of
    squared errors over all ranks over their number, so every rank scores and picks the same alpha.
    """
    originals = [lin.weight.data.clone() for lin in linears]
    empty = x.numel() == 0
    ref = None if empty else forward(x).float()
    losses: dict[int, float] = {}

    def mse() -> float:
        if not reduce.parallel:
            return (forward(x).float() - ref).pow(2).mean().item()
        sq, n = (0.0, 0) if empty else ((forward(x).float() - ref).pow(2).sum(dtype=torch.float64).item(), ref.numel())
        sq, n = reduce.sum_float(sq, n)
        return sq / n

    def loss(i: int) -> float:
        if i not in losses:
            s = awq_scale(x_mean, i / n_grid, w_mean)
            for j, (lin, w0) in enumerate(zip(linears, originals)):
                lin.weight.data = (quantize_w(w0.float() * s, j) / s).to(w0.dtype)
            value = mse()
            losses[i] = value if value == value else float("inf")  # NaN never wins
        return losses[i]

    try:
        grid_points(n_grid, strategy, loss)
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.data = w0
    best = min(losses, key=lambda i: (losses[i], i))
    if losses[best] == float("inf"):
        raise FloatingPointError(f"AWQ scale search produced no finite loss (grid points {sorted(losses)[:5]} ...)")
    return awq_scale(x_mean, best / n_grid, w_mean), best / n_grid, {i / n_grid: v for i, v in sorted(losses.items())}


@torch.no_grad()
def group_gram(x: torch.Tensor, group_size: int, chunk: int = CHUNK) -> torch.Tensor:
    """Per input group, the mean outer product of the sample tokens' inputs: H_j = X_j^T X_j / n, [G, g, g] in float32,
    accumulated over chunks of tokens (no full-size float32 copy of x)."""
    h, n = group_gram_sum(x, group_size, chunk)
    return h / n


@torch.no_grad()
def group_gram_sum(x: torch.Tensor, group_size: int, chunk: int = CHUNK) -> tuple[torch.Tensor, int]:
    """`group_gram` before the division: the sum of X_j^T X_j over the tokens and their number (they add up over
    data-parallel ranks)."""
    x = x.reshape(-1, x.shape[-1])
    n, in_f = x.shape
    g = in_f if group_size == -1 else group_size
    n_groups = in_f // g
    h = torch.zeros(n_groups, g, g, dtype=torch.float32, device=x.device)
    for i in range(0, n, chunk):
        xg = x[i : i + chunk].float().reshape(-1, n_groups, g).transpose(0, 1)  # [G, c, g]
        h.baddbmm_(xg.transpose(1, 2), xg)
    return h, n


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor | None,
    w_bit: int,
    group_size: int,
    zero_point: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    oc_batch: int | None = None,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per (output row, group) clipping threshold max|w| * (1 - k/n_grid), k < max_shrink * n_grid, minimising
    the MSE of that group's partial output sum_j x_j w_j on the sample tokens x [n_tok, in]. Returns [out, n_groups].

    The error of a weight change d on group j, mean over tokens of (x_j . d)^2, is d^T H_j d with H_j the group's
    input Gram matrix (`group_gram`, or pass it as `gram`): llm-awq's objective, exactly, at a cost that does not grow
    with the number of tokens, so every calibration token can be used.
    """
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    n_groups = in_f // g
    h = gram if gram is not None else group_gram(x, g)  # [G, g, g]
    if oc_batch is None:  # rows per step: cache-sized on the CPU; on a GPU ~16M weights (a few 64 MB temporaries)
        oc_batch = 256 if w.device.type == "cpu" else max(256, CLIP_GPU_ELEMENTS // in_f)
    best_max = torch.empty(out_f, n_groups, device=w.device)
    for o in range(0, out_f, oc_batch):
        wb = w[o : o + oc_batch].float()  # [ob, in]
        ob = wb.shape[0]
        wgrp = wb.reshape(ob, n_groups, g)
        org_max = wgrp.abs().amax(dim=-1, keepdim=True)  # [ob, G, 1]
        min_err = torch.full((n_groups, ob), float("inf"), device=w.device)
        best = org_max.squeeze(-1).clone()  # [ob, G]
        for k in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - k / n_grid)
            cur = torch.clamp(wgrp, -max_val, max_val)
            delta = (fake_quantize(cur.reshape(ob, in_f), w_bit, g, zero_point).reshape(ob, n_groups, g) - wgrp)
            d = delta.transpose(0, 1)  # [G, ob, g]
            err = (torch.bmm(d, h) * d).sum(-1)  # [G, ob]: d^T H d per row and group
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better.T, max_val.squeeze(-1), best)
        best_max[o : o + ob] = best
    return best_max


@torch.no_grad()
def apply_clip_(lin: nn.Linear, max_val: torch.Tensor) -> None:
    out_f, in_f = lin.weight.shape
    n_groups = max_val.shape[1]
    w = lin.weight.data.float().reshape(out_f, n_groups, -1)
    mv = max_val.unsqueeze(-1)
    lin.weight.data = torch.clamp(w, -mv, mv).reshape(out_f, in_f).to(lin.weight.dtype)
