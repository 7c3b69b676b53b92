"""RTN and GPTQ rounding to the FP4 weight formats (quant.format=nvfp4 | mxfp4; issue 29): RTN's codes on real SmolLM2
layers against the float64 references of tests/quant/test_fp4.py, GPTQ against RTN (a diagonal Hessian leaves it
RTN's codes, a real one lowers the layer's output error), a pipeline record's label and bytes, and the refusals
before any work."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.config import CalibConfig, ConfigError
from harness.labels import config_label
from harness.storage_bytes import FP16_BYTES, quantized_weight_bytes
from quant import METHODS, QuantContext
from quant.formats.fp4 import FP4_FORMATS, FP4Tensor, quantize_fp4
from quant.gptq.algorithm import accumulate_hessian, gptq_quantize
from quant.gptq.config import GPTQConfig
from quant.rtn import RTNConfig
from tests.experiments.test_pipeline import SMALL, cfg_of
from tests.quant.test_awq import _calib, _truncated
from tests.quant.test_fp4 import mxfp4_ref, nvfp4_ref

FORMATS = ("nvfp4", "mxfp4")


def _fp4_rtn(fmt: str) -> RTNConfig:
    return RTNConfig(format=fmt, group_size=FP4_FORMATS[fmt], zero_point=False)


def _check_against_reference(w: torch.Tensor, qt: FP4Tensor) -> None:
    """Codes and scales bit for bit, the dequantized weight to float32's rounding, against the float64 reference."""
    if qt.format == "nvfp4":
        g, s, codes, deq = nvfp4_ref(w)
        assert qt.global_scale.item() == g.item()
        assert torch.equal(qt.scales.double(), s)
    else:
        e, codes, deq = mxfp4_ref(w)
        assert torch.equal(qt.scales.double() - 127, e)
    assert torch.equal(qt.q, codes)
    torch.testing.assert_close(qt.dequantize().double(), deq, rtol=2**-23, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("fmt", FORMATS)
def test_rtn_fp4_on_smollm2_layers_is_the_float64_reference_per_layer(smollm2_bf16, fmt):
    """Two real blocks (bf16, as runs load them): every Linear's stored codes and scales equal the reference applied
    to that layer alone (NVFP4: its own global scale), and the model holds the dequantized codes."""
    base = _truncated(smollm2_bf16, 2)
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    out = METHODS.get("rtn")(base, _fp4_rtn(fmt), QuantContext(calibration=None, progress=False))
    assert len(out.qtensors) == 14 and out.summary["format"] == fmt
    assert out.summary["group_size"] == FP4_FORMATS[fmt] and out.summary["zero_point"] is False
    for name, qt in out.qtensors.items():
        assert isinstance(qt, FP4Tensor) and qt.format == fmt
        _check_against_reference(weights[name], qt)
        torch.testing.assert_close(base.get_submodule(name).weight, qt.dequantize(torch.bfloat16), rtol=0, atol=0)
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_fp4_with_a_diagonal_hessian_gives_rtns_codes_per_stacked_layer(smollm2_fp32_shared, fmt, act_order):
    """With H = I no error reaches another column, so GPTQ's codes are RTN's: q, k and v of a real block stacked as
    GPTQ stacks them, each keeping its own scales (and NVFP4 global scale) bit for bit."""
    attn = smollm2_fp32_shared.model.layers[3].self_attn
    lins = [attn.q_proj, attn.k_proj, attn.v_proj]
    W = torch.cat([lin.weight for lin in lins])
    H = torch.eye(W.shape[1])
    res = gptq_quantize(W, H, 4, FP4_FORMATS[fmt], zero_point=False, block_size=128, act_order=act_order, fmt=fmt,
                        segments=[lin.out_features for lin in lins])
    r0 = 0
    for lin in lins:
        qt = res.to_qtensor(slice(r0, r0 + lin.out_features))
        r0 += lin.out_features
        ref = quantize_fp4(lin.weight, fmt)
        assert torch.equal(qt.q, ref.q) and torch.equal(qt.scales, ref.scales)
        if fmt == "nvfp4":
            assert torch.equal(qt.global_scale, ref.global_scale)
        _check_against_reference(lin.weight, qt)
    with pytest.raises(ValueError, match="more than one NVFP4 tensor") if fmt == "nvfp4" else _nothing():
        res.to_qtensor(slice(0, lins[0].out_features + 1))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_fp4_lowers_the_layer_output_error_against_rtn_fp4(smollm2_fp32_shared, calib_ids, fmt):
    """Calibration activations at the input of real Linears (block 2's q/k/v input and down_proj's): GPTQ's
    ||XW^T - XQ^T|| in the format is below RTN's in the same format on the same layer."""
    model = smollm2_fp32_shared
    block = model.model.layers[2]
    seen = {}
    hooks = [lin.register_forward_hook(lambda m, i, o, key=key: seen.setdefault(key, []).append(i[0].detach()))
             for key, lin in (("q_proj", block.self_attn.q_proj), ("down_proj", block.mlp.down_proj))]
    try:
        model(_calib(calib_ids, 8, 256))
    finally:
        for h in hooks:
            h.remove()
    for key, lin in (("q_proj", block.self_attn.q_proj), ("down_proj", block.mlp.down_proj)):
        X = torch.cat(seen[key]).reshape(-1, lin.in_features)
        H, _ = accumulate_hessian(None, 0, X)
        W = lin.weight.detach()
        res = gptq_quantize(W, H, 4, FP4_FORMATS[fmt], zero_point=False, fmt=fmt)
        ref = X.double() @ W.double().t()
        err_gptq = (X.double() @ res.dequantize().double().t() - ref).norm()
        err_rtn = (X.double() @ quantize_fp4(W, fmt).dequantize().double().t() - ref).norm()
        assert err_gptq < 0.9 * err_rtn, (key, err_gptq.item(), err_rtn.item())
        qt = res.to_qtensor()  # what the method stores holds the same weights
        torch.testing.assert_close(qt.dequantize(), res.dequantize(), rtol=0, atol=0)


@torch.no_grad()
def test_gptq_method_in_nvfp4_stores_fp4_codes_and_beats_rtn_nvfp4(smollm2_fp32, calib_ids, milton_ids, tmp_path):
    """The method on two real blocks: FP4Tensors whose dequantized weights the model holds, an NVFP4 global scale per
    Linear (q/k/v stacked in the column loop), hidden-state error on held-out Milton below RTN NVFP4's; no block
    checkpoints (they would resume FP4 codes as integer ones)."""
    base = _truncated(smollm2_fp32, 2)
    held = milton_ids[: 4 * 128].view(4, 128)
    ref = base.model(held).last_hidden_state.double()
    errs = {}
    for name, cfg in (("rtn", _fp4_rtn("nvfp4")),
                      ("gptq", GPTQConfig(format="nvfp4", group_size=16, zero_point=False,
                                          calib=CalibConfig(n_samples=16, seqlen=128)))):
        m = copy.deepcopy(base)
        out = METHODS.get(name)(m, cfg, QuantContext(calibration=lambda: _calib(calib_ids, 16, 128), progress=False,
                                                     checkpoint_dir=tmp_path / name))
        assert not (tmp_path / name).exists()
        errs[name] = (m.model(held).last_hidden_state.double() - ref).pow(2).mean().item()
        assert len(out.qtensors) == 14 and out.summary["format"] == "nvfp4"
        for n, qt in out.qtensors.items():
            assert isinstance(qt, FP4Tensor) and qt.format == "nvfp4"
            assert torch.equal(qt.global_scale, quantize_fp4(base.get_submodule(n).weight, "nvfp4").global_scale)
            torch.testing.assert_close(m.get_submodule(n).weight, qt.dequantize(), rtol=0, atol=0)
    assert errs["gptq"] < 0.9 * errs["rtn"], errs


def test_run_ids_of_integer_configs_are_unchanged_by_the_format_field():
    """quant.format is a late field: at int it is left out of the identity (values computed before it existed)."""
    from harness.records import run_id

    before = {"rtn_w4": "0d136b5f774e1a23", "awq_w4": "5beb019fad5f7339", "gptq_w4": "95049bc680e3cc1c",
              "awq_gptq_w4": "5f35d9c51af264df", "fp16": "4a4b09040ba24505"}
    for option, rid in before.items():
        assert run_id(cfg_of([f"quant={option}"])) == rid, option
    assert run_id(cfg_of(["quant=rtn_w4", "quant.format=int"])) == before["rtn_w4"]
    assert run_id(cfg_of(["quant=rtn_nvfp4"])) != run_id(cfg_of(["quant=rtn_mxfp4"]))


@pytest.mark.parametrize("option, label", [("rtn_nvfp4", "RTN NVFP4"), ("rtn_mxfp4", "RTN MXFP4"),
                                           ("gptq_nvfp4", "GPTQ NVFP4"), ("gptq_mxfp4", "GPTQ MXFP4")])
def test_presets_compose_validate_and_are_labelled(option, label):
    q = cfg_of([f"quant={option}"]).quant
    fmt = option.split("_")[1]
    assert (q.format, q.w_bit, q.group_size, q.zero_point) == (fmt, 4, FP4_FORMATS[fmt], False)
    assert config_label(q) == label


@pytest.mark.parametrize("overrides, message", [
    (["quant=rtn_nvfp4", "quant.group_size=64"], r"^quant\.group_size: 64 — quant\.format=nvfp4 takes blocks of 16 .* "
                                                 r"set quant\.group_size=16"),
    (["quant=rtn_w4", "quant.format=mxfp4"], r"^quant\.group_size: 64 — quant\.format=mxfp4 takes blocks of 32"),
    (["quant=gptq_mxfp4", "quant.w_bit=3"], r"^quant\.w_bit: 3 — .* set quant\.w_bit=4$"),
    (["quant=rtn_nvfp4", "quant.zero_point=true"], r"^quant\.zero_point: True — .* set quant\.zero_point=false$"),
    (["quant=rtn_w4", "quant.format=fp8"], r"^quant\.format: 'fp8' — not one of int, nvfp4, mxfp4"),
    (["quant=awq_w4", "quant.format=nvfp4"], r"^quant\.format: nvfp4 — awq rounds to int only — .*quant=gptq_nvfp4"),
    (["quant=awq_gptq_w4", "quant.format=nvfp4", "quant.group_size=16", "quant.zero_point=false"],
     r"^quant\.format: nvfp4 — awq_gptq rounds to int only"),
    (["quant=recipe_awq_gptq_w4", "quant.format=mxfp4", "quant.group_size=32", "quant.zero_point=false"],
     r"^quant\.format: mxfp4 — recipe rounds to int only"),  # its steps take no format from it yet
    (["quant=gptq_nvfp4", "quant.grid=mse"], r"^quant\.grid: mse — quant\.format=nvfp4 takes the format's own"),
    (["quant=gptq_nvfp4", "quant.static_groups=false", "quant.act_order=false"],
     r"^quant\.static_groups: False — quant\.format=nvfp4 computes every block's scale"),
    (["quant=rtn_nvfp4", "quant.group_fallback=per_channel"], r"^quant\.group_fallback: per_channel — "),
    (["quant=rtn_nvfp4", "quant.layer_overrides=[{pattern: '*.down_proj', w_bit: 8}]"],
     r"^quant\.layer_overrides\[0\]: \*\.down_proj — w_bit / group_size do not apply"),
])
def test_fp4_configs_are_refused_at_load_with_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_of(overrides)


def test_fp4_is_exported_only_as_compressed_tensors():
    """FP4 codes have one checkpoint format, compressed-tensors (quant/export/compressed_tensors.py): the AWQ export
    and the LMDeploy backend's format choice refuse them before any model loads."""
    from quant.export import format_for, formats_of
    from quant.export.awq import AWQExportError, check_awq_config

    for option in ("rtn_nvfp4", "rtn_mxfp4", "gptq_nvfp4", "gptq_mxfp4"):
        q = cfg_of([f"quant={option}"]).quant
        assert formats_of(q) == ("compressed-tensors",)
        assert format_for(q).name == "compressed-tensors"
        with pytest.raises(ConfigError, match=rf"^quant\.method: {q.method} — its formats are compressed-tensors; "
                                              rf"this needs one of awq, smooth_quant"):
            format_for(q, ("awq", "smooth_quant"))
        with pytest.raises(AWQExportError, match=rf"^quant\.format: {q.format} — "):
            check_awq_config(q)
    assert formats_of(cfg_of(["quant=rtn_w4"]).quant) == ("awq", "compressed-tensors")


def test_a_layer_the_block_does_not_divide_is_named_before_any_work():
    from quant.surgery import layer_spec

    with pytest.raises(ConfigError, match=r"^quant\.format=mxfp4 takes blocks of 32 .* 48 of x\.proj"):
        layer_spec("x.proj", 48, _fp4_rtn("mxfp4"))


@pytest.mark.slow
def test_pipeline_run_in_nvfp4_writes_a_record_with_its_label_and_bytes(tmp_path):
    from experiments import pipeline
    from harness.records import run_id

    cfg = cfg_of(SMALL + ["quant=rtn_nvfp4", "data.splits=[milton]", f"results_dir={tmp_path}"])
    rec = pipeline.run(cfg)
    assert rec["status"] == "complete" and rec["run_id"] == run_id(cfg)
    assert rec["config"]["quant"]["format"] == "nvfp4"
    assert config_label(rec["config"]["quant"]) == "RTN NVFP4"
    s = rec["metrics"]["quant"]
    assert s["format"] == "nvfp4" and s["layers_quantized"] == 30 * 7
    # bytes by hand: per Linear 4 bits a weight, one fp8 scale per 16, one fp32 global scale; the rest at fp16
    from harness.models import load_model, resolve_model

    model = load_model(resolve_model(cfg.model), cfg.model)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    q_bytes = sum(lin.weight.numel() // 2 + lin.weight.numel() // 16 + 4 for lin in linears)
    assert q_bytes == sum(quantized_weight_bytes(lin.weight.numel(), lin.weight.numel() // 16, 4, False, "nvfp4")
                          for lin in linears)
    fp16 = sum(p.numel() for p in model.parameters()) * FP16_BYTES
    assert s["quantized_linear_bytes"] == q_bytes and s["weight_bytes_fp16"] == fp16
    assert s["weight_bytes"] == q_bytes + fp16 - sum(lin.weight.numel() for lin in linears) * FP16_BYTES
    ppl = rec["metrics"]["perplexity"]["milton"]["token_ppl"]
    assert 1 < ppl < 10_000
