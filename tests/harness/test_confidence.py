"""Intervals of harness/confidence.py against float64 references written out as loops, on synthetic per-window NLLs."""
import math

import numpy as np
import pytest

from harness.confidence import (N_RESAMPLES, SEED, diff_ci95_from_stderr, excludes_zero, paired_mean_diff_ci95,
                                paired_ppl_diff_ci95,
                                ppl_ci95)


def _windows(n: int, seed: int = 1, mean: float = 4.6, sd: float = 0.3) -> list[float]:
    return np.random.default_rng(seed).normal(mean, sd, n).tolist()


def _reference_ci(x: list[float], y: list[float] | None = None) -> tuple[float, float]:
    """Float64, one resample at a time: the same seeded index draws, PPL by math.exp of a Python mean, then the
    2.5 / 97.5 percentiles by linear interpolation between order statistics."""
    n = len(x)
    idx = np.random.default_rng(SEED).integers(0, n, size=(N_RESAMPLES, n))
    stats = []
    for row in idx:
        v = math.exp(sum(x[i] for i in row) / n)
        if y is not None:
            v -= math.exp(sum(y[i] for i in row) / n)
        stats.append(v)
    stats.sort()

    def pct(q):
        pos = q / 100 * (len(stats) - 1)
        lo = math.floor(pos)
        return stats[lo] + (stats[min(lo + 1, len(stats) - 1)] - stats[lo]) * (pos - lo)

    return pct(2.5), pct(97.5)


def test_ppl_interval_matches_float64_reference_and_holds_the_point_estimate():
    x = _windows(40)
    lo, hi = ppl_ci95(x)
    ref = _reference_ci(x)
    assert lo == pytest.approx(ref[0], rel=1e-12) and hi == pytest.approx(ref[1], rel=1e-12)
    point = math.exp(sum(x) / len(x))
    assert lo < point < hi
    # a +-0.3 nat spread over 40 windows: the interval is about +-2 * 0.3 / sqrt(40) nats wide around the point
    assert math.log(hi) - math.log(lo) == pytest.approx(2 * 1.96 * 0.3 / math.sqrt(40), rel=0.25)


def test_interval_shrinks_with_more_windows():
    widths = [ppl_ci95(_windows(n))[1] - ppl_ci95(_windows(n))[0] for n in (10, 40, 160)]
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.35)  # ~ 1/sqrt(n)


def test_too_few_windows_give_no_interval():
    assert ppl_ci95([4.0]) is None
    assert paired_ppl_diff_ci95([4.0, 4.1], [4.0]) is None


def test_paired_difference_of_identical_runs_is_zero_and_of_a_shifted_run_excludes_zero():
    a = _windows(40)
    lo, hi = paired_ppl_diff_ci95(a, a)
    assert lo == hi == 0.0 and not excludes_zero((lo, hi))
    # +0.02 nats on every window: tiny next to the 0.3 spread between windows, yet the paired interval excludes 0 ...
    b = [v + 0.02 for v in a]
    ci = paired_ppl_diff_ci95(b, a)
    assert excludes_zero(ci) and ci[0] > 0
    ref = _reference_ci(b, a)
    assert ci == pytest.approx(ref, rel=1e-9)
    # ... while the two runs' own intervals overlap: only pairing sees it
    assert ppl_ci95(b)[0] < ppl_ci95(a)[1]
    # noise around the same level: the interval straddles 0
    c = [v + e for v, e in zip(a, np.random.default_rng(7).normal(0, 0.02, 40))]
    c = [v - (sum(c) - sum(a)) / 40 for v in c]  # same mean NLL as a
    assert excludes_zero(paired_ppl_diff_ci95(c, a)) is False


def test_difference_from_standard_errors():
    lo, hi = diff_ci95_from_stderr(2.0, 3.0, 4.0)
    assert (lo, hi) == pytest.approx((2.0 - 1.959964 * 5.0, 2.0 + 1.959964 * 5.0), rel=1e-6)
    assert excludes_zero((lo, hi)) is False and excludes_zero(None) is None


def test_paired_accuracy_difference_matches_a_float64_reference_and_beats_the_unpaired_interval():
    rng = np.random.default_rng(3)
    a = (rng.random(500) < 0.7).astype(int)
    b = a.copy()
    flip = rng.choice(500, size=30, replace=False)  # b loses 30 items a gets right, or gains where a missed
    b[flip] = 1 - b[flip]
    lo, hi = paired_mean_diff_ci95(a, b)
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
    assert lo == pytest.approx(m - 1.959963984540054 * se, abs=1e-12) and hi == pytest.approx(m + 1.959963984540054 * se, abs=1e-12)
    se_a, se_b = (float(np.std(x, ddof=1) / math.sqrt(len(x))) for x in (a, b))
    ulo, uhi = diff_ci95_from_stderr(a.mean() - b.mean(), se_a, se_b)
    assert hi - lo < (uhi - ulo) / 2  # the items both get right or wrong cancel
    assert paired_mean_diff_ci95(a, a) == (0.0, 0.0)
    assert paired_mean_diff_ci95(a, a[:-1]) is None and paired_mean_diff_ci95([1], [0]) is None
