"""Hadamard rotation (quant/rotation/): the orthogonal matrices exact in float64; the rotated FP model's logits equal the
original's (before any rounding) on a tiny Llama and Gemma, on SmolLM2 (Llama) and on Gemma-3-270M (no residual
rotation there: its sandwich norms); rotation -> RTN / GPTQ through the pipeline write a record; export, the
quantized-weight cache and a step that folds scales after the online Hadamard are refused, and a W4A16 kernel swap
keeps the online Hadamard."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.architectures import ARCHITECTURES
from harness.config import ConfigError
from quant import METHODS, QuantContext
from quant.recipe import RecipeConfig
from quant.rotation.hadamard import F64, hadamard_factors, kron_apply, paley, seeded_rotation, sylvester
from quant.rotation.method import RotationConfig

NO_CALIB = QuantContext(calibration=None, progress=False)


def _rotate(model, **kw):
    return METHODS.get("rotation")(model, RotationConfig(**kw), NO_CALIB)


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 44, 64, 256])
def test_hadamard_factors_are_hadamard_matrices(n):
    (h,) = hadamard_factors(n)  # each of these orders is one Sylvester or one Paley matrix
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=F64))


@pytest.mark.parametrize("n, kind", [(576, "hadamard 36x16"), (1536, "hadamard 12x128"), (640, "hadamard 20x32"),
                                     (2048, "hadamard 2048"), (64, "hadamard 64"), (6, "random orthogonal 6 (QR)"),
                                     (18, "random orthogonal 18 (QR)")])
def test_seeded_rotations_are_orthogonal_and_apply_as_their_matrix(n, kind):
    """SmolLM2's 576 / 1536 and Gemma-3's 640 by Kronecker products of a Paley and a Sylvester matrix; no Hadamard of
    order 2 * odd exists (a QR fallback)."""
    rot = seeded_rotation(n, seed=0)
    assert rot.kind == kind
    q = rot.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=F64), atol=1e-13, rtol=0)
    x = torch.randn(3, 5, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rot.apply(x), x @ q, atol=1e-12, rtol=0)
    assert torch.equal(seeded_rotation(n, 0).matrix(), q) and not torch.equal(seeded_rotation(n, 1).matrix(), q)


def test_kron_apply_is_the_kronecker_product_and_paley_refuses_other_orders():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(3, 3, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64),
          torch.randn(2, 2, generator=g, dtype=F64)]
    x = torch.randn(7, 24, generator=g, dtype=F64)
    assert torch.allclose(kron_apply(x, fs), x @ torch.kron(torch.kron(fs[0], fs[1]), fs[2]), atol=1e-12)
    with pytest.raises(ValueError):
        paley(16)  # 15 is not prime and 7 is 3 mod 4
    with pytest.raises(ValueError):
        sylvester(12)


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                               tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("model_type, extra", [("llama", {"attention_bias": True, "mlp_bias": True}), ("gemma", {})],
                         ids=["llama+bias", "gemma"])
@pytest.mark.parametrize("kw", [{}, {"heads": False, "online": False}, {"residual": "off"}], ids=["all", "R1", "R2+R4"])
def test_rotation_leaves_a_tiny_models_logits_unchanged(model_type, extra, kw):
    """float64 weights (the norms compute in float32 in transformers: the tolerance is float32's)."""
    model = _tiny(model_type, **extra)
    ref = model(IDS).logits
    out = _rotate(model, **kw)
    assert torch.allclose(model(IDS).logits, ref, atol=1e-5 * ref.abs().max(), rtol=0)
    s = out.summary
    assert s["untied_lm_head"] == (kw.get("residual") != "off")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (not s["untied_lm_head"])
    assert s["needs_online_rotation"] == kw.get("online", True) and s["layers_quantized"] == 0
    if kw == {}:
        assert s["residual"] == "hadamard 12x4" and s["heads"] == "hadamard 12"
        assert s["online_rotations"] == [{"linears": "model.layers.*.mlp.down_proj", "rotation": "hadamard 12x8"}]
        assert not model.config.tie_word_embeddings
        # the rotation did change every weight it names (not a no-op that passes the comparison)
        assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, _tiny(model_type, **extra)
                                  .model.layers[0].mlp.down_proj.weight)


