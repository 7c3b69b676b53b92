"""Calibration of routed experts in the shared runner (quant.moe.coverage): each expert's statistics come from its
routed tokens (float64 reference), `calibrate_all_experts` gives every expert every token while the block's output
stays routed, an expert with no tokens gets the stated fallback and the record says so; RTN and GPTQ quantize a tiny
Mixtral and Qwen3-MoE end to end, every expert Linear included."""
from __future__ import annotations

import pytest
import torch

from harness.architectures import architecture_for
from harness.moe_unfuse import unfuse_experts
from quant.calibration.runner import BlockResult, run_sequential
from harness.config import EXPERT_FALLBACKS, MoEConfig
from quant.moe.coverage import expert_summary
from tests.quant.test_moe import tiny_moe


class Gram:
    """Keeps sum x x^T in float64 and the token count of one Linear's input."""

    def __init__(self):
        self.g, self.n = None, 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).double()
        self.g = x.T @ x if self.g is None else self.g + x.T @ x
        self.n += x.shape[0]

    def result(self, reduce):
        return self


class Observe:
    """A BlockMethod that observes every expert's gate_proj input and changes nothing."""

    def __init__(self, arch):
        self.arch, self.seen = arch, {}

    def observers(self, block, index):
        return {f"{self.arch.moe.experts}.{e}.gate_proj": Gram() for e in range(self.arch.moe.n_experts)}

    def quantize_block(self, block, index, stats, kwargs, reduce):
        self.seen[index] = stats
        return BlockResult({})


def _moe_inputs_and_routing(model, samples, index):
    """Float64 reference: the MoE input of block `index` for every token, and the experts each token is routed to."""
    block = model.model.layers[index]
    keep = {}

    def hook(module, args):
        keep["x"] = args[0].reshape(-1, args[0].shape[-1])

    h = block.mlp.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(samples)
    h.remove()
    x = keep["x"]
    _, _, idx = block.mlp.gate(x)
    return x.double(), idx


@pytest.mark.parametrize("all_experts", [False, True])
def test_expert_statistics_routed_or_all_tokens_against_float64(all_experts):
    model = tiny_moe("mixtral")
    unfuse_experts(model)
    model.model.layers = model.model.layers[:1]  # one block: its inputs are the embeddings, the same in both runs
    arch = architecture_for(model)
    samples = torch.randint(0, 128, (3, 24))
    x, idx = _moe_inputs_and_routing(model, samples, 0)
    ref_out = model(samples).logits
    method = Observe(arch)
    run_sequential(model, arch, method, samples, progress=False,
                   experts=MoEConfig(min_share=0.0, calibrate_all_experts=all_experts))
    torch.testing.assert_close(model(samples).logits, ref_out)  # observing changes nothing
    for e in range(4):
        st = method.seen[0][f"mlp.experts.{e}.gate_proj"]
        xe = x if all_experts else x[(idx == e).any(-1)]
        assert st.n == xe.shape[0]
        torch.testing.assert_close(st.g, xe.T @ xe, rtol=1e-5, atol=1e-5)
    cov = model.model.layers[0].mlp.experts.calibration_coverage
    assert sum(cov["tokens"]) == 3 * 24 * 2 and cov["tokens"] == [int((idx == e).sum()) for e in range(4)]
    assert cov["all_tokens"] == ([0, 1, 2, 3] if all_experts else [])


def starve(model, expert: int) -> None:
    """Route no token to `expert` in any block: its router logit pushed far below the others (the routers of the tiny
    models renormalise the top-k weights, as Mixtral's do)."""
    for b in model.model.layers:
        router = b.mlp.gate

        def forward(h, router=router):
            logits = torch.nn.functional.linear(h.reshape(-1, router.hidden_dim), router.weight)
            logits[:, expert] = -1e4
            top, idx = torch.topk(logits.float().softmax(-1), router.top_k, dim=-1)
            return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), idx

        router.forward = forward


