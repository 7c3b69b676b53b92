"""The CPU side of the GPU decode benchmark: variant names (eager and `:compiled`) and the table's ratios, each
compiled row against the compiled FP16 of the same run and each eager row against the eager FP16."""
import argparse

import pytest

from benchmarks.decode_gpu import main, parse_variant, table


def test_variant_names_parse_and_a_misspelt_one_is_refused_before_any_work(capsys):
    assert parse_variant("fp16") == ("fp16", False)
    assert parse_variant("w4a16_g128_gemlite:compiled") == ("w4a16_g128_gemlite", True)
    for bad in ("w4a16_g128_gemlit", "fp16:compild", "fp16:"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)
    with pytest.raises(SystemExit):
        main(["--variants", "fp16", "fp16:eager"])
    assert "unknown variant 'fp16:eager'" in capsys.readouterr().err


def _row(variant, compiled, tok_s):
    return {"variant": variant, "kernel": None, "compiled_step": compiled, "weight_read_bytes": 1e9, "prefill": [],
            "batches": [{"batch": 1, "decode_tok_s": tok_s, "roofline_fraction": 0.5}]}


def test_each_row_is_compared_with_the_fp16_decoded_the_same_way():
    res = {"arch": "llama2-7b", "gpu": "X", "prompt_len": 8, "gen_len": 8, "prefill_len": 8, "prefill_batch": 2,
           "variants": [_row("fp16", False, 100.0), _row("fp16:compiled", True, 200.0),
                        _row("w4a16_g128_gemlite", False, 150.0), _row("w4a16_g128_gemlite:compiled", True, 500.0)]}
    lines = {line.split("|")[1].strip(): line for line in table(res).splitlines() if line.startswith("| ")}
    assert "1.50×" in lines["w4a16_g128_gemlite"]
    assert "2.50×" in lines["w4a16_g128_gemlite:compiled"]
    assert "×" not in lines["fp16"] and "×" not in lines["fp16:compiled"]


def test_the_profile_table_sums_each_kind_of_kernel_of_a_real_profiled_decode():
    """A profiled decode of a tiny Llama on the CPU (operators stand in for kernels): the table's kinds add up to the
    profiled kernel time, matrix products land in a matmul kind, and the gap is wall minus kernels."""
    import torch

    from benchmarks.decode_gpu import kernel_kind, profile_lines
    from eval.static_decode import time_decode
    from tests.eval.test_static_decode import prompts, tiny

    m = time_decode(tiny("llama", torch.float32), prompts(2, 5), gen_len=6, warmup=0, repeats=1, profile=4)
    pr = m["profile"]
    row = {"batch": 2, "decode_ms_per_step": m["decode_ms_per_step"], "step_floor_ms": 0.01, "profile": pr}
    res = {"variants": [{"variant": "fp16", "batches": [row]}, {"variant": "w4a16_g128_gemlite", "batches": [
        {**row, "profile": None}]}]}
    lines = [ln for ln in profile_lines(res) if ln.startswith("| fp16 ")]
    assert len(lines) == 1 and not any(ln.startswith("| w4a16") for ln in profile_lines(res))
    cells = lines[0].split(" | ")
    assert float(cells[5]) == pytest.approx(pr["wall_ms_per_step"] - pr["kernel_ms_per_step"], abs=0.006)
    kinds = {part.rsplit(" ", 1)[0]: float(part.rsplit(" ", 1)[1]) for part in cells[6].rstrip(" |").split("; ")}
    assert sum(kinds.values()) == pytest.approx(pr["kernel_ms_per_step"], abs=0.005 * (len(kinds) + 1))
    assert any(kernel_kind(t["name"]).startswith("fp16 matmul") for t in pr["top"])
    assert kernel_kind("gemv_INT_revsplitK_kernel") == "int4 matmul (gemlite / tinygemm)"
    assert kernel_kind("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x128x64") == "fp16 matmul (cuBLAS / CUTLASS)"
    assert kernel_kind("gemm_splitK_INT_kernel") == "int4 matmul (gemlite / tinygemm)"
    assert kernel_kind("flash_fwd_splitkv_kernel") == "attention"
