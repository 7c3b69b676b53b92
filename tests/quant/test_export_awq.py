"""AWQ GEMM export: packing against AutoAWQ's loop and LMDeploy's unpack, and a real-model export/load round trip."""
from __future__ import annotations

import json

import pytest
import torch

from quant.surgery import quantizable_linears, quantize_linear_
from safetensors.torch import load_file

from quant.export.awq import (
    AWQExportError, export_awq, load_awq_dequantized, load_awq_qtensors, pack_awq_gemm, unpack_awq_gemm,
)
from quant.primitives import QTensor, dequantize, quantize_tensor

W_BIT, GROUP = 4, 64
TINY_H = 64  # tests.quant.test_moe.TINY hidden_size


def _autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ WQLinear_GEMM.from_linear's packing loop (awq/modules/linear/gemm.py), intweight [rows, cols]."""
    out = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    intweight = intweight.to(torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i, o in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
            out[:, col] |= intweight[:, col * 8 + o] << (i * 4)
    return out


def _lmdeploy_unpack(x: torch.Tensor) -> torch.Tensor:
    """LMDeploy's reader (lmdeploy/turbomind/weight_format.py `_unpack_awq_gemm`, v0.18.0): int32 [R, C/8] -> [R, C]."""
    xs = []
    for _ in range(8):
        xs.append((x & 15).to(torch.uint8))
        x = x >> 4
    return torch.stack([xs[i] for i in [0, 4, 1, 5, 2, 6, 3, 7]], dim=-1).view(*x.shape[:-1], -1)


def test_pack_unpack_round_trip_matches_autoawq_and_lmdeploy():
    g = torch.Generator().manual_seed(0)
    out, inn, n_groups = 48, 256, 4
    q = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out, n_groups), generator=g).float()
    qweight, qzeros = pack_awq_gemm(q, zeros, W_BIT)
    assert qweight.dtype == qzeros.dtype == torch.int32
    assert qweight.shape == (inn, out // 8) and qzeros.shape == (n_groups, out // 8)
    assert (qweight < 0).any()  # codes >= 8 in the top slot set the sign bit; the round trip must survive it
    q2, zeros2 = unpack_awq_gemm(qweight, qzeros, W_BIT)
    assert torch.equal(q2, q) and torch.equal(zeros2, zeros)
    assert torch.equal(qweight, _autoawq_pack(q.t())) and torch.equal(qzeros, _autoawq_pack(zeros.t()))
    assert torch.equal(_lmdeploy_unpack(qweight), q.t()) and torch.equal(_lmdeploy_unpack(qzeros), zeros.t().to(torch.uint8))


def test_only_4bit_zero_point_is_gemm():
    q = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(AWQExportError, match="quant.w_bit"):
        pack_awq_gemm(q, torch.zeros(8, 1), w_bit=3)
    with pytest.raises(AWQExportError, match="quant.zero_point"):
        pack_awq_gemm(q, None)


def _rtn_decoder_linears(model) -> dict[str, QTensor]:
    """RTN w4 g64 of every decoder Linear through the harness's own surgery (the Linear keeps the dequantized weight)."""
    return {n: quantize_linear_(lin, W_BIT, GROUP, True) for n, lin in quantizable_linears(model).items()}


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_export_load_round_trip_on_real_model(smollm2_fp32, tokenizer, milton_ids, tmp_path):
    model = smollm2_fp32
    qtensors = _rtn_decoder_linears(model)
    ids = milton_ids[:32][None]
    logits_fake = model(ids).logits

    out = export_awq(model, qtensors, tmp_path / "awq", tokenizer=tokenizer, quant_meta={"method": "rtn"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]  # no temp dirs left behind
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "quant_meta.json", "tokenizer.json"} <= names

    # what LMDeploy reads (turbomind/converter.py get_tm_config, pytorch/config.py): quant_method, version, bits, group_size
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4,
                                             "group_size": GROUP, "zero_point": True}
    assert config["tie_word_embeddings"] is True and config["model_type"] == "llama"
    assert json.loads((out / "quant_meta.json").read_text())["method"] == "rtn"

    sd = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in sd and sd["model.embed_tokens.weight"].dtype == torch.float16
    for name, qt in qtensors.items():
        n_out, n_in = qt.q.shape
        assert f"{name}.weight" not in sd
        assert sd[f"{name}.qweight"].dtype == torch.int32 and sd[f"{name}.qweight"].shape == (n_in, n_out // 8)
        assert sd[f"{name}.qzeros"].dtype == torch.int32 and sd[f"{name}.qzeros"].shape == (n_in // GROUP, n_out // 8)
        assert sd[f"{name}.scales"].dtype == torch.float16 and sd[f"{name}.scales"].shape == (n_in // GROUP, n_out)
    assert all(t.dtype == torch.float16 for k, t in sd.items() if not k.endswith((".qweight", ".qzeros")))

    loaded_qt = load_awq_qtensors(out)
    assert loaded_qt.keys() == qtensors.keys()
    loaded = load_awq_dequantized(out, torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    mods = dict(loaded.named_modules())
    for name, qt in qtensors.items():
        lq = loaded_qt[name]
        assert torch.equal(lq.q, qt.q) and torch.equal(lq.zeros, qt.zeros) and lq.group_size == GROUP
        scales16 = qt.scales.half().float()  # the checkpoint stores fp16 scales
        assert torch.equal(lq.scales, scales16)
        assert torch.equal(mods[name].weight, dequantize(qt.q, scales16, qt.zeros, GROUP))

    logits_loaded = loaded(ids).logits
    # bit-exact against the in-memory model once its weights use the same fp16-rounded scales
    for name, qt in qtensors.items():
        model.get_submodule(name).weight.data = dequantize(qt.q, qt.scales.half().float(), qt.zeros, GROUP)
    assert torch.equal(logits_loaded, model(ids).logits)
    # and the fp16 rounding of the scales moves the fake-quantized model's logits by little (measured 1.3e-3)
    assert _rel(logits_loaded, logits_fake) < 5e-3


def test_export_checks_qtensors_and_is_atomic(smollm2_fp32, tmp_path):
    model = smollm2_fp32
    qtensors = _rtn_decoder_linears(model)
    out = export_awq(model, qtensors, tmp_path / "awq")
    first = (out / "model.safetensors").stat().st_mtime_ns

    # QTensors that do not describe the model's weights are refused, and the existing export is left intact
    name = "model.layers.0.mlp.down_proj"
    bad = dict(qtensors)
    bad[name] = QTensor((qtensors[name].q.int() ^ 1).to(torch.uint8), qtensors[name].scales, qtensors[name].zeros,
                        W_BIT, GROUP)
    with pytest.raises(AWQExportError, match="down_proj"):
        export_awq(model, bad, tmp_path / "awq")
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]

    with pytest.raises(AWQExportError, match="quant.group_size"):  # one group size per checkpoint
        mixed = dict(qtensors)
        mixed[name] = quantize_tensor(model.get_submodule(name).weight.data, W_BIT, 32, True)
        export_awq(model, mixed, tmp_path / "awq", check_weights=False)
    with pytest.raises(AWQExportError, match="quant.zero_point"):
        sym = {name: quantize_tensor(model.get_submodule(name).weight.data, W_BIT, GROUP, False)}
        export_awq(model, sym, tmp_path / "awq", check_weights=False)

    export_awq(model, qtensors, tmp_path / "awq")  # replacing an export works and leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@torch.no_grad()
def test_moe_export_uses_the_architecture_names_and_loads_back(kind, tmp_path):
    """A mixture of experts (fused experts unfused at load, harness.moe_unfuse) is written one AWQ Linear per expert
    under the names transformers' save_pretrained writes for the FP16 model (Mixtral: block_sparse_moe.experts.N.w1 /
    w3 / w2, not the unfused gate_proj / up_proj / down_proj); the routers stay fp16 and unconverted; the checkpoint
    reads back to the quantized model's weights and logits exactly."""
    from harness.moe_unfuse import unfuse_experts
    from tests.quant.test_moe import tiny_moe

    model = tiny_moe(kind)
    unfuse_experts(model)
    qtensors = {n: quantize_linear_(lin, W_BIT, 16, True) for n, lin in quantizable_linears(model).items()}
    assert any(".experts.3.up_proj" in n for n in qtensors)
    out = export_awq(model, qtensors, tmp_path / "awq")

    tiny_moe(kind).save_pretrained(tmp_path / "fp16")
    saved = set(load_file(str(tmp_path / "fp16" / "model.safetensors")))
    sd = load_file(str(out / "model.safetensors"))
    packed = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".qweight")}
    assert {k for k in sd if k.rsplit(".", 1)[0] not in packed} | {f"{p}.weight" for p in packed} == saved
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    expert = f"model.layers.1.{block}.experts.3.{'w3' if kind == 'mixtral' else 'up_proj'}"
    assert expert in packed and sd[f"{expert}.qweight"].shape == (TINY_H, 96 // 8 if kind == "mixtral" else 48 // 8)
    router = f"model.layers.1.{block}.gate"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert router in qcfg["modules_to_not_convert"] and sd[f"{router}.weight"].dtype == torch.float16

    loaded = load_awq_dequantized(out, torch.float32)
    for name, qt in qtensors.items():  # the in-memory model with the scales as stored (fp16)
        model.get_submodule(name).weight.copy_(dequantize(qt.q, qt.scales.half().float(), qt.zeros, 16))
    got, want = loaded.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for k in want:  # every other tensor went through fp16
        assert torch.equal(got[k], want[k] if k in {f"{n}.weight" for n in qtensors} else want[k].half().float()), k
    ids = torch.arange(1, 33)[None]
    for k, v in want.items():
        v.copy_(got[k])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
