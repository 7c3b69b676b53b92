"""Mixtures of experts (issue 26): the layer maps (harness.architectures), the fused experts made Linears
(harness.moe_unfuse: same outputs), and the upcycled SmolLM2 (harness.moe_upcycle): near SmolLM2's quality, uneven
routing."""
from __future__ import annotations

import pytest
import torch

from harness.architectures import ARCHITECTURES, architecture_for, parameter_count
from harness.moe_unfuse import UnfusedExperts, unfuse_experts
from quant.surgery import quantizable_linears

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, num_experts_per_tok=2, eos_token_id=1, bos_token_id=0, pad_token_id=None)


def tiny_moe(kind: str, n_experts: int = 4, seed: int = 0, **config):
    """A tiny random model of each MoE layout transformers 5 builds (fused 3-D expert tensors); `config` overrides
    TINY's fields (vocab_size)."""
    import transformers as tf

    cfgs = {"mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=n_experts)),
            "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                          dict(num_experts=n_experts, moe_intermediate_size=48, norm_topk_prob=True)),
            "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                          dict(num_experts=n_experts, moe_intermediate_size=48, shared_expert_intermediate_size=80)),
            "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=n_experts))}
    C, M, extra = cfgs[kind]
    torch.manual_seed(seed)
    m = M(C(**{**TINY, **extra, **config})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


KINDS = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")


@pytest.mark.parametrize("kind", KINDS)
def test_layer_map_names_experts_router_and_shared_expert(kind):
    m = tiny_moe(kind)
    arch = architecture_for(m)
    assert arch.moe.n_experts == 4 and arch.moe.top_k == 2
    experts = [n for n in arch.linears if ".experts." in n]
    assert len(experts) == 4 * 3 and experts[:3] == ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj",
                                                     "mlp.experts.0.down_proj"]
    assert "mlp.gate" in arch.moe.kept() and "mlp.gate" not in arch.linears  # the router stays in the model dtype
    if kind == "qwen2_moe":
        assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj"} <= set(arch.linears)
        assert "mlp.shared_expert_gate" in arch.moe.kept() and "mlp.shared_expert_gate" not in arch.linears
    # each expert's gate/up share one input (observed once), never another expert's
    keys = arch.input_keys()
    assert keys["mlp.experts.2.up_proj"] == "mlp.experts.2.gate_proj"
    assert keys["mlp.experts.2.down_proj"] == "mlp.experts.2.down_proj"
    # the checkpoint's tensors from config.json alone: the same Linears as the loaded, unfused model
    specs = arch.tensors(m.config.to_dict())
    unfuse_experts(m)
    assert {t.name for t in specs if t.kind == "linear"} == set(quantizable_linears(m))
    for t in specs:
        if t.kind in ("linear", "kept_linear"):
            assert tuple(m.get_submodule(t.name).weight.shape) == t.shape, t.name
    # every weight, the attention's q_norm/k_norm (Qwen3, OLMoE: Architecture.attn_norms) included, but biases (Qwen2),
    # which no layer map lists: they change no Linear's input
    n = sum(p.numel() for k, p in m.named_parameters() if not k.endswith(".bias"))
    assert parameter_count(arch, m.config.to_dict())["total"] == n


def test_dense_layer_maps_unchanged():
    llama = ARCHITECTURES.get("llama")
    assert llama.moe is None and llama.bind({}) is llama and llama.shared_inputs == ()
    assert llama.input_keys()["mlp.up_proj"] == "mlp.gate_proj"


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_experts_give_the_fused_outputs(kind):
    m = tiny_moe(kind)
    fused = m.model.layers[0].mlp.experts
    x = torch.randn(37, 64)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(37)])
    w = torch.rand(37, 2)
    idx[:, 0] = torch.where(torch.arange(37) % 5 == 0, 3, idx[:, 0])  # some tokens, not every expert
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref_block, ref = fused(x, idx, w), m(ids).logits
        assert unfuse_experts(m) == 2 and unfuse_experts(m) == 0  # once
        un = m.model.layers[0].mlp.experts
        assert isinstance(un, UnfusedExperts) and isinstance(un[1].down_proj, torch.nn.Linear)
        torch.testing.assert_close(un(x, idx, w), ref_block, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_expert_hook_sees_only_its_routed_tokens():
    m = tiny_moe("mixtral")
    unfuse_experts(m)
    un = m.model.layers[0].mlp.experts
    seen = []
    un[2].gate_proj.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[0]))
    x, idx, w = torch.randn(10, 64), torch.tensor([[0, 1]] * 7 + [[2, 0]] * 3), torch.full((10, 2), 0.5)
    with torch.no_grad():
        un(x, idx, w)
    assert seen == [3]


@pytest.mark.slow
def test_upcycled_smollm2_is_near_smollm2_with_uneven_routing(smollm2_fp32_shared, milton_ids):
    from harness.config import ModelConfig
    from harness.models import load_model, resolve_model

    mc = ModelConfig(name="smollm2-135m-moe4", path="embedded:smollm2-135m-moe4", dtype="float32")
    r = resolve_model(mc)
    assert r.model_sha.startswith("built-sha256:") and "built here, not a released model" in r.origin
    moe = load_model(r, mc)
    assert moe.config.model_type == "mixtral" and architecture_for(moe).moe.n_experts == 4
    ids = torch.as_tensor(milton_ids)[: 2 * 256].reshape(2, 256)
    counts = torch.zeros(4, dtype=torch.long)

    def count(e):
        def hook(mod, args, out):
            counts[e] += args[0].shape[0]
        return hook

    for e, ex in enumerate(moe.model.layers[5].mlp.experts):
        ex.register_forward_hook(count(e))
    with torch.no_grad():
        dense_ppl = smollm2_fp32_shared(ids, labels=ids).loss.exp().item()
        moe_ppl = moe(ids, labels=ids).loss.exp().item()
    assert abs(moe_ppl / dense_ppl - 1) < 0.03, (moe_ppl, dense_ppl)
    assert counts.sum() == 2 * 256 * 2  # top-2
    assert counts.max() > 1.5 * counts.min(), counts  # uneven routing
