"""Real int4 CPU kernels: one Linear against x @ W_deq^T, and the whole swapped model against the fake-quantized one."""
from __future__ import annotations

import copy

import pytest
import torch

from quant.surgery import quantizable_linears, quantize_linear_

from quant.kernels.int4_linear import (
    Int4KernelError, Int4WeightOnlyLinear, kernel_dequantize, swap_int4_linears, weight_bytes,
)
from quant.primitives import QTensor, quantize_tensor

W_BIT, GROUP = 4, 64


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _rtn_decoder_linears(model) -> dict[str, QTensor]:
    """RTN w4 g64 of every decoder Linear through the harness's own surgery (the Linear keeps the dequantized weight)."""
    return {n: quantize_linear_(lin, W_BIT, GROUP, True) for n, lin in quantizable_linears(model).items()}


@torch.no_grad()
@pytest.mark.parametrize("name,group_size", [("model.layers.0.self_attn.k_proj", 64),  # N = 192
                                             ("model.layers.5.mlp.down_proj", 128),  # K = 1536
                                             ("model.layers.29.mlp.up_proj", 32)])
def test_kernel_matches_dequantized_matmul(smollm2_resolved, name, group_size):
    from safetensors import safe_open

    with safe_open(f"{smollm2_resolved.directory}/model.safetensors", "pt") as f:
        w = f.get_tensor(f"{name}.weight").float()
    qt = quantize_tensor(w, W_BIT, group_size, True)
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ref = x.float() @ qt.dequantize().T  # exact (fp32) dequantized weights, AWQ convention (q - z) * s

    lin = Int4WeightOnlyLinear(qt)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (5, w.shape[0])
    assert _rel(y, ref) < 1e-2  # bf16 output, bf16 scales and float zeros: measured 2.4e-3 .. 2.5e-3
    # the float-zero conversion is exact up to the compute dtype: in fp32 the kernel reproduces the AWQ weights
    y32 = Int4WeightOnlyLinear(qt, compute_dtype=torch.float32)(x.float())
    assert _rel(y32, ref) < 1e-5
    assert _rel(kernel_dequantize(qt), qt.dequantize()) < 4e-3
    assert lin.packed_bytes() == w.numel() // 2 + w.shape[1] // group_size * w.shape[0] * 2 * 2


def test_kernel_refuses_unsupported_settings():
    w = torch.randn(64, 256)
    for qt, field in [(quantize_tensor(w, 4, 16, True), "quant.group_size"),
                      (quantize_tensor(w, 3, 64, True), "quant.w_bit"),
                      (quantize_tensor(w, 4, 64, False), "quant.zero_point"),
                      (quantize_tensor(torch.randn(40, 256), 4, 64, True), "out_features")]:
        with pytest.raises(Int4KernelError, match=field):
            Int4WeightOnlyLinear(qt)


@torch.no_grad()
def test_swapped_model_matches_fake_quantized(smollm2_fp32, tokenizer, milton_ids):
    model = smollm2_fp32
    qtensors = _rtn_decoder_linears(model)
    ids = milton_ids[:32][None]
    logits_fp32 = model(ids).logits

    # fp32 compute: the swapped model is the fake-quantized model up to summation order
    m32 = swap_int4_linears(copy.deepcopy(model), qtensors, compute_dtype=torch.float32)
    assert _rel(m32(ids[:, :8]).logits, logits_fp32[:, :8]) < 1e-4

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    logits_bf16 = bf16(ids).logits
    int4 = swap_int4_linears(copy.deepcopy(bf16), qtensors)
    assert type(int4.model.layers[0].mlp.down_proj) is Int4WeightOnlyLinear
    assert type(int4.lm_head) is torch.nn.Linear and int4.lm_head.weight.dtype == torch.bfloat16
    logits_int4 = int4(ids).logits
    # SmolLM2's logits in bf16 are themselves ~2.2e-2 (relative) from fp32; the kernel must add no more than that
    noise_bf16 = _rel(logits_bf16, logits_fp32)
    assert _rel(logits_int4, logits_fp32) < 1.25 * noise_bf16 + 1e-3
    assert _rel(logits_int4, logits_bf16) < 5e-2

    prompt = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    gen = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(int4.generate(prompt, **gen), bf16.generate(prompt, **gen))

    nb_bf16, nb_int4 = weight_bytes(bf16), weight_bytes(int4)
    assert nb_int4["n_int4_linears"] == len(qtensors) == 210
    assert nb_int4["int4_packed_bytes"] == sum(qt.q.numel() // 2 for qt in qtensors.values())
    assert nb_int4["total_bytes"] < 0.45 * nb_bf16["total_bytes"]  # measured 116.4 MB vs 269.0 MB
