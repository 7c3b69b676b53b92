"""GPTQ export (quant/export/gptq.py): packing against AutoGPTQ's own packing loop and LMDeploy TurboMind's reader,
the v1 zero-point convention, and an export/load round trip on a real block."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from quant.export.gptq import GPTQExportError, export_gptq, load_gptq_qtensors, pack_gptq, unpack_gptq
from quant.primitives import QTensor, quantize_tensor


def _autogptq_pack(intweight: torch.Tensor, zeros: torch.Tensor, bits: int = 4):
    """AutoGPTQ QuantLinear.pack's loops (qlinear_exllama.py), on uint32 words as there: intweight [K, N] codes,
    zeros [G, N] integer zero points (v1: `zeros -= 1`). Returns (qweight [K/8, N], qzeros [G, N/8]) as int32."""
    iw = intweight.to(torch.int64).tolist()
    z = (zeros.to(torch.int64) - 1).tolist()
    k, n, g = len(iw), len(iw[0]), len(z)
    qweight = [[0] * n for _ in range(k // 32 * bits)]
    i = row = 0
    while row < len(qweight):
        for j in range(i, i + 32 // bits):
            for c in range(n):
                qweight[row][c] |= (iw[j][c] & 0xFFFFFFFF) << (bits * (j - i))
        i += 32 // bits
        row += 1
    qzeros = [[0] * (n // 32 * bits) for _ in range(g)]
    i = col = 0
    while col < len(qzeros[0]):
        for j in range(i, i + 32 // bits):
            for r in range(g):
                qzeros[r][col] |= (z[r][j] & 0xFFFFFFFF) << (bits * (j - i))
        i += 32 // bits
        col += 1

    def to_i32(rows):  # numpy's astype(np.int32) of uint32 words: the same bits
        return torch.tensor([[struct.unpack("<i", struct.pack("<I", v & 0xFFFFFFFF))[0] for v in r] for r in rows],
                            dtype=torch.int32)
    return to_i32(qweight), to_i32(qzeros)


def _turbomind_read(qweight: torch.Tensor, qzeros: torch.Tensor):
    """LMDeploy TurboMind's GPTQFormat.normalize (lmdeploy/turbomind/weight_format.py): codes [K, N], zeros [G, N]."""
    def slices(x):
        xs = []
        for _ in range(8):
            xs.append((x & 15).to(torch.uint8))
            x = x >> 4
        return xs
    w = torch.stack(slices(qweight), dim=1).view(-1, qweight.size(-1))
    z = torch.stack(slices(qzeros), dim=-1).view(qzeros.size(0), -1) + 1
    return w, z


def _qtensor(out=32, inn=128, group=32, seed=0, zero_min=1):  # AutoGPTQ: N // 32 * bits needs 32 | N
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.uint8)
    zeros = torch.randint(zero_min, 16, (out, inn // group), generator=g).float()
    scales = torch.rand(out, inn // group, generator=g) * 0.01 + 1e-3
    return QTensor(q, scales, zeros, 4, group)


def test_packing_matches_autogptq_and_turbomind_reads_it_back():
    qt = _qtensor()
    t = pack_gptq(qt)
    ref_w, ref_z = _autogptq_pack(qt.q.t(), qt.zeros.t())
    assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
    assert t["qweight"].shape == (128 // 8, 32) and t["qzeros"].shape == (4, 32 // 8) and t["scales"].shape == (4, 32)
    assert torch.equal(t["qweight"], ref_w) and torch.equal(t["qzeros"], ref_z)
    assert torch.equal(t["g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    w, z = _turbomind_read(t["qweight"], t["qzeros"])
    assert torch.equal(w, qt.q.t()) and torch.equal(z.float(), qt.zeros.t())
    back = unpack_gptq(t)
    assert torch.equal(back.q, qt.q) and torch.equal(back.zeros, qt.zeros)
    torch.testing.assert_close(back.scales, qt.scales.half().float(), rtol=0, atol=0)


def test_v1_refuses_zero_point_0_and_v2_holds_it():
    qt = _qtensor(zero_min=0, seed=1)
    assert bool((qt.zeros == 0).any())
    with pytest.raises(GPTQExportError, match="gptq_v2"):
        pack_gptq(qt)
    back = unpack_gptq(pack_gptq(qt, "gptq_v2"), "gptq_v2")
    assert torch.equal(back.q, qt.q) and torch.equal(back.zeros, qt.zeros)


def test_symmetric_codes_are_written_with_zero_point_8():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    qt = quantize_tensor(w, 4, 32, zero_point=False)
    t = pack_gptq(qt)
    _, z = _turbomind_read(t["qweight"], t["qzeros"])
    assert bool((z == 8).all())
    back = unpack_gptq(t, sym=True)
    assert torch.equal(back.q, qt.q)
    torch.testing.assert_close(back.dequantize(), qt.dequantize(), rtol=1e-3, atol=0)  # fp16 scales


def test_export_load_round_trip_on_a_real_block(smollm2_fp32, tmp_path):
    from quant.surgery import quantize_linear_
    from tests.quant.test_awq import _truncated

    m = _truncated(smollm2_fp32, 1)
    qts = {f"model.layers.0.{n}": quantize_linear_(m.get_submodule(f"model.layers.0.{n}"), 4, 64, True)
           for n in ("self_attn.q_proj", "mlp.down_proj")}
    fmt = "gptq" if all(bool((qt.zeros > 0).all()) for qt in qts.values()) else "gptq_v2"
    out = export_gptq(m, qts, tmp_path / "ckpt", checkpoint_format=fmt)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    skipped = cfg["modules_to_not_convert"]
    assert cfg == {**json.loads((out / "quantize_config.json").read_text()), "modules_to_not_convert": skipped}
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 64 and not cfg["sym"]
    assert not cfg["desc_act"] and cfg["checkpoint_format"] == fmt
    back = load_gptq_qtensors(out)
    assert sorted(back) == sorted(qts)
    for n, qt in qts.items():
        assert torch.equal(back[n].q, qt.q) and torch.equal(back[n].zeros, qt.zeros)
