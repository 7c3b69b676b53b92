"""Recipes (quant/recipe.py): a list of steps that share bits, grouping and one calibration draw. Written as a recipe,
AWQ's scales then GPTQ's rounding give the codes and weights of the one-method awq_gptq, and AWQ's scales then RTN's
rounding those of AWQ itself, bit for bit; a step that cannot be built fails at compose time naming it."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from harness.config import CalibConfig, ConfigError
from quant import METHODS, QuantContext
from quant.awq.config import AWQConfig
from quant.gptq.awq_gptq import AWQGPTQConfig
from quant.recipe import RecipeConfig
from tests.quant.test_awq import _calib, _truncated

AWQ_KNOBS = dict(search_samples=2, n_grid=4, clip_n_grid=4, clip_tokens=256)
CALIB = CalibConfig(n_samples=8, seqlen=64)


def _same(a, b):
    assert a.qtensors.keys() == b.qtensors.keys() and len(a.qtensors) == 14
    for n in a.qtensors:
        assert torch.equal(a.qtensors[n].q, b.qtensors[n].q), n
        assert torch.equal(a.qtensors[n].scales, b.qtensors[n].scales), n


@pytest.mark.parametrize("last", ["gptq", "rtn"])
def test_a_recipe_gives_the_codes_of_the_method_it_spells_out(smollm2_fp32, calib_ids, last):
    base = _truncated(smollm2_fp32, 2)
    samples = _calib(calib_ids, 8, 64)
    ctx = QuantContext(lambda: samples, progress=False)
    one = copy.deepcopy(base)
    if last == "gptq":
        ref = METHODS.get("awq_gptq")(one, AWQGPTQConfig(w_bit=4, group_size=64, calib=CALIB, **AWQ_KNOBS), ctx)
    else:
        ref = METHODS.get("awq")(one, AWQConfig(w_bit=4, group_size=64, calib=CALIB, **AWQ_KNOBS), ctx)
    two = copy.deepcopy(base)
    cfg = RecipeConfig(w_bit=4, group_size=64, calib=CALIB, steps=[{"method": "awq", **AWQ_KNOBS}, {"method": last}])
    out = METHODS.get("recipe")(two, cfg, ctx)
    _same(out, ref)
    for (n, p), (_, q) in zip(two.named_parameters(), one.named_parameters()):
        assert torch.equal(p, q), n  # folded norms and rounded weights alike
    assert [s["method"] for s in out.summary["steps"]] == ["awq", last]
    assert out.summary["steps"][0]["layers_quantized"] == 0  # the AWQ step left the rounding to the last step


def test_steps_that_cannot_be_built_are_refused_by_name():
    ok = RecipeConfig(steps=[{"method": "awq", "clip": False}, {"method": "gptq", "grid": "mse"}])
    ok.validate()
    awq, gptq = ok.step_configs()
    assert not awq.round_weights and not awq.clip and gptq.grid == "mse"
    assert awq.w_bit == gptq.w_bit == 4 and awq.group_size == gptq.group_size == 64
    bad = {
        "quant.steps[0].method": [{"method": "gptq"}, {"method": "rtn"}],  # GPTQ rounds: it can only come last
        "quant.steps[1].method": [{"method": "awq"}, {"method": "smoothquant"}],
        "not fields of rtn's config": [{"method": "rtn", "grid": "mse"}],
        "set on the recipe": [{"method": "gptq", "w_bit": 3}],
        "never rounds": [{"method": "awq", "round_weights": True}, {"method": "rtn"}],
        "quant.grid": [{"method": "gptq", "grid": "x"}],  # the step's own validation, named
    }
    for match, steps in bad.items():
        with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("]", r"\]")):
            RecipeConfig(steps=steps).validate()
    with pytest.raises(ConfigError, match="quant.steps"):
        RecipeConfig(steps=[]).validate()


def test_a_recipe_composes_from_the_command_line_and_is_labelled_by_its_steps():
    from harness.compose import compose
    from harness.labels import config_label
    from harness.records import run_id

    cfg = compose(["quant=recipe_awq_gptq_w4", "+quant.steps.1.grid=mse"])
    assert [type(c).__name__ for c in cfg.quant.step_configs()] == ["AWQConfig", "GPTQConfig"]
    assert config_label(dataclasses.asdict(cfg.quant)) == "AWQ→GPTQ w4 g64 (search+clip) → (mse grid)"
    plain = compose(["quant=recipe_awq_gptq_w4"])
    assert run_id(cfg) != run_id(plain)  # a step's knob is part of the run's identity
    with pytest.raises(Exception, match="steps"):
        compose(["quant=recipe", "quant.steps=[{method: gptq}, {method: rtn}]"])
