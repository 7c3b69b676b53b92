"""Per-layer overrides (quant.layer_overrides): an override changes exactly the Linears it names, to what plain RTN
gives them at the other bits / group size (and to a float64 recomputation); a skipped Linear keeps its weight and is
left out of the codes, the bytes and the export's packing; the record's summary says which layers got what."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harness.config import ConfigError, LayerOverride
from harness.storage_bytes import FP16_BYTES
from quant import METHODS, QuantContext
from quant.awq.config import AWQConfig
from quant.rtn import RTNConfig
from quant.surgery import plan_layers, quantizable_linears

DOWN = "*.mlp.down_proj"  # a glob: every block's down_proj
SKIP = r"re:model\.layers\.0\.self_attn\.[qk]_proj"  # a regex: two Linears of block 0
V1 = "model.layers.1.self_attn.v_proj"  # an exact name


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    hf = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(hf).float().eval()


def _rtn(model, **kw):
    return METHODS.get("rtn")(model, RTNConfig(**kw), QuantContext(calibration=None, progress=False))


def _fake_quant_f64(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """quant/primitives.py's asymmetric rule written out in float64 (llm-awq pseudo_quantize_tensor)."""
    w = w.double().reshape(w.shape[0], -1, g)
    mx, mn = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    scale = (mx - mn).clamp(min=1e-5) / (2**bits - 1)
    zero = (-torch.round(mn / scale)).clamp(0, 2**bits - 1)
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(w.shape[0], -1)


def test_an_override_changes_exactly_the_named_layers(tiny):
    overrides = [LayerOverride(DOWN, w_bit=8), LayerOverride(SKIP, skip=True), LayerOverride(V1, group_size=32)]
    orig = {n: lin.weight.detach().clone() for n, lin in quantizable_linears(tiny).items()}
    plain, w8, g32, mixed = (copy.deepcopy(tiny) for _ in range(4))
    _rtn(plain, w_bit=4, group_size=64)
    _rtn(w8, w_bit=8, group_size=64)
    _rtn(g32, w_bit=4, group_size=32)
    out = _rtn(mixed, w_bit=4, group_size=64, layer_overrides=overrides)

    got = {n: lin.weight.detach() for n, lin in quantizable_linears(mixed).items()}
    want = {"model.layers.0.mlp.down_proj": w8, "model.layers.1.mlp.down_proj": w8, V1: g32}
    skipped = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    for name, w in got.items():
        if name in skipped:
            assert torch.equal(w, orig[name]), name  # left as it was
            assert name not in out.qtensors
        else:
            ref = want.get(name, plain)
            assert torch.equal(w, ref.get_submodule(name).weight), name  # plain RTN at that layer's bits / group
    for name, bits, g in [("model.layers.0.mlp.down_proj", 8, 64), (V1, 4, 32), ("model.layers.1.mlp.up_proj", 4, 64)]:
        q = out.qtensors[name]
        assert (q.w_bit, q.group_size) == (bits, g)
        ref = _fake_quant_f64(orig[name], bits, g)
        step = (ref.max() - ref.min()) / (2**bits - 1)
        assert (got[name].double() - ref).abs().max() <= 1e-3 * step  # float32 vs float64: no rounding flip here

    s = out.summary
    assert s["layers_skipped"] == sorted(skipped)
    assert s["layer_overrides"] == {"model.layers.0.mlp.down_proj": {"w_bit": 8, "group_size": 64},
                                    "model.layers.1.mlp.down_proj": {"w_bit": 8, "group_size": 64},
                                    V1: {"w_bit": 4, "group_size": 32},
                                    **{n: {"skip": True} for n in skipped}}
    assert s["layers_quantized"] == len(orig) - 2
    # bytes: the skipped Linears count at 16 bits, exactly as the parameters nobody quantizes
    n_params = sum(p.numel() for p in mixed.parameters())
    q_bytes = sum(q.nbytes_packed() for q in out.qtensors.values())
    rest = (n_params - sum(orig[n].numel() for n in out.qtensors)) * FP16_BYTES
    assert s["weight_bytes"] == q_bytes + rest and s["unquantized_bytes"] == rest
    assert "layer_overrides" not in _rtn(copy.deepcopy(tiny)).summary  # a plain run's summary is as before


def test_an_override_that_matches_nothing_fails_before_any_work(tiny):
    with pytest.raises(ConfigError, match=r"quant\.layer_overrides\[0\]\.pattern: '\*\.mlp\.down' matches no"):
        plan_layers(tiny, RTNConfig(layer_overrides=[LayerOverride("*.mlp.down", w_bit=8)]))
    with pytest.raises(ValueError, match="group_size=48 does not divide"):  # the override's group size is checked too
        plan_layers(tiny, RTNConfig(layer_overrides=[LayerOverride(DOWN, group_size=48)]))
    plan = plan_layers(tiny, RTNConfig(group_fallback="per_channel", layer_overrides=[LayerOverride(DOWN, group_size=48)]))
    assert plan.fallbacks == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("override, message", [
    (LayerOverride("*.q_proj"), "sets none of w_bit, group_size, skip"),
    (LayerOverride("re:model.(", skip=True), "is not a regular expression"),
    (LayerOverride("*.q_proj", w_bit=9), r"layer_overrides\[0\]\.w_bit: must be in 2\.\.8"),
    (LayerOverride("*.q_proj", group_size=4), r"layer_overrides\[0\]\.group_size"),
])
def test_bad_overrides_fail_at_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        RTNConfig(layer_overrides=[override]).validate()


def test_awq_follows_the_per_layer_spec(tiny):
    """AWQ reads bits, group size and skip from the plan: the skipped Linear gets no codes, the overridden ones their
    bits; the first match decides (the skip of block 0's down_proj, before the w8 of every down_proj)."""
    cfg = AWQConfig(w_bit=4, group_size=32, search_samples=2, n_grid=3, clip_n_grid=3, clip_tokens=64,
                    layer_overrides=[LayerOverride("model.layers.0.mlp.down_proj", skip=True), LayerOverride(DOWN, w_bit=8)])
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    out = METHODS.get("awq")(tiny, cfg, QuantContext(calibration=lambda: calib, progress=False))
    assert "model.layers.0.mlp.down_proj" not in out.qtensors
    assert out.qtensors["model.layers.1.mlp.down_proj"].w_bit == 8
    assert {q.w_bit for n, q in out.qtensors.items() if not n.endswith("down_proj")} == {4}
    assert out.summary["layers_skipped"] == ["model.layers.0.mlp.down_proj"]
    assert out.summary["layers_quantized"] == len(quantizable_linears(tiny)) - 1


def test_export_leaves_a_skipped_layer_unpacked(tiny, tmp_path):
    from quant.export.awq import check_awq_config, export_awq

    cfg = RTNConfig(w_bit=4, group_size=32, layer_overrides=[LayerOverride(V1, skip=True)])
    check_awq_config(cfg, tiny)
    out = _rtn(tiny, w_bit=4, group_size=32, layer_overrides=cfg.layer_overrides)
    path = export_awq(tiny, out.qtensors, tmp_path / "ckpt")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert V1 in qcfg["modules_to_not_convert"]
    from safetensors.torch import load_file

    tensors = load_file(str(next(path.glob("*.safetensors"))))
    assert f"{V1}.weight" in tensors and f"{V1}.qweight" not in tensors
    with pytest.raises(Exception, match="4-bit only"):  # an override to other bits cannot be one AWQ checkpoint
        check_awq_config(RTNConfig(w_bit=4, group_size=32, layer_overrides=[LayerOverride(DOWN, w_bit=8)]), tiny)
