"""The GPTQ quality benchmark's variants build valid configs from conf/quant/ (the AWQ->GPTQ variant takes the
harness's AWQ search settings from conf/quant/awq_w4.yaml, whose Hydra `defaults` list is not a config field)."""
from harness.config import CalibConfig


def test_every_variant_builds_a_valid_config():
    from benchmarks.quality_gptq import AWQ_SEARCH, VARIANTS

    assert "defaults" not in AWQ_SEARCH and AWQ_SEARCH["scale_grid"] == "coarse_fine"
    for name, make in VARIANTS.items():
        cfg = make(CalibConfig(n_samples=8, seqlen=64))
        cfg.validate()
        assert (cfg.w_bit, cfg.group_size) == (4, 64), name
