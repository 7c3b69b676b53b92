"""The GPU quantization benchmark's CPU side: the cap arithmetic, every harness variant naming a conf/quant option
that composes, and (slow tier) a dry run of the GPTQ variant on a SmolLM2-shaped synthetic checkpoint on the CPU (8 x 128 tokens),
which must write the JSON the table reads."""
import json
import subprocess
import sys

import pytest

from benchmarks import quantize_gpu as qg


def test_cap_fraction_and_bad_caps():
    assert qg.cap_fraction(10 * 2**30, 80 * 2**30) == pytest.approx(0.125)
    for bad in (0, 81 * 2**30):
        with pytest.raises(ValueError):
            qg.cap_fraction(bad, 80 * 2**30)


def test_every_harness_variant_composes_with_the_benchmarks_group_size():
    from harness.compose import compose
    import quant  # noqa: F401

    for variant, option in qg.HARNESS.items():
        cfg = compose(["model=llama2_7b_synthetic", f"quant={option}", "quant.group_size=128"])
        assert cfg.quant.group_size == 128 and cfg.quant.w_bit == 4, variant
    assert set(qg.DEFAULT_VARIANTS) <= set(qg.VARIANTS)


@pytest.mark.slow
def test_gptq_dry_run_on_the_cpu_writes_the_table(tmp_path):
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "benchmarks.quantize_gpu", "--variants", "harness_gptq", "--device", "cpu",
                        "--model", "smollm2_135m_synthetic", "--group-size", "64", "--out", str(out),
                        "--synthetic-root", str(tmp_path / "syn"), "--timeout", "900", "--n-samples", "8",
                        "--seqlen", "128"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "quantize_gpu_harness_gptq.json").read_text())
    assert res["quant"] == {"method": "gptq", "w_bit": 4, "group_size": 64}
    assert res["n_blocks"] == 30 and res["seconds"]["quantize"] > 0 and res["memory"]["host_peak_rss_bytes"] > 0
    assert res["calibration"] == {"sequences": 8, "seqlen": 128}
    md = (out / "quantize_gpu.md").read_text()
    assert "| harness_gptq |" in md and "8 x 128 random calibration tokens" in md
