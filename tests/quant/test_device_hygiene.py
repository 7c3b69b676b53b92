"""Device hygiene of the quantization math, checked on the CPU: every function runs on tensors of the `meta` device,
where a tensor created without its inputs' device (e.g. `torch.zeros(n)` on the CPU) cannot be mixed in and raises.
A CUDA run fails the same way ("found at least two devices, cuda:0 and cpu"), so this catches it without a GPU."""
from __future__ import annotations

import torch

from quant import primitives as P
from quant.awq import search as S

META = torch.device("meta")


def test_primitives_stay_on_the_inputs_device():
    w = torch.empty(32, 128, device=META, dtype=torch.bfloat16)
    qt = P.quantize_tensor(w, 4, 64)
    assert qt.q.device == qt.scales.device == qt.zeros.device == META
    assert P.fake_quantize(w, 3, 32).device == META
    assert qt.dequantize().device == META
    assert P.unpack_int4_pairs(P.pack_int4_pairs(torch.empty(4, 8, device=META, dtype=torch.uint8))).device == META


def test_awq_statistics_and_searches_stay_on_the_inputs_device():
    x = torch.empty(64, 128, device=META, dtype=torch.bfloat16)
    w = torch.empty(32, 128, device=META, dtype=torch.bfloat16)
    assert S.act_absmean(x).device == S.act_absmax(x).device == META
    assert S.weight_absmean([w, w], 64).device == META
    assert S.group_gram(x, 64).device == META
    assert S.search_clip(w, x, 4, 64, True).device == META
    s = S.awq_scale(S.act_absmean(x), 0.5, S.weight_absmean([w], 64))
    assert s.device == META and S.smoothing_scale(S.act_absmax(x), S.weight_absmean([w], 64)).device == META
