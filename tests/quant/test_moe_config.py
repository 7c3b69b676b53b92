"""`quant.moe` (harness.config.MoEConfig) end to end: a field of every calibrated method's config, composed by Hydra,
validated before any work, in the run_id only when it differs from its defaults, refused on a dense model; and tiny
random Mixtral / Qwen3-MoE checkpoints (as transformers writes them, loaded fused and unfused by harness.models)
quantized through the pipeline by RTN, AWQ and GPTQ, an expert that its router never picks calibrated by the stated
fallback and named in the record."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.config import EXPERT_FALLBACKS, ConfigError, MoEConfig
from tests.experiments.test_pipeline import SMALL, cfg_of
from tests.quant.test_moe import tiny_moe

STARVED = 3  # the expert no router picks in the tiny checkpoints


def test_moe_config_composes_and_enters_the_run_id_only_off_its_defaults():
    from harness.labels import config_label
    from harness.records import run_id

    base = cfg_of(SMALL + ["quant=awq_w4"])
    assert base.quant.moe == MoEConfig()
    assert run_id(cfg_of(SMALL + ["quant=awq_w4", "quant.moe.min_share=0.1"])) == run_id(base)  # the default, said
    all_experts = cfg_of(SMALL + ["quant=awq_w4", "quant.moe.calibrate_all_experts=true"])
    no_fallback = cfg_of(SMALL + ["quant=gptq_w4", "quant.moe.min_share=0"])
    assert all_experts.quant.moe.calibrate_all_experts and no_fallback.quant.moe.min_share == 0
    assert len({run_id(base), run_id(all_experts), run_id(no_fallback), run_id(cfg_of(SMALL + ["quant=gptq_w4"]))}) == 4
    # a recipe's steps share it, as they share the calibration set
    recipe = cfg_of(SMALL + ["quant=recipe_awq_gptq_w4", "quant.moe.calibrate_all_experts=true"])
    assert all(s.moe.calibrate_all_experts for s in recipe.quant.step_configs())
    # and a report row says it, once, whenever it is off its defaults (two runs never share a row's name)
    assert config_label(base.quant) == "AWQ w4 g64 (search+clip)"
    assert config_label(all_experts.quant) == "AWQ w4 g64 (search+clip) [all experts]"
    assert config_label(no_fallback.quant) == "GPTQ w4 g64 [expert min share 0]"
    assert config_label(recipe.quant) == "AWQ→GPTQ w4 g64 (search+clip) [all experts]"
    for bad, field in (("quant.moe.min_share=1.5", r"quant\.moe\.min_share"),
                       ("quant.moe.fallback=rtn", r"quant\.moe\.fallback: 'rtn' — not one of all_tokens")):
        with pytest.raises(ConfigError, match=field):
            cfg_of(SMALL + ["quant=gptq_w4", bad])
    with pytest.raises(ConfigError, match=r"^quant\.moe: .* not a field of quant \(method rtn\)"):  # it calibrates nothing
        cfg_of(SMALL + ["quant=rtn_w4", "+quant.moe.min_share=0"])


def test_a_dense_model_refuses_moe_options_before_any_work():
    """Non-default quant.moe on a dense model would rename the run and change nothing: refused before the calibration
    tokens are drawn, the weights untouched; the defaults run and the record has no moe entry."""
    import transformers as tf

    from quant.gptq.config import GPTQConfig
    from quant.registry import METHODS, QuantContext

    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    before = copy.deepcopy(m.state_dict())

    def never():
        raise AssertionError("calibration drawn before the config was checked")

    cfg = GPTQConfig(group_size=16, moe=MoEConfig(calibrate_all_experts=True))
    with pytest.raises(ConfigError, match=r"^quant\.moe: calibrate_all_experts=True — the model \(llama\) has no "
                                          r"routed experts"):
        METHODS.get("gptq")(m, cfg, QuantContext(calibration=never, progress=False))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    samples = torch.randint(0, 128, (2, 16))
    out = METHODS.get("gptq")(m, GPTQConfig(group_size=16), QuantContext(calibration=lambda: samples, progress=False))
    assert "moe" not in out.summary and out.summary["layers_quantized"] == 7


def starve_by_weights(model, expert: int) -> None:
    """Make `expert` never chosen by any router, in the weights themselves (so a saved checkpoint keeps it): hidden
    channel 0 of the residual stream is a constant 10 (the embeddings' column; no attention or expert writes it), the
    post-attention norm passes it at gain 1, the router's row for `expert` reads it with weight -100 and no other row
    reads it (so the other experts' routing still varies with the token)."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 10.0
        for b in model.model.layers:
            b.self_attn.o_proj.weight[0] = 0
            ex = b.mlp.experts
            if hasattr(ex, "down_proj") and ex.down_proj.dim() == 3:  # fused [E, hidden, inter] (transformers 5)
                ex.down_proj[:, 0] = 0
            else:
                for e in ex:
                    e.down_proj.weight[0] = 0
            b.post_attention_layernorm.weight[0] = 1.0
            b.mlp.gate.weight[:, 0] = 0
            b.mlp.gate.weight[expert] = 0
            b.mlp.gate.weight[expert, 0] = -100.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """A tiny Mixtral and a tiny Qwen3-MoE with the embedded model's vocabulary (so the pipeline's text and
    calibration tokens fit), saved with its tokenizer as transformers 5 writes them."""
    out = {}
    for kind in ("mixtral", "qwen3_moe"):
        m = tiny_moe(kind, vocab_size=len(tokenizer))
        starve_by_weights(m, STARVED)
        d = tmp_path_factory.mktemp(kind)
        m.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[kind] = d
    return out


def test_the_checkpoints_load_fused_and_the_harness_unfuses_them(checkpoints):
    """transformers 5.24 builds these experts as fused 3-D tensors; harness.models.load_model gives per-expert
    Linears with the same logits, and the starved expert gets no token."""
    import transformers as tf

    from harness.config import ModelConfig
    from harness.models import load_model, resolve_model
    from harness.moe_unfuse import UnfusedExperts

    ids = torch.randint(0, 1000, (2, 24))
    for kind, d in checkpoints.items():
        fused = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        experts = fused.model.layers[0].mlp.experts
        assert not isinstance(experts, UnfusedExperts) and experts.down_proj.dim() == 3, kind
        mc = ModelConfig(name=kind, path=str(d), dtype="float32")
        model = load_model(resolve_model(mc), mc)
        assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
        seen = torch.zeros(4)
        hooks = [ex.register_forward_hook(lambda mod, a, o, e=e: seen.__setitem__(e, seen[e] + a[0].shape[0]))
                 for b in model.model.layers for e, ex in enumerate(b.mlp.experts)]
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, fused(ids).logits, rtol=1e-4, atol=1e-4)
        for h in hooks:
            h.remove()
        assert seen[STARVED] == 0 and seen.sum() == 2 * 2 * 24 * 2, (kind, seen)  # blocks x tokens x top-2


CASES = [("mixtral", "rtn_w4", []), ("mixtral", "awq_w4", []), ("qwen3_moe", "gptq_w4", []),
         ("qwen3_moe", "awq_w4", ["quant.moe.calibrate_all_experts=true"]),
         ("mixtral", "gptq_w4", ["quant.moe.min_share=0"])]


@pytest.mark.parametrize("kind,quant,extra", CASES, ids=[f"{k}-{q}{'-' + e[0].split('.')[-1] if e else ''}"
                                                          for k, q, e in CASES])
def test_tiny_moe_checkpoint_through_the_pipeline(checkpoints, tmp_path, kind, quant, extra):
    from experiments import pipeline

    calib = ["quant.calib.n_samples=4", "quant.calib.seqlen=32"] if quant != "rtn_w4" else []
    rec = pipeline.run(cfg_of(SMALL + [f"model.path={checkpoints[kind]}", "model.dtype=float32", f"quant={quant}", "quant.group_size=16",
                                       "eval.perplexity.max_windows=1", f"results_dir={tmp_path}"] + calib + extra))
    q, qcfg = rec["metrics"]["quant"], rec["config"]["quant"]
    moe = q["moe"]
    assert moe["experts"] == 4 and moe["kept_in_model_dtype"] == ["mlp.gate"]
    assert moe["expert_linears_quantized"] == moe["expert_linears"] == 2 * 4 * 3  # the starved expert's too
    assert q["layers_quantized"] == 2 * (4 + 4 * 3)
    assert rec["metrics"]["perplexity"]["milton"]["token_ppl"] > 1
    if quant == "rtn_w4":
        assert moe["calibration"] is None and "moe" not in qcfg
        return
    want = {"min_share": 0.1, "calibrate_all_experts": False, "fallback": "all_tokens"}
    for x in extra:  # quant.moe.<field>=<value>
        key, value = x.split("=")
        want[key.rsplit(".", 1)[1]] = {"true": True, "0": 0.0}[value]
    assert qcfg["moe"] == want
    cal = moe["calibration"]
    starved = [f"model.layers.{i}.mlp.experts.{STARVED}" for i in range(2)]
    assert all(b[STARVED] == 0 for b in cal["expert_tokens"]) and cal["expert_tokens_min"] == 0
    assert all(sum(b) == 4 * 32 * 2 for b in cal["expert_tokens"])
    assert {n: 0 for n in starved}.items() <= cal["experts_below_threshold"].items()  # named, with its 0 tokens
    assert cal["fallback"] == "all_tokens" and cal["fallback_means"] == EXPERT_FALLBACKS["all_tokens"]
    all_experts = bool(extra) and "calibrate_all_experts" in extra[0]
    assert cal["calibrate_all_experts"] is all_experts
    assert cal["experts_fallen_back"] == (2 * 4 if all_experts else len(cal["experts_below_threshold"]))
    if extra and "min_share" in extra[0]:  # no threshold: only the expert without tokens falls back
        assert cal["min_share"] == 0 and set(cal["experts_below_threshold"]) == set(starved)


def test_every_calibrated_method_has_quant_moe_and_smoothquant_still_refuses_an_moe():
    """The registry requires `moe` beside `calib` (quant.registry.method); SmoothQuant has it at its defaults only,
    and on a mixture of experts it refuses, as before, whatever the field says."""
    import dataclasses

    from harness.config import QUANT_CONFIGS
    from harness.moe_unfuse import unfuse_experts
    from quant.registry import METHODS, QuantContext
    from quant.smoothquant.config import SmoothQuantConfig

    calibrated = [n for n in METHODS if METHODS.get(n).needs_calibration]
    assert {"awq", "gptq", "awq_gptq", "smoothquant", "recipe", "autoround"} <= set(calibrated)
    for n in calibrated:
        moe = next(f for f in dataclasses.fields(QUANT_CONFIGS.get(n)) if f.name == "moe")
        assert moe.default_factory() == MoEConfig() and "moe" in QUANT_CONFIGS.get(n).late_fields, n
    model = tiny_moe("mixtral")
    unfuse_experts(model)
    samples = torch.randint(0, 128, (2, 16))
    with pytest.raises(NotImplementedError, match="SmoothQuant on a mixture of experts"):
        METHODS.get("smoothquant")(model, SmoothQuantConfig(), QuantContext(calibration=lambda: samples,
                                                                            progress=False))
