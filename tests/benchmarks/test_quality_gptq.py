"""The GPTQ quality benchmark's variants build valid configs from conf/quant/ (the AWQ->GPTQ variant takes the
harness's AWQ search settings from conf/quant/awq_w4.yaml, whose Hydra `defaults` list is not a config field), and
each of its rows is a pipeline record (issue 28: one front door)."""
import pytest

from harness.config import CalibConfig


def test_every_variant_builds_a_valid_config():
    from benchmarks.quality_gptq import AWQ_SEARCH, VARIANTS

    assert "defaults" not in AWQ_SEARCH and AWQ_SEARCH["scale_grid"] == "coarse_fine"
    for name, make in VARIANTS.items():
        cfg = make(CalibConfig(n_samples=8, seqlen=64))
        cfg.validate()
        assert (cfg.w_bit, cfg.group_size) == (4, 64), name


def test_a_row_is_a_pipeline_record_scored_as_the_benchmark_scored_it(tmp_path, smollm2_bf16_shared, tokenizer):
    """FP16 and RTN w4 g64 on 2 windows of 64 tokens of Milton: each row is a pipeline record under results_dir/runs/
    that the report reads (through the record schema, its run_id recomputed from its config), and its PPL is the one
    the benchmark computed itself before it went through the pipeline: the method applied to the bf16 model, then
    window_nll over the same windows."""
    import copy

    from benchmarks.common import quality_config, quality_row
    from eval.perplexity import ppl_metrics, window_nll
    from harness.data import eval_windows, load_text, tokenize_cached
    from quant import METHODS, QuantContext
    from quant.rtn import RTNConfig
    from report.build import load_checked

    windows = eval_windows(tokenize_cached(tokenizer, load_text("milton")), 64, 2)
    for q in (None, RTNConfig(w_bit=4, group_size=64)):
        row = quality_row(quality_config("milton", 2, quant=q, seqlen=64, results_dir=str(tmp_path)))
        model = copy.deepcopy(smollm2_bf16_shared)
        if q is not None:
            METHODS.get("rtn")(model, q, QuantContext(calibration=lambda: None, progress=False))
            assert row["config"]["group_size"] == 64 and row["quantize_s"] > 0 and "rtn" in row["stages_s"]
        nll, secs = window_nll(model, windows, 8, progress=False)
        assert row["token_ppl"] == pytest.approx(ppl_metrics(nll, secs, 64)["token_ppl"], rel=1e-6)
        assert "reused" not in row
    loaded = load_checked(tmp_path)
    assert not loaded.bad and len(loaded.records) == 2