@torch.no_grad()
def test_smollm2_logits_unchanged_by_the_full_rotation(smollm2_fp32):
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1345, 28, 2840, 30, 441, 1230, 314, 253, 2124]])
    ref = smollm2_fp32(ids).logits
    out = _rotate(smollm2_fp32)
    new = smollm2_fp32(ids).logits
    assert out.summary["residual"] == "hadamard 36x16" and out.summary["untied_lm_head"]
    assert out.summary["online_rotations"][0]["rotation"] == "hadamard 12x128"
    assert (new - ref).abs().max() < 2e-3 * ref.abs().max(), (new - ref).abs().max()
    assert torch.equal(new.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@torch.no_grad()
def test_gemma3_270m_logits_unchanged_and_its_residual_refused():
    """Gemma-3's sandwich norms: `residual: auto` keeps to R2 + R4 (the record says why), `residual: on` is refused."""
    from harness.config import ModelConfig
    from harness.models import load_model, resolve_model

    mc = ModelConfig(name="gemma-3-270m", path="embedded:gemma-3-270m", dtype="float32")
    model = load_model(resolve_model(mc), mc)
    model.model.layers = model.model.layers[:6]  # a sliding block and the first global one: enough, and faster
    model.config.num_hidden_layers = 6
    ids = torch.tensor([[2, 4088, 34557, 5315, 3725, 118644, 236764, 532, 506, 44832]])
    ref = model(ids).logits
    with pytest.raises(ConfigError, match="sandwich norms"):
        _rotate(model, residual="on")
    out = _rotate(model)
    new = model(ids).logits
    assert out.summary["residual"] is None and "sandwich" in out.summary["residual_inexact"]
    assert out.summary["heads"] == "hadamard 256" and out.summary["online_rotations"][0]["rotation"] == "hadamard 2048"
    assert (new - ref).abs().max() < 2e-3 * ref.abs().max(), (new - ref).abs().max()


def test_the_rotation_files_are_its_code_version():
    from quant.registry import method_sources

    rot = {"quant/rotation/hadamard.py", "quant/rotation/surgery.py", "quant/rotation/method.py",
           "harness/architectures.py"}
    assert rot <= set(method_sources("rotation"))
    assert rot <= set(method_sources(RecipeConfig(steps=[{"method": "rotation"}, {"method": "gptq"}])))
    assert not rot & set(method_sources(RecipeConfig(steps=[{"method": "gptq"}]))) - {"harness/architectures.py"}


def test_an_architecture_without_rotation_points_is_refused():
    assert ARCHITECTURES.get("internlm2").rotation is None and ARCHITECTURES.get("mixtral").rotation is None
    assert ARCHITECTURES.get("gemma3_text").rotation.residual_inexact and not ARCHITECTURES.get("qwen2").rotation.residual_inexact
    model = _tiny("mixtral", num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(ConfigError, match="no rotation points"):
        _rotate(model)


def _recipe(last: str, last_knobs: dict | None = None, **rot) -> RecipeConfig:
    from harness.config import CalibConfig

    return RecipeConfig(w_bit=4, group_size=16, calib=CalibConfig(n_samples=4, seqlen=16),
                        steps=[{"method": "rotation", **rot}, {"method": last, **(last_knobs or {})}])


def test_export_cache_and_scale_folding_after_an_online_rotation_are_refused():
    from quant.export import format_for

    with pytest.raises(ConfigError, match="no checkpoint format"):
        format_for(_recipe("gptq"))
    assert format_for(_recipe("gptq", online=False)).name == "awq"  # every rotation in the weights
    assert not METHODS.get("recipe").caches(_recipe("rtn", online=False))  # the untied head: not a fresh model's
    assert METHODS.get("recipe").caches(RecipeConfig(steps=[{"method": "rtn"}]))
    with pytest.raises(ConfigError, match=r"quant.steps\[0\] \(rotation\): awq after a rotation"):
        RecipeConfig(steps=[{"method": "rotation"}, {"method": "awq"}]).validate()
    RecipeConfig(steps=[{"method": "awq"}, {"method": "rotation"}, {"method": "gptq"}]).validate()  # AWQ first: exact
    RecipeConfig(steps=[{"method": "rotation", "online": False}, {"method": "awq"}]).validate()
    with pytest.raises(ConfigError, match="quant.residual"):
        RecipeConfig(steps=[{"method": "rotation", "residual": "yes"}, {"method": "rtn"}]).validate()


@torch.no_grad()
@pytest.mark.parametrize("last, knobs", [("rtn", {}), ("gptq", {}), ("autoround", {"iters": 3, "batch_size": 2})],
                         ids=["rtn", "gptq", "autoround"])
def test_rotation_then_rounding_quantizes_the_rotated_weights(last, knobs):
    """The rounding step rounds the rotated weights (down_proj's with the online Hadamard absorbed; GPTQ's Hessian
    from its rotated input): every Linear holds its codes' dequantization, the online Hadamard stays in place, and
    the logits stay near the FP model's."""
    model = _tiny("llama")
    ref = model(IDS).logits
    samples = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    out = METHODS.get("recipe")(model, _recipe(last, knobs), QuantContext(lambda: samples, progress=False))
    assert [s["method"] for s in out.summary["steps"]] == ["rotation", last] and len(out.qtensors) == 14
    assert out.summary["steps"][0]["needs_online_rotation"]
    for name, qt in out.qtensors.items():
        assert torch.equal(qt.dequantize(F64), model.get_submodule(name).weight), name
    assert model.model.layers[1].mlp.down_proj._forward_pre_hooks  # still rotating its input online
    err = (model(IDS).logits - ref).abs().mean() / ref.abs().mean()
    assert 0 < err < 0.5, err


@torch.no_grad()
def test_a_w4a16_kernel_swap_keeps_the_online_rotation():
    from quant.kernels.w4a16 import swap_w4a16_linears

    model = _tiny("llama").float()
    _rotate(model)
    out = METHODS.get("rtn")(model, _rtn_cfg(), NO_CALIB)
    ref = model(IDS).logits
    swapped = copy.deepcopy(model)
    swap_w4a16_linears(swapped, out.qtensors, "dequant")
    assert swapped.model.layers[0].mlp.down_proj is not model.model.layers[0].mlp.down_proj
    assert torch.allclose(swapped(IDS).logits, ref, atol=1e-5, rtol=0)


def _rtn_cfg():
    from quant.rtn import RTNConfig

    return RTNConfig(w_bit=4, group_size=16)


@pytest.mark.parametrize("preset", ["rotation_rtn_w4", "rotation_gptq_w3"])
def test_rotation_presets_run_end_to_end_and_write_a_record(tmp_path, smollm2_resolved, preset):
    """Through the Hydra entry point on a tiny checkpoint: one record whose quant summary names the rotation, with a
    token PPL from the fake-quantized model with the online Hadamard in place; export refused at its preflight."""
    from experiments import pipeline
    from tests.experiments.test_pipeline import SMALL, cfg_of
    from tests.experiments.tiny import tiny_checkpoint

    d = tiny_checkpoint(tmp_path / "tiny", smollm2_resolved.directory)
    cfg = cfg_of(SMALL + [f"quant={preset}", "quant.group_size=32", "quant.calib.n_samples=4",
                          "quant.calib.seqlen=32", "data.splits=[milton]", "eval=ppl", f"model.path={d}",
                          "model.dtype=float32", f"results_dir={tmp_path / 'results'}"])
    rec = pipeline.run(cfg)
    q = rec["metrics"]["quant"]
    assert [s["method"] for s in q["steps"]] == ["rotation", preset.split("_")[1]]
    assert q["steps"][0]["needs_online_rotation"] and q["steps"][0]["untied_lm_head"]
    assert q["layers_quantized"] == 14 and "cache_key" not in q  # not cached: a fresh model lacks the hook
    assert 0 < rec["metrics"]["perplexity"]["milton"]["token_ppl"] < float("inf")
    assert rec["status"] == "complete" and list((tmp_path / "results").rglob(f"{rec['run_id']}.json"))


@torch.no_grad()
def test_without_online_rotation_the_awq_checkpoint_gives_the_rotated_models_logits(tmp_path):
    """online: false puts every rotation in the weights (the LM head untied, config.tie_word_embeddings false): the
    exported AWQ checkpoint, read back by transformers, computes the harness's logits. With the online Hadamard the
    same checkpoint would not (which is why that run has no export format)."""
    from quant.export.awq import export_awq, load_awq_dequantized

    logits = {}
    for online in (False, True):
        model = _tiny("llama").float()
        samples = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
        out = METHODS.get("recipe")(model, _recipe("rtn", online=online), QuantContext(lambda: samples, progress=False))
        ours = model(IDS).logits
        export_awq(model, out.qtensors, tmp_path / str(online))
        back = load_awq_dequantized(tmp_path / str(online)).eval()
        assert not back.config.tie_word_embeddings
        logits[online] = (ours, back(IDS).logits)
    ours, theirs = logits[False]
    assert torch.allclose(theirs, ours, atol=2e-3 * ours.abs().max(), rtol=0)
    ours, theirs = logits[True]
    assert not torch.allclose(theirs, ours, atol=0.05 * ours.abs().max(), rtol=0)
