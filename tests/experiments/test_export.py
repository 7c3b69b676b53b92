"""`python -m experiments.export`: a run's config -> its AWQ GEMM checkpoint, through the quantized-weight cache;
configs the format cannot hold fail in one line before any model loads."""
from __future__ import annotations

import pytest
import torch

import experiments.export as E

FAST_RTN = ["quant=rtn_w4", "quant.group_size=64", "progress=false"]


@pytest.mark.parametrize("overrides, message", [
    (["quant=fp16"], "quant.method=fp16: nothing is quantized"),
    (["quant=rtn_w4", "quant.w_bit=3"], "quant.w_bit=3: the AWQ GEMM format is 4-bit only"),
    (["quant=rtn_w4", "quant.zero_point=false"], "quant.zero_point=False"),
    (["quant=rtn_w4", "quant.group_size=-1"], "quant.group_size=-1"),
    (["quant=rtn_w4", "quant.group_size=128"], "does not divide"),  # SmolLM2's hidden size is 576
    (["quant=rtn_w4", "quant.group_size=128", "quant.group_fallback=per_channel"], "group_fallback=per_channel"),
    (["quant=awq_w4", "quant.calib.dataset=file:/nonexistent/calib.txt"], "no such file"),
    (["quant=nonsense"], "nonsense"),
])
def test_unexportable_configs_fail_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, overrides,
                                                                      message):
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert E.main([*overrides, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error:") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_out_is_required(capsys):
    assert E.main(["quant=rtn_w4"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
@torch.no_grad()
def test_export_of_rtn_w4_g64_round_trips(tmp_path, smollm2_resolved):
    """The checkpoint read back (load_awq_dequantized) holds the quantized model's weights: the cached codes exactly,
    every Linear equal to its dequantization with the fp16 scales the format stores, and close to the bf16 weights the
    run evaluated."""
    import json

    from harness.models import load_model
    from quant import quantized_cache
    from quant.export.awq import load_awq_dequantized, load_awq_qtensors
    from quant.primitives import dequantize

    out = tmp_path / "rtn"
    assert E.main([*FAST_RTN, "--out", str(out)]) == 0
    cfg = E.compose_config(FAST_RTN)
    meta = json.loads((out / "quant_meta.json").read_text())
    from harness.records import run_id

    assert meta["run_id"] == run_id(cfg) and meta["method"] == "rtn" and meta["group_size"] == 64

    # the quantized model as a run sees it: the cache entry the export went through
    model = load_model(smollm2_resolved, cfg.model)
    key = quantized_cache.quant_key(smollm2_resolved.model_sha, cfg.quant, cfg.model.dtype)
    outcome = quantized_cache.load_into(key, model)
    assert outcome is not None  # the export quantized through the cache
    loaded_qt = load_awq_qtensors(out)
    assert loaded_qt.keys() == outcome.qtensors.keys()
    loaded = load_awq_dequantized(out, torch.float32)
    mods, ours = dict(loaded.named_modules()), dict(model.named_modules())
    for name, qt in outcome.qtensors.items():
        lq = loaded_qt[name]
        assert torch.equal(lq.q, qt.q) and torch.equal(lq.zeros, qt.zeros)
        scales16 = qt.scales.half().float()
        assert torch.equal(mods[name].weight, dequantize(qt.q, scales16, qt.zeros, 64))
        torch.testing.assert_close(mods[name].weight, ours[name].weight.float(), rtol=1e-2, atol=1e-3)
    for key_, t in model.state_dict().items():  # norms and embeddings: the model's, at fp16
        if not any(key_ == f"{n}.weight" for n in outcome.qtensors) and key_ != "lm_head.weight":
            torch.testing.assert_close(loaded.state_dict()[key_], t.float(), rtol=1e-2, atol=1e-4)
