"""Memory arithmetic against hand computation from the model's shape; the throughput path really runs the int4
kernel (not dequantized weights), matches the dequantized-weight model within bf16 tolerance, and its KV cache holds
the bytes the arithmetic says."""
from __future__ import annotations

import pytest
import torch

from harness.config import ConfigError, RunConfig
from eval.memory import check_fits, kv_memory, weight_memory
from eval.registry import EvalContext
from eval.throughput import greedy_run, measure, model_under_test, prompt_batch


def _shape(c):
    return c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_key_value_heads, c.head_dim, c.vocab_size


def test_kv_bytes_by_hand(smollm2_resolved):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(smollm2_resolved.directory)
    L, _, _, kvh, hd, _ = _shape(c)
    for bits in (16, 8, 4):
        per_head = hd * 2 if bits == 16 else hd * bits // 8 + 2 + 2  # codes + fp16 scale + fp16 zero
        hand = L * 2 * kvh * per_head  # K and V, every layer
        m = kv_memory(c, bits, context_len=4096, batch_size=3)
        assert m["bytes_per_token"] == hand and m["bytes_at_context"] == hand * 4096 * 3
        assert m["ratio_to_fp16"] == hand / (L * 2 * kvh * hd * 2)


@pytest.fixture(scope="module")
def rtn_bf16(smollm2_resolved):
    """RTN w4 g64 of the bf16 model, once for this module (the tests only read it)."""
    from harness.config import ModelConfig
    from harness.models import load_model
    from quant import METHODS, QuantContext

    model = load_model(smollm2_resolved, ModelConfig(name="x", path="embedded:smollm2-135m-instruct", dtype="bfloat16"))
    from quant.rtn import RTNConfig

    out = METHODS.get("rtn")(model, RTNConfig(w_bit=4, group_size=64), QuantContext(None, False))
    return model, out.qtensors


@pytest.fixture(scope="module")
def int4_under_test(rtn_bf16):
    """What the throughput evaluator runs for this config: (model, weights description, fallback reason)."""
    model, qts = rtn_bf16
    return model_under_test(EvalContext(RunConfig(), model, None, {}, {}, {}, "m", qtensors=qts), True)


def test_weight_bytes_by_hand(rtn_bf16, int4_under_test):
    from quant.kernels.int4_linear import weight_bytes

    model, qts = rtn_bf16
    L, H, I, kvh, hd, V = _shape(model.config)
    linear = L * (H * H * 2 + H * kvh * hd * 2 + 3 * H * I)  # q, o; k, v; gate, up, down
    other = V * H + (2 * L + 1) * H  # tied embedding / lm_head once; two norms per layer and the final norm
    assert sum(p.numel() for p in model.parameters()) == linear + other
    groups = linear // 64
    m = weight_memory(model, qts)
    assert m["fp16_bytes"] == 2 * (linear + other) and m["quantized_params"] == linear
    assert m["unquantized_fp16_bytes"] == 2 * other
    assert m["awq_packed"]["total_bytes"] == linear // 2 + groups * 2 + groups // 2 + 2 * other  # fp16 s, 4-bit z
    assert m["int4_kernel"]["total_bytes"] == linear // 2 + groups * 4 + 2 * other  # bf16 (scale, zero) pairs
    # the arithmetic is what the kernel modules really hold
    swapped, _, _, _ = int4_under_test
    assert weight_bytes(swapped)["total_bytes"] == m["int4_kernel"]["total_bytes"]
    from quant.kernels.w4a16 import packed_bytes  # the registry's count, what records hold: the same bytes

    assert packed_bytes(swapped)["total_bytes"] == m["int4_kernel"]["total_bytes"]


def test_fp4_weight_bytes_by_hand(smollm2_resolved):
    """RTN NVFP4 / MXFP4: the format's own layout by hand (codes two a byte, a 1-byte scale per block of 16 / 32,
    NVFP4's fp32 global scale per Linear), under the format's name; no AWQ or int4-kernel layout is claimed."""
    from harness.config import ModelConfig
    from harness.models import load_model
    from quant import METHODS, QuantContext
    from quant.rtn import RTNConfig

    for fmt, block in (("nvfp4", 16), ("mxfp4", 32)):
        model = load_model(smollm2_resolved, ModelConfig(name="x", path="embedded:smollm2-135m-instruct",
                                                         dtype="bfloat16"))
        model.model.layers = model.model.layers[:1]
        qts = METHODS.get("rtn")(model, RTNConfig(w_bit=4, group_size=block, zero_point=False, format=fmt),
                                 QuantContext(None, False)).qtensors
        L, H, I, kvh, hd, V = _shape(model.config)
        linear = 1 * (H * H * 2 + H * kvh * hd * 2 + 3 * H * I)
        other = V * H + 3 * H
        m = weight_memory(model, qts)
        want = linear // 2 + linear // block + (4 * len(qts) if fmt == "nvfp4" else 0) + 2 * other
        assert len(qts) == 7 and m[fmt]["total_bytes"] == want and m["fp16_bytes"] == 2 * (linear + other)
        assert "awq_packed" not in m and "int4_kernel" not in m


