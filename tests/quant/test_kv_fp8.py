"""FP8 KV cache (LMDeploy quant_policy 16 = float8_e4m3fn, 17 = float8_e5m2): the cast against torch's float8 dtypes
and a float64 reference, saturation, exact read-back, bytes per token, the cache inside the real model, and the
config -> quant_policy mapping (kv.format, which leaves earlier run_ids as they were)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from eval.forward import forward
from quant.kv_cache import (KV_FP8, QuantizedKVCache, check_kv_supported, kv_bytes_per_token, kv_fp8_dequantize,
                            kv_fp8_quantize)
from tests.quant.fp8_reference import FP8_FORMATS, fp8_round_ref

FORMATS = list(KV_FP8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_cast_matches_torch_float8_and_float64_reference(fmt, dtype):
    f8 = KV_FP8[fmt]
    vmax = FP8_FORMATS[f8][2]
    g = torch.Generator().manual_seed(0)
    # values from below the subnormals to past the range, both signs
    x = (torch.randn(4, 3, 50, 64, generator=g) * torch.exp2(torch.randint(-20, 18, (4, 3, 50, 64), generator=g).float()))
    x = x.to(dtype)
    q = kv_fp8_quantize(x, fmt)
    assert q.dtype == f8 and q.shape == x.shape
    inside = x.float().abs() <= vmax
    assert torch.equal(q.float()[inside], x.float()[inside].to(f8).float())  # torch's own cast where it is defined
    ref = fp8_round_ref(x.double().clamp(-vmax, vmax), f8)
    assert torch.equal(q.double(), ref)  # and the format's definition everywhere, saturation included
    assert bool(torch.isfinite(q.float()).all()) and bool((~inside).any())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_read_back_is_exact_in_the_model_dtype(fmt, dtype):
    q = torch.arange(256, dtype=torch.uint8).view(KV_FP8[fmt])
    q = q[torch.isfinite(q.float())]
    back = kv_fp8_dequantize(q, dtype)
    assert back.dtype == dtype and torch.equal(back.float(), q.float())


def test_fp8_bytes_per_token_and_checks():
    L, H, D = 30, 3, 64
    for fmt in FORMATS:
        assert kv_bytes_per_token(L, H, D, 8, fmt=fmt) == L * 2 * H * D  # 1 byte a value, no per-token metadata
        assert kv_bytes_per_token(L, H, D, 8, fmt=fmt) / kv_bytes_per_token(L, H, D, 16) == 0.5
    with pytest.raises(ValueError, match="kv.bits=8"):
        check_kv_supported(4, "fp8_e4m3")
    with pytest.raises(ValueError, match="kv.format"):
        check_kv_supported(8, "fp8")


def test_fp8_cache_in_the_real_model(smollm2_bf16_shared, milton_ids):
    model = smollm2_bf16_shared
    ids = milton_ids[None, :48]
    c = model.config
    ref_cache = DynamicCache(config=c)
    with torch.no_grad():
        b = forward(model, ids[:, :42], ref_cache).logits.float()
    rel = {}
    for fmt in FORMATS:  # prefill 40 tokens, then two decode steps
        cache = QuantizedKVCache(c, bits=8, fmt=fmt)
        with torch.no_grad():
            a = torch.cat([forward(model, ids[:, :40], cache).logits, forward(model, ids[:, 40:41], cache).logits,
                           forward(model, ids[:, 41:42], cache).logits], dim=1).float()
        assert cache.get_seq_length() == 42
        assert cache.nbytes() == 42 * kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 8,
                                                          fmt=fmt)
        # the cache holds the fp8 cast of what an ordinary cache holds (layer 0's prefill K/V: the same inputs)
        lay, ref = cache.layers[0], ref_cache.layers[0]
        assert torch.equal(lay.k[:, :, :40].view(torch.uint8), kv_fp8_quantize(ref.keys[:, :, :40], fmt).view(torch.uint8))
        assert torch.equal(lay.v[:, :, :40].view(torch.uint8), kv_fp8_quantize(ref.values[:, :, :40], fmt).view(torch.uint8))
        rel[fmt] = float((a - b).norm() / b.norm())
    # e5m2 keeps 2 mantissa bits to e4m3's 3 (relative rounding error 2^-3 vs 2^-4): a larger logit error
    assert 0 < rel["fp8_e4m3"] < rel["fp8_e5m2"] < 0.25 and rel["fp8_e4m3"] < 0.06, rel


def test_kv_format_config_quant_policy_and_run_id(tmp_path):
    from backends import lmdeploy as lb
    from harness.compose import compose
    from harness.config import ConfigError, KVConfig
    from harness.records import run_id

    assert lb.quant_policy(8, "fp8_e4m3") == 16 and lb.quant_policy(8, "fp8_e5m2") == 17
    assert lb.quant_policy(8) == 8 and lb.quant_policy(8, "int") == 8
    with pytest.raises(ConfigError, match="kv.format"):
        KVConfig(bits=4, format="fp8_e4m3").validate()
    with pytest.raises(ConfigError, match="kv.format"):
        KVConfig(bits=8, format="fp4").validate()
    for fmt, policy in (("fp8_e4m3", 16), ("fp8_e5m2", 17)):
        cfg = compose(["backend=lmdeploy", f"kv={fmt}"])
        assert (cfg.kv.bits, cfg.kv.format) == (8, fmt)
        assert lb.engine_kwargs(cfg, tmp_path, "pytorch")["quant_policy"] == policy
        with pytest.raises(ConfigError, match="PyTorch engine"):
            lb.engine_kwargs(cfg, tmp_path, "turbomind")
    # kv.format at its default leaves the identity (and so every earlier record's run_id) as it was
    int8 = compose(["kv=int8"])
    assert "format" not in __import__("harness.records", fromlist=["identity"]).identity(int8)["kv"]
    assert len({run_id(compose([f"kv={k}"])) for k in ("int8", "fp8_e4m3", "fp8_e5m2")}) == 3
