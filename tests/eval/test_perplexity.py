"""Paper-protocol perplexity against an independent float64 computation from the full logits."""
import math

import pytest
import torch

from eval.perplexity import ppl_metrics, window_nll
from harness.data import eval_windows


def test_window_ppl_matches_float64_reference(smollm2_fp32_shared, milton_ids):
    windows = eval_windows(milton_ids, 128, 3)
    nll, _ = window_nll(smollm2_fp32_shared, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = smollm2_fp32_shared(windows).logits.double()  # full logits, plain forward
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    ref = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert nll.shape == ref.shape == (3, 127)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-4, atol=1e-4)
    ppl = ppl_metrics(nll, 1.0, 128)["token_ppl"]
    assert math.isclose(ppl, math.exp(ref.mean().item()), rel_tol=1e-5)


def test_windows_are_non_overlapping_and_drop_the_remainder(milton_ids):
    w = eval_windows(milton_ids[:1000], 256, None)
    assert w.shape == (3, 256)  # 1000 // 256 = 3, 232 tokens dropped
    assert torch.equal(w.reshape(-1), milton_ids[:768])
    assert eval_windows(milton_ids, 256, 2).shape == (2, 256)


def test_batching_does_not_change_the_score(smollm2_fp32_shared, milton_ids):
    windows = eval_windows(milton_ids, 64, 4)
    a, _ = window_nll(smollm2_fp32_shared, windows, batch_size=1, progress=False)
    b, _ = window_nll(smollm2_fp32_shared, windows, batch_size=4, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ppl_metrics_keep_window_means_and_a_bootstrap_interval():
    """The record keeps the per-window mean NLLs (float64 means of each row) and the interval computed from them."""
    from harness.confidence import ppl_ci95

    g = torch.Generator().manual_seed(0)
    nll = (torch.rand(12, 63, generator=g) * 6).float()
    m = ppl_metrics(nll, 1.0, 64)
    ref = nll.double().mean(dim=1)
    assert m["window_nll_mean"] == pytest.approx(ref.tolist(), rel=1e-12)
    assert m["token_ppl"] == pytest.approx(math.exp(ref.mean().item()), rel=1e-12)
    assert m["token_ppl_ci95"] == pytest.approx(list(ppl_ci95(ref.tolist())), rel=1e-12)
    lo, hi = m["token_ppl_ci95"]
    assert lo < m["token_ppl"] < hi
    assert "bootstrap" in m["ci95_method"]
