"""benchmarks/kv_lmdeploy_check.py, the parts that run without a GPU: it imports without LMDeploy, parses its
arguments, makes its K/V tensors, rounds the fused-FMA variant correctly, and its statistics say what they claim
(the harness against itself is exact everywhere; a perturbed copy shows in the right fields)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from benchmarks import kv_lmdeploy_check as chk
from quant.kv_cache import pack_int4_halves


def test_imports_without_lmdeploy():
    assert "lmdeploy" not in sys.modules


def test_parse_args():
    a = chk.parse_args([])
    assert (a.seqs, a.tokens, a.kv_heads, a.head_dims, a.dtypes, a.policies) == (
        4, 300, 8, [128, 64], ["float16", "bfloat16"], [8, 4])
    assert a.outlier_scale == 20.0 and not a.self_check
    a = chk.parse_args(["--head-dims", "96", "--dtypes", "bfloat16", "--policies", "4", "--out", "x"])
    assert a.head_dims == [96] and a.dtypes == ["bfloat16"] and a.policies == [4] and str(a.out) == "x"
    for bad in (["--dtypes", "float32"], ["--policies", "2"], ["--head-dims", "63"]):
        with pytest.raises(SystemExit):
            chk.parse_args(bad)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        chk.parse_args(["--help"])
    assert e.value.code == 0 and "fill_kv_cache" in capsys.readouterr().out


def test_make_kv():
    k, v = chk.make_kv(4, 30, 8, 64, torch.bfloat16, None, seed=1)
    assert k.shape == v.shape == (4, 30, 8, 64) and k.dtype == torch.bfloat16 and not torch.equal(k, v)
    k2, _ = chk.make_kv(4, 30, 8, 64, torch.bfloat16, None, seed=1)
    assert torch.equal(k, k2)  # deterministic
    ko, _ = chk.make_kv(4, 30, 8, 64, torch.bfloat16, 20.0, outlier_channels=4, seed=1)
    ratio = (ko.float().abs().amax((0, 1, 2)) / k.float().abs().amax((0, 1, 2)))
    assert torch.isclose(ratio, torch.tensor(20.0), rtol=0.01).sum() == 4  # 4 channels x20, the rest unchanged
    assert torch.isclose(ratio, torch.tensor(1.0)).sum() == 60


def test_round_fp16_fused_is_one_correct_rounding():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (20000,), generator=g, dtype=torch.uint8)
    s = (torch.rand(20000, generator=g) * 0.05).half()
    sz = (torch.randn(20000, generator=g) * 3).half()
    got = chk.round_fp16_fused(q, s, sz)
    exact = q.double().numpy() * s.double().numpy() - sz.double().numpy()
    ref = torch.from_numpy(exact.astype(np.float16))  # numpy rounds float64 -> fp16 directly
    assert torch.equal(got, ref)
    # 3 * 683/2048 + 2^-24 = 1 + 2^-11 + 2^-24: just above the fp16 midpoint, but fp32 rounds it onto the midpoint,
    # so torch's two-step cast (float64 -> fp32 -> fp16) would give 1.0
    one = chk.round_fp16_fused(torch.tensor([3], dtype=torch.uint8), torch.tensor([683 / 2048], dtype=torch.float16),
                               torch.tensor([-(2.0**-24)], dtype=torch.float16))
    assert torch.tensor([1 + 2.0**-11 + 2.0**-24], dtype=torch.float64).half().item() == 1.0
    assert one.item() == 1 + 2.0**-10


def _perturbed(h: dict, bits: int) -> dict:
    lmd = {k: t.clone() for k, t in h.items()}
    q = chk._unpack(lmd["codes"], bits)
    q[0, 0, 0, 0] = q[0, 0, 0, 0] + 1 if q[0, 0, 0, 0] < 2**bits - 1 else q[0, 0, 0, 0] - 1
    lmd["codes"] = pack_int4_halves(q) if bits == 4 else q
    lmd["scales"][1, 2, 1] = lmd["scales"][1, 2, 1] * 1.01
    return lmd


@pytest.mark.parametrize("bits", [8, 4])
def test_compare_statistics(bits):
    k, _ = chk.make_kv(2, 20, 3, 64, torch.float16, 20.0)
    h = chk.harness_side(k, bits)
    same = chk.compare(h, h, k, bits)
    assert same["codes"] == {"frac_equal": 1.0, "frac_pm1": 0.0, "frac_more": 0.0, "max_abs_diff": 0}
    assert same["scale"]["frac_bit_identical"] == same["zero"]["frac_bit_identical"] == 1.0
    for p in ("prefill", "prefill_fused", "decode"):
        assert same[p]["frac_bit_identical"] == 1.0 and same[p]["max_diff_lsb_where_codes_agree"] == 0
        assert same[p]["rms_error_ratio_lmdeploy_over_harness"] == 1.0
        assert 0.2 < same[p]["rms_error_lsb_harness"] < 0.45  # about 1/sqrt(12) of a step (+ the fp16 rounding)
    bad = chk.compare(_perturbed(h, bits), h, k, bits)
    n = k.numel()
    assert bad["codes"]["frac_pm1"] == 1 / n and bad["codes"]["frac_equal"] == 1 - 1 / n
    assert bad["scale"]["frac_bit_identical"] == 1 - 1 / (n // 64)
    assert bad["scale"]["max_rel_diff"] == pytest.approx(0.01, rel=0.1)
    assert bad["zero"]["frac_bit_identical"] == 1.0  # the perturbed copy kept the zeros; its dequant is not recomputed


def test_self_check_end_to_end(tmp_path):
    """--self-check runs the whole script on the CPU (the harness against itself). The harness's prefill is the fused
    form the GPU run found (one rounding in fp16; fp32 arithmetic in bf16), so both prefill columns agree fully."""
    assert chk.main(["--self-check", "--out", str(tmp_path), "--seqs", "2", "--tokens", "40", "--kv-heads", "2",
                     "--head-dims", "64"]) == 0
    out = json.loads((tmp_path / "kv_lmdeploy_check.json").read_text())
    rows = out["results"]
    assert out["self_check"] and len(rows) == 2 * 1 * 2 * 2 * 2  # dtypes x head_dims x outliers x policies x K/V
    for r in rows:
        assert r["codes"]["frac_equal"] == 1.0 and r["prefill"]["frac_bit_identical"] == 1.0
        assert ("decode" in r) == (r["tensor"] == "V")
        fused = r["prefill_fused"]["frac_bit_identical"]
        assert fused == 1.0
