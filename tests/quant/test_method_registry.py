"""A method is one class in one file (quant.registry.Method): its registration alone gives it a config schema, a
report row, a place in recipes, export formats and a code version derived from its imports; the shared setup fails a
bad input before any work; a declaration that cannot work fails at import, and a method without a checkpoint format
fails where a run needs one before it quantizes."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from harness.compose import compose
from harness.config import QUANT_CONFIGS, CalibConfig, ConfigError, WeightQuantConfig, to_run_config
from harness.labels import ROWS, config_label, method_rank
from quant import METHODS, QuantContext
from quant.recipe import RecipeConfig
from quant.registry import Method, method, method_sources
from quant.rtn import RTNConfig
from tests.quant.test_awq import _calib, _truncated
from tests.quant.toy_method import Toy, ToyConfig


@pytest.fixture
def registries(monkeypatch):
    """Methods registered in a test are gone afterwards."""
    for reg in (METHODS, QUANT_CONFIGS, ROWS):
        monkeypatch.setattr(reg, "_items", dict(reg._items))


def test_one_class_registers_everything_a_method_needs(registries, smollm2_fp32):
    method(Toy)
    # the config schema: a record's config reads back through it, unknown keys named
    rec = {"quant": {"method": "toy", "w_bit": 3}, "data": {"name": "x", "splits": ["milton"]},
           "model": {"name": "m", "path": "embedded:smollm2-135m-instruct"}, "eval": {"name": "e"}}
    assert to_run_config(OmegaConf.create(rec)).quant == ToyConfig(w_bit=3)
    # the report's row: its label, ranked after RTN and before the methods without an order
    assert config_label(ToyConfig(w_bit=3)) == "Toy w3 g64"
    assert method_rank("rtn") < method_rank("toy") < method_rank("gptq")
    # a recipe takes it as its rounding step, never before it
    RecipeConfig(steps=[{"method": "awq"}, {"method": "toy"}]).validate()
    with pytest.raises(ConfigError, match=r"quant\.steps\[0\]\.method"):
        RecipeConfig(steps=[{"method": "toy"}, {"method": "rtn"}]).validate()
    # its code version: its file and what that imports, not another method's code
    sources = method_sources("toy")
    assert {"tests/quant/toy_method.py", "quant/surgery.py", "quant/setup.py"} <= set(sources)
    assert "quant/awq/search.py" not in sources
    # it runs through the shared setup: the same codes as RTN, and the summary every method's record carries
    base = _truncated(smollm2_fp32, 1)
    ctx = QuantContext(calibration=lambda: None, progress=False)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    out, ref = METHODS.get("toy")(a, ToyConfig(w_bit=3), ctx), METHODS.get("rtn")(b, RTNConfig(w_bit=3), ctx)
    assert out.qtensors.keys() == ref.qtensors.keys() and len(out.qtensors) == 7
    assert all(torch.equal(out.qtensors[n].q, ref.qtensors[n].q) for n in out.qtensors)
    measured = {"method", "host_memory"}  # host_memory: measured, not computed (quant.onload.HostPeak)
    assert {k: v for k, v in out.summary.items() if k not in measured} == {k: v for k, v in ref.summary.items()
                                                                          if k not in measured}
    assert out.summary["host_memory"]["host_peak_rss_bytes"] > 0


def test_a_method_without_a_checkpoint_format_fails_before_it_quantizes(registries):
    from backends.lmdeploy import LMDeployBackend
    from quant.export.awq import AWQExportError, check_awq_config

    method(Toy)  # declares no format
    cfg = dataclasses.replace(compose(["backend=lmdeploy", "eval=ppl"]), quant=ToyConfig())
    with pytest.raises(ConfigError, match=r"^quant\.method: toy — it has no checkpoint format; this needs one of awq"):
        LMDeployBackend().preflight(cfg, cuda_available=True, find_spec=lambda name: object())
    with pytest.raises(AWQExportError, match=r"quant\.method: toy .* it has none"):
        check_awq_config(ToyConfig())


CAL = CalibConfig(n_samples=2, seqlen=32)
# each ported method: a config, and a value of it that its validate() refuses
BAD_INPUT = {"rtn": (RTNConfig(), {"w_bit": 1}, "quant.w_bit"),
             "awq": (QUANT_CONFIGS.get("awq")(calib=CAL), {"n_grid": 0}, "quant.n_grid"),
             "gptq": (QUANT_CONFIGS.get("gptq")(calib=CAL), {"damp_percent": 0.0}, "quant.damp_percent"),
             "awq_gptq": (QUANT_CONFIGS.get("awq_gptq")(calib=CAL), {"round_weights": False}, "quant.round_weights"),
             "smoothquant": (QUANT_CONFIGS.get("smoothquant")(calib=CAL), {"alpha": 2.0}, "quant.alpha"),
             "recipe": (RecipeConfig(calib=CAL, steps=[{"method": "awq"}, {"method": "gptq"}]),
                        {"steps": [{"method": "gptq"}, {"method": "rtn"}]}, r"quant.steps\[0\]\.method")}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_the_shared_setup_refuses_bad_input_before_any_block(name, smollm2_fp32, calib_ids):
    """An invalid config, or a calibration token outside the vocabulary, fails before any weight changes."""
    m = _truncated(smollm2_fp32, 1)
    before = copy.deepcopy(m.state_dict())
    cfg, bad, field = BAD_INPUT[name]
    with pytest.raises(ConfigError, match=field):
        METHODS.get(name)(m, dataclasses.replace(cfg, **bad), QuantContext(calibration=lambda: None))
    if METHODS.get(name).needs_calibration:
        samples = _calib(calib_ids, 2, 32).clone()
        samples[0, 0] = m.get_input_embeddings().weight.shape[0]
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            METHODS.get(name)(m, cfg, QuantContext(calibration=lambda: samples, progress=False))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing was touched


def test_a_declaration_that_cannot_work_fails_at_registration(registries):
    @dataclass
    class NoCalib(WeightQuantConfig):
        method: str = "nocalib"

    with pytest.raises(TypeError, match="needs a `calib: CalibConfig` field"):
        method(type("NoCalibMethod", (Method,), {"name": "nocalib", "config": NoCalib, "needs_calibration": True}))
    with pytest.raises(TypeError, match=r"prepares sets \['round'\]"):
        method(type("Prep", (Method,), {"name": "nocalib", "config": NoCalib, "prepares": {"round": False}}))
    with pytest.raises(TypeError, match="must default to 'other'"):
        method(type("Other", (Method,), {"name": "other", "config": NoCalib}))
    assert "nocalib" not in METHODS and "other" not in METHODS


def test_every_method_declares_formats_that_exist():
    from quant.export import FORMATS

    for name in METHODS:
        assert set(METHODS.get(name).formats) <= set(FORMATS.names()), name
