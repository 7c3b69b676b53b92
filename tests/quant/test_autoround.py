"""AutoRound (quant/autoround.py): one SignSGD step against a float64 step of the same loss written out here; no steps
give RTN's codes bit for bit; on real SmolLM2 blocks its output error on the calibration data is below RTN's and its
codes are the model's weights; it is a recipe's rounding step after AWQ; its backward pass is in the preflight."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import CalibConfig, ConfigError
from quant import METHODS, QuantContext
from quant.autoround import AutoRoundConfig, BlockTuner, signround_qdq
from quant.awq.config import AWQConfig
from quant.calibration.capture import capture_block_inputs, forward_block
from quant.recipe import RecipeConfig
from quant.rtn import RTNConfig
from quant.surgery import LayerSpec
from tests.quant.test_awq import _calib, _truncated


# ------------------------------------------------------------------------------------ one step, float64 reference


class ToyBlock(nn.Module):
    """A residual MLP block: x + down(silu(up(x)))."""

    def __init__(self, d=16, inner=32):
        super().__init__()
        self.up, self.down = nn.Linear(d, inner, bias=False), nn.Linear(inner, d)

    def forward(self, x):
        return x + self.down(F.silu(self.up(x)))


class RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def reference_qdq(w, v, alpha, beta, bits, group, zero_point):
    """SignRound's weight (paper eq. 1-2) written out per group, float64."""
    out, inn = w.shape
    wg, vg = w.reshape(out, inn // group, group), v.reshape(out, inn // group, group)
    lo, hi = wg.min(dim=-1).values * alpha, wg.max(dim=-1).values * beta
    if zero_point:
        top = 2**bits - 1
        s = ((hi - lo) / top)[..., None]
        z = torch.clamp(-RoundSTE.apply(lo[..., None] / s), 0, top)
        q = torch.clamp(RoundSTE.apply(wg / s + vg) + z, 0, top)
        return ((q - z) * s).reshape(out, inn)
    top = 2 ** (bits - 1) - 1
    s = (torch.maximum(-lo, hi) / top)[..., None]
    return (torch.clamp(RoundSTE.apply(wg / s + vg), -top - 1, top) * s).reshape(out, inn)


def test_one_signsgd_step_is_the_float64_reference_step():
    """Same V, alpha, beta (not at their init, so every term of the gradient is live) and the same minibatch: the
    implementation's loss and its updated parameters equal a plain float64 SignSGD step p <- clamp(p - lr sign(dL/dp))
    on L = mean (block(x; W~) - y)^2, for an asymmetric 3-bit and a symmetric 4-bit Linear."""
    torch.manual_seed(0)
    block = ToyBlock().double()
    specs = {"up": LayerSpec(3, 8, True), "down": LayerSpec(4, 16, False)}
    x = torch.randn(6, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y = block(x) + 0.01 * torch.randn(6, 5, 16, dtype=torch.float64)
    tuner = BlockTuner(block, specs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for rel in specs:
            tuner.v[rel].uniform_(-0.45, 0.45, generator=g)
            tuner.alpha[rel].uniform_(0.55, 1.0, generator=g)
            tuner.beta[rel].uniform_(0.55, 1.0, generator=g)
    start = tuner.state()
    for p in block.parameters():
        p.requires_grad_(False)
    lr, minmax_lr = 0.05, 0.02

    # the reference: the block written out with the SignRound weights, autograd in float64, the signed step by hand
    ref = {k: {r: t.clone().requires_grad_(True) for r, t in d.items()} for k, d in start.items()}
    w_up = reference_qdq(block.up.weight, ref["v"]["up"], ref["alpha"]["up"], ref["beta"]["up"], 3, 8, True)
    w_down = reference_qdq(block.down.weight, ref["v"]["down"], ref["alpha"]["down"], ref["beta"]["down"], 4, 16,
                           False)
    out = x + F.silu(x @ w_up.T) @ w_down.T + block.down.bias
    ref_loss = ((out - y) ** 2).mean()
    ref_loss.backward()
    expected = {k: {r: torch.clamp(t.detach() - rate * torch.sign(t.grad), lo, hi) for r, t in ref[k].items()}
                for k, rate, (lo, hi) in (("v", lr, (-0.5, 0.5)), ("alpha", minmax_lr, (0.5, 1.0)),
                                          ("beta", minmax_lr, (0.5, 1.0)))}

    with torch.enable_grad():
        loss = tuner.loss(x, y, {})
        loss.backward()
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-6, atol=0)  # the loss is returned in fp32
    tuner.step(lr, minmax_lr)
    got = tuner.state()
    for k in ("v", "alpha", "beta"):
        for rel in specs:
            assert torch.equal(got[k][rel], expected[k][rel]), (k, rel)
            moved = (got[k][rel] != start[k][rel]).float().mean().item()
            assert moved > 0.3, (k, rel, moved)  # the step changed most entries (zero gradients stay)


@pytest.mark.parametrize("zero_point", [True, False])
def test_at_init_signround_is_rtns_grid(zero_point):
    from quant.primitives import quantize_tensor

    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(24, 2)
    _, q, scales, zeros = signround_qdq(w, torch.zeros_like(w), ones, ones, 4, 64, zero_point, ste=False)
    rtn = quantize_tensor(w, 4, 64, zero_point)
    assert torch.equal(q.to(rtn.q.dtype), rtn.q) and torch.equal(scales, rtn.scales)
    assert (zeros is None and rtn.zeros is None) or torch.equal(zeros, rtn.zeros)


# --------------------------------------------------------------------------------------- real SmolLM2 blocks

CALIB = CalibConfig(n_samples=16, seqlen=128)


@pytest.mark.slow  # 40 SignSGD steps of 8 x 128 tokens through a real block: ~1.5 min on 2 busy cores
def test_autoround_beats_rtn_on_real_blocks_and_its_codes_are_the_weights(smollm2_fp32, calib_ids):
    """One real block of SmolLM2, w3 g64, 16 x 128 calibration tokens: AutoRound's block-output error on the
    calibration sequences is below RTN's (and below its own at no steps, which are RTN's codes bit for bit); the model
    holds exactly the dequantized codes, which are valid AWQ-layout codes."""
    base = _truncated(smollm2_fp32, 1)
    samples = _calib(calib_ids, 16, 128)
    ctx = QuantContext(lambda: samples, progress=False)
    block0 = lambda m: m.model.layers[0]  # noqa: E731
    x, kwargs = capture_block_inputs(base, _arch(base), samples)
    ref = forward_block(block0(base), x, kwargs[0]).double()
    errs, outs = {}, {}
    for name, cfg in {"rtn": RTNConfig(w_bit=3, group_size=64),
                      "autoround_0": AutoRoundConfig(w_bit=3, group_size=64, iters=0, calib=CALIB),
                      "autoround": AutoRoundConfig(w_bit=3, group_size=64, iters=40, calib=CALIB)}.items():
        m = copy.deepcopy(base)
        outs[name] = METHODS.get(cfg.method)(m, cfg, ctx)
        errs[name] = (forward_block(block0(m), x, kwargs[0]).double() - ref).pow(2).mean().item()
        for n, qt in outs[name].qtensors.items():
            torch.testing.assert_close(m.get_submodule(n).weight, qt.dequantize(), rtol=0, atol=0)
            assert qt.q.dtype == torch.uint8 and int(qt.q.max()) <= 7 and qt.group_size == 64
            assert torch.equal(qt.zeros, qt.zeros.round()) and 0 <= qt.zeros.min() and qt.zeros.max() <= 7
            assert (qt.scales > 0).all()
    assert len(outs["autoround"].qtensors) == 7 and outs["autoround"].summary["layers_quantized"] == 7
    for n, qt in outs["rtn"].qtensors.items():
        assert torch.equal(outs["autoround_0"].qtensors[n].q, qt.q), n
    info = outs["autoround"].summary["autoround_loss"]["model.layers.0"]
    assert info["loss_best"] <= info["loss_init"] and 0 <= info["best_iter"] < 40
    assert outs["autoround"].summary["lr"] == 1 / 40 and outs["autoround"].summary["iters"] == 40
    assert errs["autoround"] < 0.8 * errs["rtn"], errs


def _arch(model):
    from harness.architectures import architecture_for

    return architecture_for(model)


def test_autoround_is_a_recipes_rounding_step_after_awq(smollm2_fp32, calib_ids):
    """awq -> autoround (AutoRound 0.16's `awq -> signround`): with no steps its codes are AWQ's own (AWQ rounds to
    nearest, as AutoRound does at its init), bit for bit; the recipe is written in AWQ's format."""
    base = _truncated(smollm2_fp32, 2)
    samples = _calib(calib_ids, 8, 64)
    ctx = QuantContext(lambda: samples, progress=False)
    calib = CalibConfig(n_samples=8, seqlen=64)
    knobs = dict(search_samples=2, n_grid=4, clip_n_grid=4, clip_tokens=256)
    ref = METHODS.get("awq")(copy.deepcopy(base), AWQConfig(w_bit=4, group_size=64, calib=calib, **knobs), ctx)
    cfg = RecipeConfig(w_bit=4, group_size=64, calib=calib,
                       steps=[{"method": "awq", **knobs}, {"method": "autoround", "iters": 0}])
    m = copy.deepcopy(base)
    out = METHODS.get("recipe")(m, cfg, ctx)
    assert out.qtensors.keys() == ref.qtensors.keys() and len(out.qtensors) == 14
    for n, qt in out.qtensors.items():
        assert torch.equal(qt.q, ref.qtensors[n].q) and torch.equal(qt.scales, ref.qtensors[n].scales), n
        torch.testing.assert_close(m.get_submodule(n).weight, qt.dequantize(), rtol=0, atol=0)
    assert [s["method"] for s in out.summary["steps"]] == ["awq", "autoround"]
    assert METHODS.get("recipe").export_formats(cfg) == ("awq", "compressed-tensors")
    # with steps, SignRound tunes every block of the AWQ-scaled model; the model still holds exactly its codes
    tuned = dataclasses.replace(cfg, steps=[{"method": "awq", **knobs}, {"method": "autoround", "iters": 3}])
    m = copy.deepcopy(base)
    out = METHODS.get("recipe")(m, tuned, ctx)
    losses = out.summary["steps"][1]["autoround_loss"]
    assert len(losses) == 2 and all(v["loss_init"] > 0 and v["loss_best"] <= v["loss_init"] for v in losses.values())
    for n, qt in out.qtensors.items():
        torch.testing.assert_close(m.get_submodule(n).weight, qt.dequantize(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- config, preflight


def test_presets_compose_and_bad_values_fail_by_name():
    from harness.compose import compose
    from harness.labels import config_label

    cfg = compose(["quant=autoround_w4"])
    assert isinstance(cfg.quant, AutoRoundConfig) and cfg.quant.iters == 200 and cfg.quant.round_lr == 1 / 200
    assert (cfg.quant.w_bit, cfg.quant.group_size, cfg.quant.calib.n_samples, cfg.quant.calib.seqlen) == (4, 64, 128,
                                                                                                          512)
    assert compose(["quant=autoround_w3"]).quant.w_bit == 3
    assert config_label(dataclasses.asdict(compose(["quant=autoround_w4", "quant.iters=50"]).quant)).endswith(
        "(50 iters)")
    rec = compose(["quant=recipe", "quant.steps=[{method: awq}, {method: autoround, iters: 50}]"])
    assert [type(c).__name__ for c in rec.quant.step_configs()] == ["AWQConfig", "AutoRoundConfig"]
    for field, value in (("iters", -1), ("lr", 0.0), ("batch_size", 0), ("batch_size", 17), ("propagate", "x"),
                         ("format", "nvfp4")):
        with pytest.raises(ConfigError, match=f"quant.{field}"):
            AutoRoundConfig(**{field: value}).validate()


def test_the_calibration_preflight_counts_the_backward_pass(smollm2_resolved, monkeypatch):
    """AutoRound's autograd memory is added to the runner's activations before the model loads (a recipe counts its
    hungriest step); a budget that fits AWQ's calibration is refused for AutoRound, naming its backward pass."""
    from transformers import AutoConfig

    from eval import memory

    hf = AutoConfig.from_pretrained(smollm2_resolved.directory)
    ar = AutoRoundConfig(calib=CalibConfig(n_samples=128, seqlen=512))
    extra = METHODS.get("autoround").extra_calibration_bytes(hf, ar, 2)
    assert METHODS.get("awq").extra_calibration_bytes(hf, AWQConfig(), 2) == 0
    rec = RecipeConfig(steps=[{"method": "awq"}, {"method": "autoround"}], calib=ar.calib)
    assert METHODS.get("recipe").extra_calibration_bytes(hf, rec, 2) == extra
    # a minibatch of 8 x 512 tokens through one block, fwd + bwd: hundreds of MB at SmolLM2's size
    assert 100 * 2**20 < extra < 4 * 2**30
    runner = memory.calibration_bytes(hf, 128, 512, 2)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": int((runner + extra / 2) / 0.9))
    memory.check_calibration_fits(hf, ar.calib, "cpu", 2)
    with pytest.raises(ConfigError, match="backward pass"):
        memory.check_calibration_fits(hf, ar.calib, "cpu", 2, extra)
