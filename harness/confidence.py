"""95% intervals over evaluation units: token PPL by a percentile bootstrap over windows, the paired difference of
two runs' PPL on the same windows, the normal interval of a mean from its standard error (task accuracy), and the
paired difference of two runs' accuracy on the same items.

Windows are the resampling unit (not tokens): tokens inside a window are correlated, windows of the paper protocol
are disjoint stretches of text. Every window scores the same number of tokens, so the mean of the per-window mean
NLLs is the token mean NLL and exp of it is the token PPL. The resamples are seeded: a record's interval is
reproducible from its `window_nll_mean`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

N_RESAMPLES = 1000
SEED = 0
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n] window indices drawn with replacement (the same for every run with n windows and a seed,
    which is what pairs two runs' resamples)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _percentile95(x: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(x, [2.5, 97.5])
    return float(lo), float(hi)


def ppl_ci95(window_nll_mean: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Optional[tuple[float, float]]:
    """Percentile-bootstrap 95% interval of token PPL = exp(mean window NLL); None for fewer than two windows."""
    x = np.asarray(window_nll_mean, dtype=np.float64)
    if x.size < 2:
        return None
    return _percentile95(np.exp(x[_indices(x.size, n_resamples, seed)].mean(axis=1)))


def paired_ppl_diff_ci95(nll_a: Sequence[float], nll_b: Sequence[float], n_resamples: int = N_RESAMPLES,
                         seed: int = SEED) -> Optional[tuple[float, float]]:
    """95% interval of PPL(a) - PPL(b) over the same windows: each resample draws one set of windows and scores both
    runs on it, so what the two runs share (hard and easy windows) cancels. None unless both have the same number
    (>= 2) of windows."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        return None
    idx = _indices(a.size, n_resamples, seed)
    return _percentile95(np.exp(a[idx].mean(axis=1)) - np.exp(b[idx].mean(axis=1)))


def diff_ci95_from_stderr(diff: float, se_a: float, se_b: float) -> tuple[float, float]:
    """Normal 95% interval of a difference of two independent means with standard errors se_a, se_b (unpaired, so
    conservative when the two share their items)."""
    half = Z95 * math.sqrt(se_a ** 2 + se_b ** 2)
    return diff - half, diff + half


def paired_mean_diff_ci95(a: Sequence[float], b: Sequence[float]) -> Optional[tuple[float, float]]:
    """Normal 95% interval of mean(a) - mean(b) over the same items (per-item scores, e.g. 0/1 correctness): the
    standard error is that of the per-item differences, so items both runs get right or both get wrong cancel (for
    0/1 scores this is the interval behind McNemar's test). None unless both have the same number (>= 2) of items."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        return None
    d = x - y
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(d.size)
    return float(d.mean()) - half, float(d.mean()) + half


def excludes_zero(ci: Optional[tuple[float, float]]) -> Optional[bool]:
    """True when the interval lies on one side of 0 (significant at 95%), None without an interval."""
    if ci is None:
        return None
    return ci[0] > 0 or ci[1] < 0


@dataclass(frozen=True)
class PairedDiff:
    """PPL(a) - PPL(b) over the same windows: the estimate, its paired bootstrap 95% interval, the windows."""

    estimate: float
    ci95: tuple[float, float]
    n_windows: int

    @property
    def beyond_noise(self) -> bool:
        """The interval lies on one side of 0: the two runs differ at 95%."""
        return bool(excludes_zero(self.ci95))


def paired_ppl_diff(nll_a: Sequence[float], nll_b: Sequence[float], n_resamples: int = N_RESAMPLES,
                    seed: int = SEED) -> Optional[PairedDiff]:
    """Any two runs scored on the same windows (two methods, or a method and FP16): PPL(a) - PPL(b) with
    exp(mean window NLL) as each PPL, and the paired interval of paired_ppl_diff_ci95 (the same resamples). None
    unless both have the same number (>= 2) of windows."""
    ci = paired_ppl_diff_ci95(nll_a, nll_b, n_resamples, seed)
    if ci is None:
        return None
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    return PairedDiff(float(np.exp(a.mean()) - np.exp(b.mean())), ci, int(a.size))
