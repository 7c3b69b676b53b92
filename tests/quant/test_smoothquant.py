"""SmoothQuant W8A8 with LMDeploy's numerics (quant/smoothquant/): the quantizers against float64 recomputations of
LMDeploy's formulas, the W8A8 Linear against a float64 simulation of its kernel, the smoothing fold exact in float64,
and the method end to end on a tiny Llama."""
import copy

import pytest
import torch
import torch.nn as nn

from harness.architectures import architecture_for
from harness.config import CalibConfig, ConfigError
from quant import METHODS, QuantContext
from quant.smoothquant.config import SmoothQuantConfig, as_smoothquant_config
from quant.smoothquant.linear import W8A8Linear
from quant.smoothquant.numerics import (per_channel_quant, per_token_quant, round_half_away, smooth_scale,
                                        w8a8_matmul)
from quant.smoothquant.smooth import smooth_block_
from tests.quant.fp8_reference import fp8_round_ref

DTYPES = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _round_ref(y: torch.Tensor, dtype, ties_away: bool) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.sign(y) * torch.floor(y.abs() + 0.5) if ties_away else torch.round(y)
    return fp8_round_ref(y, dtype)


def _heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x * torch.exp(torch.randn(shape[-1], generator=g, dtype=torch.float64) * 1.5)  # outlier channels


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_quant_matches_float64_lmdeploy_formula(dtype):
    w = _heavy((64, 96)).float()
    q, s = per_channel_quant(w, dtype)
    s64 = w.double().abs().amax(1, keepdim=True) / QMAX[dtype]
    torch.testing.assert_close(s.double(), s64, rtol=1e-7, atol=0)
    ref = _round_ref((w.double() / s.double()).clamp(-QMAX[dtype], QMAX[dtype]), dtype, ties_away=False)
    assert q.dtype == dtype and s.shape == (64, 1) and s.dtype == torch.float32
    assert torch.equal(q.double(), ref)
    assert q.double().abs().amax(1).eq(QMAX[dtype]).all()  # each row's absmax lands on qmax


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_quant_matches_float64_lmdeploy_formula(dtype):
    x = _heavy((3, 5, 96), seed=1).to(torch.bfloat16)
    q, s = per_token_quant(x, dtype)
    s64 = x.double().abs().amax(-1, keepdim=True).clamp(min=1e-7) / QMAX[dtype]
    torch.testing.assert_close(s.double(), s64, rtol=1e-7, atol=0)
    ref = _round_ref((x.double() / s.double()).clamp(-QMAX[dtype], QMAX[dtype]), dtype, ties_away=True)
    assert q.shape == x.shape and s.shape == (3, 5, 1)
    assert torch.equal(q.double(), ref)


def test_int8_activation_ties_round_away_from_zero_as_libdevice_round():
    y = torch.tensor([0.5, -0.5, 1.5, -2.5, 2.4999998, 126.5, -0.49999997])
    assert round_half_away(y).tolist() == [1.0, -1.0, 2.0, -3.0, 2.0, 127.0, -0.0]
    assert torch.round(y[:4]).tolist() == [0.0, -0.0, 2.0, -2.0]  # (weights use torch.round: ties to even)


