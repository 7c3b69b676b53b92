"""The SmoothQuant export (quant/export/smoothquant.py) in the layout LMDeploy's PyTorch engine loads.

What was checked in LMDeploy's source (InternLM/lmdeploy@1263d5cd), and what each assertion below stands for:
- pytorch/config.py `QuantizationConfig.from_config`: reads quantization_config["quant_method"] == "smooth_quant" and
  quant_dtype, resolved with getattr(torch, quant_dtype) -> must name the codes' torch dtype;
- pytorch/nn/linear/w8a8.py `W8A8Linear.create_weights`: weight [out, in] in quant_dtype, scale float32 [out, 1],
  bias [out] in the model dtype; `default_weight_loader` copies into those parameters, so an fp16 "weight" would be
  truncated into int8 silently -> dtypes and shapes asserted exactly;
- pytorch/models/llama.py `load_weights`: `.q_proj/.k_proj/.v_proj` -> `.qkv_proj`, `.gate_proj/.up_proj` ->
  `.gate_up_proj` by substring, every other name looked up as is in named_parameters, `lm_head.weight` skipped when
  tie_word_embeddings -> the names are the HF module names + ".weight"/".scale", nothing else per Linear, and the tied
  lm_head is not written;
- lite/apis/smooth_quant.py: the norms stay plain tensors (QRMSNorm keeps `weight`) -> norm weights in the model dtype.
"""
import json

import pytest
import torch

from harness.config import CalibConfig
from quant import METHODS, QuantContext
from quant.export.smoothquant import (SmoothQuantExportError, export_smoothquant, load_smoothquant_qtensors,
                                      quantization_config)
from quant.smoothquant.config import SmoothQuantConfig
from tests.quant.test_smoothquant import _tiny_llama


def _quantized(dtype, model_dtype=torch.bfloat16):
    model = _tiny_llama(2, torch.float32, seed=1).to(model_dtype)
    samples = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = SmoothQuantConfig(dtype=dtype, calib=CalibConfig(n_samples=4, seqlen=32))
    out = METHODS.get("smoothquant")(model, cfg, QuantContext(calibration=lambda: samples, progress=False))
    return model, out


@pytest.mark.parametrize("dtype,torch_name", [("int8", "int8"), ("fp8_e4m3", "float8_e4m3fn"),
                                              ("fp8_e5m2", "float8_e5m2")])
def test_export_has_lmdeploys_names_dtypes_and_dequantizes_to_the_simulated_weights(tmp_path, dtype, torch_name):
    from safetensors.torch import load_file

    model, out = _quantized(dtype)
    d = export_smoothquant(model, out.qtensors, tmp_path / "w8a8")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "smooth_quant", "quant_dtype": torch_name}
    qdtype = getattr(torch, cfg["quantization_config"]["quant_dtype"])  # as from_config resolves it
    tensors = load_file(str(d / "model.safetensors"))
    for name, qt in out.qtensors.items():
        lin = model.get_submodule(name)
        w, s = tensors[f"{name}.weight"], tensors[f"{name}.scale"]
        assert w.dtype == qdtype and w.shape == (lin.out_features, lin.in_features)
        assert s.dtype == torch.float32 and s.shape == (lin.out_features, 1)
        # the saved tensors dequantize to exactly the weights the simulation multiplied with
        assert torch.equal(w.float() * s, lin.weight.float() * lin.scale)
    assert not any(k.endswith((".scale", ".weight")) and "layers" in k and k.rsplit(".", 1)[0] not in out.qtensors
                   and "layernorm" not in k for k in tensors)
    # per Linear exactly weight + scale (no bias in Llama), named as the HF modules the loader's mapping expects
    per_linear = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".scale")}
    assert per_linear == set(out.qtensors)
    for name in per_linear:
        assert any(p in name for p in (".q_proj", ".k_proj", ".v_proj", ".o_proj", ".gate_proj", ".up_proj", ".down_proj"))
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    norm = "model.layers.0.input_layernorm.weight"
    assert tensors[norm].dtype == torch.bfloat16 and torch.equal(tensors[norm], model.get_submodule(norm[:-7]).weight)
    back = load_smoothquant_qtensors(d)
    assert set(back) == set(out.qtensors)
    for name, qt in back.items():
        assert torch.equal(qt.dequantize(), out.qtensors[name].dequantize())


def test_export_refuses_codes_that_are_not_the_models(tmp_path):
    model, out = _quantized("int8")
    name = next(iter(out.qtensors))
    qt = out.qtensors[name]
    bad = dict(out.qtensors)
    bad[name] = type(qt)(q=qt.q.clone(), scales=qt.scales * 2, zeros=None, w_bit=8, group_size=qt.group_size)
    with pytest.raises(SmoothQuantExportError, match="differ"):
        export_smoothquant(model, bad, tmp_path / "x")
    with pytest.raises(SmoothQuantExportError, match="W8A8 takes"):
        quantization_config(torch.uint8)
