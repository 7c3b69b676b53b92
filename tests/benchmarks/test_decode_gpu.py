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