def test_zero_token_and_zero_row_stay_finite():
    q, s = per_token_quant(torch.zeros(2, 8), torch.int8)
    assert torch.equal(q, torch.zeros(2, 8, dtype=torch.int8)) and bool((s > 0).all())
    q, s = per_channel_quant(torch.zeros(2, 8), torch.int8)
    assert torch.equal(q.float() * s, torch.zeros(2, 8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a8_linear_matches_float64_simulation_of_lmdeploy_kernel(dtype):
    """matmul_kernel_dynamic_quant: acc = codes_x . codes_w (exact), y = acc * x_scale * w_scale, then + bias."""
    lin = nn.Linear(96, 40, bias=True).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(_heavy((40, 96), seed=2).float() * 0.05)
    x = _heavy((2, 7, 96), seed=3).float()
    q_mod = W8A8Linear.from_linear(lin, dtype)
    y = q_mod(x)
    qx, sx = per_token_quant(x, dtype)
    ref = (qx.double() @ q_mod.weight.double().T) * sx.double() * q_mod.scale.double().T + lin.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    # and the same as the fake-quantized form (x_hat @ w_hat^T), which is what the paper writes
    w_hat = q_mod.weight.double() * q_mod.scale.double()
    torch.testing.assert_close(y.double(), (qx.double() * sx.double()) @ w_hat.T + lin.bias.double(),
                               rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    # output in the input's dtype, as the engine's out_dtype = model dtype
    assert q_mod(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert w8a8_matmul(qx, sx, q_mod.weight, q_mod.scale, out_dtype=torch.float16).dtype == torch.float16


def _smooth_scale_ref(xmax, w, alpha, norm_w=None):
    """LMDeploy smooth_ln_fcs / smooth_fc_fcs in float64, written out."""
    w = w.double().abs()
    w_stat = (w / w.amax(1, keepdim=True)).mean(0)
    s = (xmax.double() ** alpha / w_stat ** (1 - alpha)).clamp(min=1e-4)
    keep = torch.ones_like(s, dtype=torch.bool) if norm_w is None else norm_w != 0
    s = s / (s[keep].max() * s[keep].min()).sqrt()
    s[~keep] = 1
    return s


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smooth_scale_matches_lmdeploy_smooth_ln_fcs(alpha):
    g = torch.Generator().manual_seed(4)
    xmax = torch.rand(32, generator=g) * 10 + 0.01
    w = torch.randn(48, 32, generator=g)
    norm_w = torch.randn(32, generator=g)
    norm_w[[3, 7]] = 0
    s = smooth_scale(xmax, (w.abs() / w.abs().amax(1, keepdim=True)).mean(0), alpha, norm_w != 0)
    torch.testing.assert_close(s.double(), _smooth_scale_ref(xmax, w, alpha, norm_w), rtol=1e-5, atol=0)
    assert s[3] == 1 and s[7] == 1


def _tiny_llama(kv_heads, dtype=torch.float64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms, and one channel the norm zeroes
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
        model.model.layers[0].input_layernorm.weight[5] = 0
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_smoothing_fold_leaves_the_fp_model_unchanged_float64(kv_heads):
    model = _tiny_llama(kv_heads)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    from quant.smoothquant.calibrate import input_absmax

    arch = architecture_for(model)
    heads = sorted({g.linears[0] for g in arch.groups})
    stats = input_absmax(model, model.model, [f"model.layers.{i}.{h}" for i in range(2) for h in heads], ids)
    with torch.no_grad():
        before = model(ids).logits
    scales = [smooth_block_(block, arch, {h: stats[f"model.layers.{i}.{h}"] for h in heads}, 0.5)
              for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        after = model(ids).logits
    # the fold helpers (quant.awq.fold) compute the folded weights in fp32: unchanged up to fp32 rounding (a wrong
    # fold, e.g. s applied to the wrong side or to k/q only, moves logits by O(1))
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6 * float(before.abs().max()))
    # v -> o is smoothed only when the shapes allow (LMDeploy skips it under grouped-query attention)
    assert ("self_attn.o_proj" in scales[0]) == (kv_heads == 4)
    assert scales[0]["self_attn.q_proj"][5] == 1 != scales[1]["self_attn.q_proj"][5]  # norm weight 0: s stays 1
    assert max(float((s - 1).abs().max()) for s in scales[0].values()) > 0.1  # the scales do something


def test_smoothing_moves_the_outlier_into_the_weights():
    """The point of SmoothQuant (Xiao et al. 2023, Sec. 4): after smoothing, max|x| per channel is flatter."""
    model = _tiny_llama(4)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 9] *= 30  # an outlier channel in the residual stream
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    from quant.smoothquant.calibrate import input_absmax

    name = "model.layers.0.self_attn.q_proj"
    before = input_absmax(model, model.model, [name], ids)[name]
    arch = architecture_for(model)
    heads = sorted({g.linears[0] for g in arch.groups})
    stats = input_absmax(model, model.model, [f"model.layers.0.{h}" for h in heads], ids)
    smooth_block_(model.model.layers[0], arch, {h: stats[f"model.layers.0.{h}"] for h in heads}, 0.5)
    after = input_absmax(model, model.model, [name], ids)[name]
    assert float(after.max() / after.median()) < float(before.max() / before.median())


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_method_quantizes_every_decoder_linear_and_stays_close_to_fp(dtype):
    model = _tiny_llama(2, torch.float32, seed=3)
    ref = copy.deepcopy(model)
    samples = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = SmoothQuantConfig(dtype=dtype, calib=CalibConfig(n_samples=4, seqlen=32))
    out = METHODS.get("smoothquant")(model, cfg, QuantContext(calibration=lambda: samples, progress=False))
    assert len(out.qtensors) == 2 * 7 and all(isinstance(model.get_submodule(n), W8A8Linear) for n in out.qtensors)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    qt = out.qtensors["model.layers.0.mlp.down_proj"]
    assert qt.q.dtype == {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[dtype]
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < {"int8": 0.05, "fp8_e4m3": 0.1, "fp8_e5m2": 0.2}[dtype]
    assert out.summary["weight_bytes_ratio"] < 1 and out.summary["dtype"] == dtype
    # the memory evaluator counts the swapped modules' bytes by hand: 1-byte codes, an fp32 scale per row, the rest
    # of the model (embeddings, norms) at 2 bytes per parameter
    from eval.memory import weight_memory

    mem = weight_memory(model, out.qtensors)
    lin = [ref.get_submodule(n) for n in out.qtensors]
    n_lin = sum(m.weight.numel() for m in lin)
    rest = sum(p.numel() for p in ref.parameters()) - n_lin  # tied head counted once by .parameters()
    assert mem["fp16_bytes"] == 2 * (rest + n_lin) and mem["unquantized_fp16_bytes"] == 2 * rest
    assert mem["w8a8"]["total_bytes"] == 2 * rest + n_lin + 4 * sum(m.out_features for m in lin)


def test_config_checks():
    with pytest.raises(ConfigError, match="quant.dtype"):
        SmoothQuantConfig(dtype="int4").validate()
    with pytest.raises(ConfigError, match="quant.alpha"):
        SmoothQuantConfig(alpha=1.5).validate()
    from quant.rtn import RTNConfig

    model = _tiny_llama(2, torch.float32)
    with pytest.raises(ConfigError, match="quant.method"):  # another method's config never quantizes as W8A8
        METHODS.get("smoothquant")(model, RTNConfig(), QuantContext(calibration=lambda: torch.zeros(1, 8, dtype=torch.long)))
    assert as_smoothquant_config(SmoothQuantConfig(alpha=0.7)).alpha == 0.7


def test_block_by_block_statistics_equal_one_fp_pass_of_the_whole_model():
    """The runner's statistics (each block fed the FP model's hidden states, quant.smoothquant.method) are LMDeploy's
    `calibrate` numbers: max|x| of one FP pass of the whole model, bit for bit, for every block and group."""
    from quant.smoothquant.calibrate import input_absmax
    from quant.smoothquant.method import calibration_stats

    model = _tiny_llama(2)
    ids = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(3))
    arch = architecture_for(model)
    heads = sorted({g.linears[0] for g in arch.groups})
    ref = input_absmax(model, model.model, [f"model.layers.{i}.{h}" for i in range(2) for h in heads], ids)
    got = calibration_stats(model, ids)
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