@torch.no_grad()
def test_throughput_runs_int4_kernel_and_matches_dequantized(rtn_bf16, int4_under_test, milton_ids, monkeypatch):
    from quant.kernels import int4_linear
    from quant.kv_cache import QuantizedKVCache

    model, qts = rtn_bf16  # `model` holds the dequantized (fake-quantized) weights in bf16
    swapped, weights, fallback, kernel = int4_under_test
    assert fallback is None and kernel == "tinygemm" and "torch int4" in weights and swapped is not model
    assert sum(isinstance(m, int4_linear.Int4WeightOnlyLinear) for m in swapped.modules()) == len(qts) == 210
    assert not any(isinstance(m, int4_linear.Int4WeightOnlyLinear) for m in model.modules())  # ctx.model untouched

    calls = []
    real_ops = int4_linear._ops

    def counting_ops(device="cpu"):
        convert, mm = real_ops(device)
        return convert, lambda *a: (calls.append(1), mm(*a))[1]

    monkeypatch.setattr(int4_linear, "_ops", counting_ops)
    prompt = prompt_batch(milton_ids, 2, 24)
    run = greedy_run(swapped, prompt, gen_len=3)
    assert len(calls) == 3 * 210  # every quantized Linear, every forward, through the kernel
    ref = greedy_run(model, prompt, gen_len=3)
    assert (run["ids"][:, 0] == ref["ids"][:, 0]).all()
    logits_int4 = swapped(prompt).logits.float()
    logits_deq = model(prompt).logits.float()
    # bf16 tolerance: SmolLM2's bf16 logits are themselves ~2.2e-2 (relative) from fp32 (tests/quant/test_int4_linear.py)
    assert ((logits_int4 - logits_deq).norm() / logits_deq.norm()).item() < 5e-2

    # KV int8 decode through QuantizedKVCache: the cache holds exactly the arithmetic's bytes
    r = measure(swapped, prompt, gen_len=3, warmup=0, repeats=1,
                cache_factory=lambda: QuantizedKVCache(model.config, bits=8))
    tokens = 24 + 3 - 1  # the last generated token is never fed back
    assert r["kv_cache_bytes"] == kv_memory(model.config, 8, tokens, 2)["bytes_at_context"]
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0


def test_batch_that_does_not_fit_fails_early(smollm2_resolved):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(smollm2_resolved.directory)
    check_fits(c, 1, 256, 16, "eval.throughput.batch_sizes")
    with pytest.raises(ConfigError, match="eval.throughput.batch_sizes: batch 100000"):
        check_fits(c, 100000, 4096, 16, "eval.throughput.batch_sizes")


def test_a_quantized_run_records_its_kernel_and_the_dense_speed_of_the_same_run(tmp_path):
    """`eval.throughput` on a W4A16 run: the kernel that ran is named, and the same model's dense (dequantized)
    weights are timed in the same run, so the record holds a ratio of two figures from one machine and one load."""
    from experiments import pipeline
    from tests.experiments.test_pipeline import SMALL, cfg_of

    tp = ["eval.throughput.enabled=true", "eval.throughput.batch_sizes=[1]", "eval.throughput.prompt_len=8",
          "eval.throughput.gen_len=3", "eval.throughput.warmup=0", "eval.throughput.repeats=1",
          "data.splits=[milton]", f"results_dir={tmp_path}"]
    rec = pipeline.run(cfg_of(SMALL + ["quant=rtn_w4", *tp]))
    t = rec["metrics"]["throughput"]
    assert t["kernel"] == "tinygemm" and t["int4_kernel_fallback"] is None and t["decode_loop"] == "eager"
    assert t["weight_bytes"]["n_w4a16_linears"] == 210
    base = t["dense_baseline"]["batch"]["1"]["decode_tok_s"]
    assert base > 0 and t["speedup_vs_dense"]["1"] == pytest.approx(t["batch"]["1"]["decode_tok_s"] / base)
    # the dequantized kernel is the dense model: nothing to compare it with
    rec = pipeline.run(cfg_of(SMALL + ["quant=rtn_w4", "eval.throughput.kernel=dequant", *tp]))
    t = rec["metrics"]["throughput"]
    assert t["kernel"] == "dequant" and "dequantized" in t["weights"] and "dense_baseline" not in t
    rec = pipeline.run(cfg_of(SMALL + ["quant=fp16", *tp]))  # unquantized: no kernel, no baseline
    assert "dense_baseline" not in rec["metrics"]["throughput"] and rec["metrics"]["throughput"]["kernel"] is None


def test_ppl_through_the_real_kernel_beside_the_simulation(tmp_path):
    """eval.kernel_quality: the same windows scored with the W4A16 weights in torch's int4 CPU kernel and in the
    fake-quantized simulation; the kernel's weights differ from the simulation's only by bf16 rounding of the scale and
    float zero, so the two PPLs agree closely but not exactly, and `dequant` (the simulation itself) agrees exactly."""
    from experiments import pipeline
    from tests.experiments.test_pipeline import SMALL, cfg_of

    base = SMALL + ["quant=rtn_w4", "data.splits=[milton]", "eval.kernel_quality.enabled=true", f"results_dir={tmp_path}"]
    rec = pipeline.run(cfg_of(base))
    kq = rec["metrics"]["kernel_quality"]
    sim = rec["metrics"]["perplexity"]["milton"]["token_ppl"]
    m = kq["splits"]["milton"]
    assert kq["kernel"] == "tinygemm" and not kq["exact_weights"] and m["simulated_token_ppl"] == sim
    assert 0 < abs(m["rel_diff"]) < 0.02 and kq["logits_rel_diff"] < 0.05
    assert m["rel_diff"] == pytest.approx(m["token_ppl"] / sim - 1)
    rec = pipeline.run(cfg_of(base + ["eval.kernel_quality.kernel=dequant"]))
    assert rec["metrics"]["kernel_quality"]["splits"]["milton"]["rel_diff"] == 0.0
    rec = pipeline.run(cfg_of(SMALL + ["quant=fp16", "data.splits=[milton]", "eval.kernel_quality.enabled=true",
                                       f"results_dir={tmp_path}"]))
    assert "kernel_quality" not in rec["metrics"]  # nothing quantized: nothing to compare
