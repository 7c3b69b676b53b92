"""What AWQ keeps of one captured Linear input while a block runs over the calibration sequences: running sums, not
the activations (issue 17: a 7B block's whole inputs are 3 GB in fp16 for 128 x 512 tokens, which put the peak GPU
memory at 7.6 GiB).

Per input, streamed minibatch by minibatch:
- the per-channel sum of |x| and the token count (AWQ's mean |x|), and max |x| for LMDeploy's smoothing path;
- the first `search_rows` sequences (what scores the attention group's grid) or the `search_idx` tokens (token-wise
  groups), the only activations kept whole: a few sequences, whatever the calibration set's size;
- for each group size the clipping search needs, the per-group Gram sum X_j^T X_j over the `clip_idx` tokens (every
  token when None). The clip search runs on the scaled inputs x / s; with S = diag(s) their Gram matrix is
  S_j^-1 (X_j^T X_j) S_j^-1, so the sum taken before the scales are known is rescaled afterwards (`scaled_gram`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quant.awq.search import act_absmax, act_abssum, group_gram_sum


@dataclass
class InputStats:
    abssum: torch.Tensor  # float64 [in]
    n: int  # tokens seen on this rank
    absmax: torch.Tensor | None  # float32 [in], when asked for (not reduced over ranks)
    search: torch.Tensor | None  # [rows, T, in] (whole sequences) or [1, k, in] (chosen tokens), in x's dtype
    grams: dict[int, torch.Tensor] = field(default_factory=dict)  # group size -> sum of X_j^T X_j, float32 [G, g, g]
    gram_n: int = 0  # tokens in those sums


def scaled_gram(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram sums of the inputs divided by s (per input channel) from those of the inputs: h[j] / (s_j s_j^T)."""
    G, g, _ = h.shape
    inv = (1.0 / s.float()).reshape(G, g)
    return h * inv[:, :, None] * inv[:, None, :]


class AbsMax:
    """Running max |x| per input channel (fp32) of one Linear's input (quant.calibration.runner.Observer); reduced
    over ranks by max. LMDeploy's smoothing statistic (AWQ without search, SmoothQuant)."""

    def __init__(self):
        self.m = None

    def add(self, x: torch.Tensor) -> None:
        m = act_absmax(x)
        self.m = m if self.m is None else torch.maximum(self.m, m)

    def result(self, reduce) -> torch.Tensor:
        return reduce.max(self.m)


class AWQInputObserver:
    """One Linear input's running statistics (quant.calibration.runner.Observer). `search_rows`: leading sequences to
    keep; `search_idx` (sorted token indices into this rank's tokens, or None): keep those tokens instead;
    `clip_idx` (token indices, or None for all) and `gram_groups`: the Gram sums to accumulate."""

    def __init__(self, search_rows: int = 0, search_idx: torch.Tensor | None = None,
                 clip_idx: torch.Tensor | None = None, gram_groups: tuple[int, ...] = (), absmax: bool = False):
        self.search_rows, self.search_idx, self.gram_groups = search_rows, search_idx, gram_groups
        self.clip_idx = None if clip_idx is None else clip_idx.sort().values  # a sum: the order does not matter
        self.abssum, self.n = None, 0
        self.absmax = AbsMax() if absmax else None
        self.rows: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.grams: dict[int, torch.Tensor] = {}
        self.gram_n, self.seen_rows = 0, 0
        self.like = None  # an empty slice of the first input: the shape of an empty search set on a rank without one

    @staticmethod
    def _in_range(idx: torch.Tensor, lo: int, hi: int, device) -> torch.Tensor:
        return (idx[(idx >= lo) & (idx < hi)] - lo).to(device)

    def add(self, x: torch.Tensor) -> None:
        b, d = x.shape[0], x.shape[-1]
        flat = x.reshape(-1, d)
        lo, hi = self.n, self.n + flat.shape[0]
        if self.like is None:
            self.like = x[:0]
        total, _ = act_abssum(flat)
        self.abssum = total if self.abssum is None else self.abssum + total
        if self.absmax is not None:
            self.absmax.add(flat)
        if self.search_idx is not None:
            sel = self._in_range(self.search_idx, lo, hi, x.device)
            if sel.numel():
                self.tokens.append(flat[sel])
        elif self.seen_rows < self.search_rows:
            k = self.search_rows - self.seen_rows  # a copy when partial: a view would keep the whole minibatch
            self.rows.append(x if k >= b else x[:k].clone())
        self.seen_rows += b
        if self.gram_groups:
            part = flat if self.clip_idx is None else flat[self._in_range(self.clip_idx, lo, hi, x.device)]
            for g in self.gram_groups:
                h, _ = group_gram_sum(part, g)
                self.grams[g] = h if g not in self.grams else self.grams[g].add_(h)
            self.gram_n += part.shape[0]
        self.n = hi

    def result(self, reduce) -> InputStats:
        """This rank's part (the AWQ step reduces the sums it uses)."""
        if self.search_idx is not None:
            search = torch.cat(self.tokens).unsqueeze(0) if self.tokens else self.like.new_empty((1, 0, self.like.shape[-1]))
        else:
            search = torch.cat(self.rows) if self.rows else self.like
        absmax = None if self.absmax is None else self.absmax.m
        return InputStats(self.abssum, self.n, absmax, search, self.grams, self.gram_n)