def test_expert_without_tokens_gets_the_stated_fallback():
    model = tiny_moe("mixtral")
    unfuse_experts(model)
    arch = architecture_for(model)
    samples = torch.randint(0, 128, (2, 16))
    starve(model, 3)
    x0, idx0 = _moe_inputs_and_routing(model, samples, 0)  # float64 reference of block 0 (its input: the embeddings)
    assert not (idx0 == 3).any()
    method = Observe(arch)
    run_sequential(model, arch, method, samples, progress=False)
    # the fallback's statistics are those of every token entering the MoE, the others' those of their routed tokens
    torch.testing.assert_close(method.seen[0]["mlp.experts.3.gate_proj"].g, x0.T @ x0, rtol=1e-5, atol=1e-5)
    x1 = x0[(idx0 == 1).any(-1)]
    torch.testing.assert_close(method.seen[0]["mlp.experts.1.gate_proj"].g, x1.T @ x1, rtol=1e-5, atol=1e-5)
    for i in range(2):
        cov = model.model.layers[i].mlp.experts.calibration_coverage
        assert cov["tokens"][3] == 0 and cov["below"] == [3] == cov["all_tokens"]
        assert method.seen[i]["mlp.experts.3.gate_proj"].n == 2 * 16  # the fallback saw every token of the block
        assert method.seen[i]["mlp.experts.0.gate_proj"].n == cov["tokens"][0]  # the others: their routed ones
    rec = expert_summary(model, arch, {})["moe"]["calibration"]
    assert rec["expert_tokens_min"] == min(t for b in rec["expert_tokens"] for t in b)
    assert rec["experts_below_threshold"] and rec["fallback"] == "all_tokens" and rec["fallback_means"] == EXPERT_FALLBACKS["all_tokens"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method_name", ["rtn", "gptq", "awq"])
def test_tiny_moe_quantizes_end_to_end(kind, method_name):
    from harness.config import QUANT_CONFIGS
    from quant.registry import METHODS, QuantContext

    model = tiny_moe(kind)
    unfuse_experts(model)
    starve(model, 3)  # expert 3 of every block gets no token: the fallback must still quantize it
    arch = architecture_for(model)
    cfg = QUANT_CONFIGS.get(method_name)(group_size=16)
    if method_name != "rtn":
        cfg.calib.n_samples, cfg.calib.seqlen = 4, 16
    samples = torch.randint(0, 128, (4, 16))
    out = METHODS.get(method_name)(model, cfg, QuantContext(calibration=lambda: samples, progress=False))
    experts = [n for n in arch.linears if ".experts." in n]
    names = {f"model.layers.{i}.{n}" for i in range(2) for n in experts}
    assert names <= set(out.qtensors)  # every expert Linear quantized, the starved one included
    assert not any(n.endswith("mlp.gate") for n in out.qtensors)  # the router is not
    moe = out.summary["moe"]
    assert moe["experts"] == 4 and moe["expert_linears_quantized"] == moe["expert_linears"] == 2 * 4 * 3
    for name in names:  # the weights are their codes' dequantized image
        w = model.get_submodule(name).weight
        torch.testing.assert_close(out.qtensors[name].dequantize(w.dtype), w)
    if method_name != "rtn":
        cal = moe["calibration"]
        assert cal["expert_tokens_min"] == 0 and "model.layers.0.mlp.experts.3" in cal["experts_below_threshold"]
        assert cal["fallback"] == "all_tokens"
    else:
        assert moe["calibration"] is None


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_awq_scales_every_expert_from_the_norm_and_keeps_outputs(kind):
    """AWQ's MoE group: one scale searched on the MoE block's output over all tokens, folded into the post-attention
    norm and every expert's gate/up (and the shared expert's), the router's columns scaled too: without rounding and
    clipping the model's outputs are unchanged, and the experts' weights did change."""
    from harness.config import QUANT_CONFIGS
    from quant.registry import METHODS, QuantContext

    model = tiny_moe(kind)
    unfuse_experts(model)
    arch = architecture_for(model)
    grp = next(g for g in arch.groups if g.input == "mlp")
    assert grp.prev_op == "post_attention_layernorm" and "mlp.gate" in grp.also_scaled
    assert {"mlp.experts.0.gate_proj", "mlp.experts.3.up_proj"} <= set(grp.linears)
    samples = torch.randint(0, 128, (4, 16))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    w0 = model.model.layers[0].mlp.experts[1].gate_proj.weight.clone()
    router0 = model.model.layers[0].mlp.gate.weight.clone()
    cfg = QUANT_CONFIGS.get("awq")(group_size=16, round_weights=False, clip=False)
    cfg.calib.n_samples, cfg.calib.seqlen = 4, 16
    out = METHODS.get("awq")(model, cfg, QuantContext(calibration=lambda: samples, progress=False))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].mlp.experts[1].gate_proj.weight, w0)
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, router0)  # the router follows the scale
    assert out.summary["moe"]["calibration"]["expert_tokens_min"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["rtn_w4", "gptq_w4"])
def test_upcycled_moe_through_the_pipeline(tmp_path, quant):
    """python -m experiments.run model=smollm2_135m_moe4 quant=<quant> at toy sizes: every expert Linear of the 30
    blocks quantized, the router kept, and (GPTQ) the per-expert token counts and the fallback in the record."""
    from experiments import pipeline
    from tests.experiments.test_pipeline import SMALL, cfg_of

    calib = ["quant.calib.n_samples=4", "quant.calib.seqlen=64"] if quant != "rtn_w4" else []
    rec = pipeline.run(cfg_of(SMALL + ["model=smollm2_135m_moe4", f"quant={quant}", "eval.perplexity.max_windows=1",
                                       f"results_dir={tmp_path}"] + calib))
    assert "built here, not a released model" in rec["provenance"]["model_origin"]
    q = rec["metrics"]["quant"]
    moe = q["moe"]
    assert moe["experts"] == 4 and moe["top_k"] == 2 and moe["kept_in_model_dtype"] == ["mlp.gate"]
    assert moe["expert_linears_quantized"] == moe["expert_linears"] == 30 * 4 * 3
    assert q["layers_quantized"] == 30 * (4 + 4 * 3)
    if quant == "rtn_w4":
        assert moe["calibration"] is None
        return
    cal = moe["calibration"]
    assert len(cal["expert_tokens"]) == 30 and all(sum(b) == 4 * 64 * 2 for b in cal["expert_tokens"])
    assert cal["expert_tokens_min"] <= cal["expert_tokens_median"]
    assert isinstance(cal["experts_below_threshold"], dict) and "fallback" in cal and cal["min_share"] == 0.1
    assert all(n in cal["experts_below_threshold"] for n in [f"model.layers.{i}.mlp.experts.{e}"
               for i, b in enumerate(cal["expert_tokens"]) for e, t in enumerate(b) if t < cal["threshold_tokens"][i]])
