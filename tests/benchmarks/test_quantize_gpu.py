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


def test_streamed_variants_and_the_host_memory_column():
    assert set(qg.STREAM) <= set(qg.HARNESS) and set(qg.STREAM.values()) == {"file", "synthetic"}
    row = lambda v, host: {"variant": v, "seconds": {"total": 10.0, "load": 1.0, "quantize": 8.0, "export": 1.0},  # noqa: E731
                           "memory": {"host_peak_rss_bytes": host, "gpu_peak_allocated_bytes": 2**30},
                           "model_fp16_bytes": 8 * 2**30, "environment": {}, "model": ["model=x"],
                           "calibration": {"sequences": 4, "seqlen": 8}}
    md = qg.table([row("harness_awq", 16 * 2**30), row("harness_awq_stream", 2 * 2**30)])
    assert "| harness_awq | 10.0 | 1.0 / 8.0 / 1.0 | 0.00 | 1.0 | 16.0 | 2.00x |" in md
    assert "| harness_awq_stream | 10.0 | 1.0 / 8.0 / 1.0 | 0.00 | 1.0 | 2.0 | 0.25x |" in md


@pytest.mark.slow
def test_a_streamed_run_from_the_seed_alone_writes_the_export_and_its_memory(tmp_path):
    """No checkpoint file at all: RTN streamed from the seed on the CPU (SmolLM2's shape), codes straight to the
    export; the JSON holds the quantization's own host memory window and where the blocks came from."""
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "benchmarks.quantize_gpu", "--variants", "harness_rtn_stream_synthetic",
                        "--device", "cpu", "--model", "smollm2_135m_synthetic", "--group-size", "64", "--out",
                        str(out), "--synthetic-root", str(tmp_path / "syn"), "--timeout", "600"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "syn").exists()  # nothing was written to disk but the export
    res = json.loads((out / "quantize_gpu_harness_rtn_stream_synthetic.json").read_text())
    assert res["placement"]["blocks_read"] == 30 and res["placement"]["codes"] == "export"
    assert "generated block by block" in res["placement"]["stream"]
    assert 0 < res["quantize_host_memory"]["host_peak_growth_bytes"] < res["model_fp16_bytes"]


def test_a_stopped_variant_still_names_machine_model_and_its_host_ratio(tmp_path):
    """A variant stopped by --timeout (every row of the table stopped): its row gives blocks done, the extrapolated
    time and host peak / fp16 weights, and the footer names the machine and model from the stopped JSON itself."""
    from harness.environment import environment

    log = tmp_path / "blocks.jsonl"
    log.write_text("".join(json.dumps({"block": i, "seconds": s, "host_rss_bytes": (3 + i) * 2**30,
                                       "gpu_peak_bytes": 2**31}) + "\n" for i, s in enumerate((5.0, 4.0, 6.0))))
    done = qg.partial(log, 48)
    assert done["blocks_done"] == 3 and done["block_seconds_median"] == 5.0
    assert done["quantize_seconds_extrapolated"] == 240.0 and done["host_peak_rss_bytes"] == 5 * 2**30
    res = qg.stopped("harness_awq_stream_synthetic", "child timeout", 60, done, ["model=qwen3_30b_a3b_moe_synthetic"],
                     20 * 2**30, (128, 512))
    md = qg.table([json.loads(json.dumps(res))])
    assert ("| harness_awq_stream_synthetic | stopped (child timeout) after 3/48 blocks; ~240 s for all at this pace "
            "(extrapolated) | – | 5.00 | 2.0 | 5.0 | 0.25x | – |") in md
    env = environment()
    assert f"{env.get('gpu')}, driver {env.get('driver')}, torch {env.get('torch')}" in md
    assert "model=qwen3_30b_a3b_moe_synthetic (synthetic fp16 weights), w4, 128 x 512" in md and "; ? (" not in md
