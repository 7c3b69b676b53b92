"""The static-cache decoder (eval/static_decode.py) against transformers' own forward and generate, on tiny random
models of each supported family and on the embedded SmolLM2."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers

from backends.roofline import decode_model_bytes
from eval.static_decode import StaticDecoder, fuse_projections, time_decode

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128)
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def tiny(family: str, dtype=torch.float64, seed: int = 0, **over):
    name = FAMILIES.get(family, family)
    cfg = getattr(transformers, f"{name}Config")(**{**TINY, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval().to(dtype)
    model.generation_config.eos_token_id = None  # greedy runs to the requested length
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_logits(dec: StaticDecoder, ids: torch.Tensor, gen_len: int) -> list[torch.Tensor]:
    dec.prefill(ids)
    out = [dec.logits.clone()]
    for _ in range(gen_len - 1):
        dec.step()
        out.append(dec.logits.clone())
    return out


def assert_logits_match_hf(model, dec: StaticDecoder, ids: torch.Tensor, gen_len: int) -> None:
    """Every step's logits equal the last position of a full forward over the sequence so far."""
    p = ids.shape[1]
    logits = decode_logits(dec, ids, gen_len)
    seq = dec.tokens[:, :p + gen_len]
    assert torch.equal(seq[:, :p], ids)
    with torch.no_grad():
        for j, got in enumerate(logits):
            ref = model(seq[:, :p + j]).logits[:, -1]
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
            assert torch.equal(seq[:, p + j], ref.argmax(-1))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_equal_hf_forward_at_every_step(family, batch):
    model = tiny(family)
    gen_len = 9
    dec = StaticDecoder(model, batch, max_len=20)
    # a longer earlier run leaves stale K/V past the next prompt: the mask must hide them
    dec.generate(prompts(batch, 10, seed=5), 10)
    assert_logits_match_hf(model, dec, prompts(batch, 7), gen_len)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8}])
def test_scaled_rope_matches_hf(rope):
    model = tiny("llama", rope_parameters={"rope_theta": 500.0, **rope})
    assert_logits_match_hf(model, StaticDecoder(model, 2, max_len=24), prompts(2, 12), 12)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_ids_equal_generate(family):
    model = tiny(family, torch.float32, seed=3)
    ids, gen_len = prompts(3, 6, seed=2), 12
    ref = model.generate(ids, max_new_tokens=gen_len, do_sample=False)[:, 6:]
    got = StaticDecoder(model, 3, max_len=6 + gen_len).generate(ids, gen_len)
    assert got.shape == (3, gen_len)
    assert torch.equal(got, ref)


def test_greedy_ids_equal_generate_smollm2(smollm2_fp32_shared, milton_ids):
    model = smollm2_fp32_shared  # 9 query heads over 3 KV heads, 30 blocks, real weights
    ids = milton_ids[:24].view(2, 12)
    ref = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 12:]
    assert torch.equal(StaticDecoder(model, 2, max_len=16).generate(ids, 4), ref)


class Opaque(nn.Module):
    """A projection as a kernel module would be: forward(x) only, no `.weight` (reading one raises)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("extra", torch.zeros(5, dtype=torch.uint8))  # stands in for packed codes

    def forward(self, x):
        return self.inner(x)


def wrap_projections(model) -> int:
    n = 0
    for block in model.model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (block.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, Opaque(getattr(parent, name)))
                n += 1
    model.lm_head = Opaque(model.lm_head)
    return n + 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_opaque_projection_modules_give_the_same_results(family):
    model = tiny(family)
    ids = prompts(3, 5)
    ref = decode_logits(StaticDecoder(model, 3, max_len=12), ids, 7)
    assert wrap_projections(model) == 2 * 7 + 1
    with pytest.raises(AttributeError):
        model.model.layers[0].self_attn.q_proj.weight
    got = decode_logits(StaticDecoder(model, 3, max_len=12), ids, 7)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family, over, match", [
    ("Gemma", {"head_dim": 16}, "model_type 'gemma'"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "'dynamic'"),
    ("mistral", {"sliding_window": 8}, "sliding_window 8 < max_len 16"),
])
def test_unsupported_models_are_refused(family, over, match):
    with pytest.raises(NotImplementedError, match=match):
        StaticDecoder(tiny(family, torch.float32, **over), 1, max_len=16)


def test_mistral_window_longer_than_the_cache_is_accepted():
    model = tiny("mistral", sliding_window=32)
    assert_logits_match_hf(model, StaticDecoder(model, 1, max_len=16), prompts(1, 6), 8)


def test_bad_calls_are_refused():
    model = tiny("llama", torch.float32)
    with pytest.raises(ValueError, match="use_cuda_graph"):
        StaticDecoder(model, 1, 8, use_cuda_graph=True)
    dec = StaticDecoder(model, 2, max_len=8)
    with pytest.raises(RuntimeError, match="prefill"):
        dec.step()
    with pytest.raises(ValueError, match="batch 2"):
        dec.prefill(prompts(3, 4))
    with pytest.raises(ValueError, match="max_len 8"):
        dec.generate(prompts(2, 4), 6)
    dec.generate(prompts(2, 4), 5)  # fills the cache exactly
    with pytest.raises(RuntimeError, match="max_len=8"):
        dec.step()


def test_decode_model_bytes_by_hand():
    from backends.roofline import decode_roofline_tok_s

    model = tiny("llama", torch.float16)
    h, inter, kv_dim, vocab, layers = 64, 128, 2 * 16, 256, 2
    per_block = h * h + 2 * kv_dim * h + h * h + 3 * inter * h  # q, k+v, o, gate+up+down
    weights = 2 * (layers * per_block + vocab * h)  # fp16, plus the LM head
    kv = layers * 2 * 2 * 16 * 2  # K and V, 2 KV heads of 16, fp16
    mb = decode_model_bytes(model)
    assert (mb.weight_read_bytes, mb.kv_bytes_per_token) == (weights, kv)
    assert mb.matmul_params == layers * per_block + vocab * h
    assert decode_roofline_tok_s(mb, 4, 100, 1e12) == pytest.approx(4e12 / (weights + 4 * 100 * kv))
    # what the modules hold, whatever they are: the wrappers' extra buffers count, K/V follow the model dtype
    wrap_projections(model)
    assert decode_model_bytes(model).weight_read_bytes == weights + 5 * 15
    assert decode_model_bytes(tiny("llama", torch.float32)).kv_bytes_per_token == 2 * kv


def test_time_decode_on_cpu():
    model = tiny("llama", torch.float32)
    ids = prompts(2, 5)
    out = time_decode(model, ids, gen_len=6, warmup=1, repeats=2)
    assert torch.equal(out["ids"], StaticDecoder(model, 2, max_len=11).generate(ids, 6))
    assert out["peak_memory_bytes"] is None and out["cuda_graph"] is False
    assert len(out["repeats_s"]) == 2 and out["decode_s"] > 0 and out["prefill_s"] > 0
    assert out["decode_tok_s"] == pytest.approx(2 * 5 / out["decode_s"])
    assert out["decode_ms_per_step"] == pytest.approx(1e3 * out["decode_s"] / 5)
    assert out["prefill_tok_s"] == pytest.approx(2 * 5 / out["prefill_s"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype):
    model = tiny("qwen3", dtype, seed=4).cuda()
    ids = prompts(3, 9).cuda()
    eager = StaticDecoder(model, 3, max_len=40, use_cuda_graph=False)
    graph = StaticDecoder(model, 3, max_len=40)
    assert graph.use_cuda_graph
    for prompt in (ids, ids.flip(0)):  # a second prompt replays the graph captured for the first
        want = decode_logits(eager, prompt, 24)
        got = decode_logits(graph, prompt, 24)
        assert torch.equal(graph.tokens[:, :33], eager.tokens[:, :33])
        for a, b in zip(got, want):  # cuBLAS may pick other algorithms inside a capture: not bit for bit
            torch.testing.assert_close(a, b)
    if dtype == torch.float32:
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)[:, 9:]
        assert torch.equal(graph.generate(ids, 24), ref.cpu())
    # a cache filled to the last position, whose capture warm-up must stay inside it
    tight = StaticDecoder(model, 3, max_len=10)
    assert torch.equal(tight.generate(ids, 2), eager.generate(ids, 2))
    out = time_decode(model, ids, 8, warmup=1, repeats=2)
    assert out["cuda_graph"] and out["peak_memory_bytes"] > 0
    assert torch.equal(out["ids"], eager.generate(ids, 8))


def test_fused_projections_give_the_same_logits():
    """q/k/v and gate/up fused into one product each (eval.static_decode.fuse_projections): the same logits at every
    step, and the bytes a step reads unchanged."""
    from eval.static_decode import fuse_projections

    model = tiny("llama", torch.float64)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    ref = StaticDecoder(model, 2, 12)
    ref.prefill(prompt)
    ref_logits = [ref.logits.clone()] + [(ref.step(), ref.logits.clone())[1] for _ in range(4)]
    before = decode_model_bytes(model)
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    assert not hasattr(model.model.layers[0].self_attn, "q_proj") and hasattr(model.model.layers[0].mlp, "gate_up_proj")
    dec = StaticDecoder(model, 2, 12)
    dec.prefill(prompt)
    got = [dec.logits.clone()] + [(dec.step(), dec.logits.clone())[1] for _ in range(4)]
    for a, b in zip(got, ref_logits):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert decode_model_bytes(model) == before


def test_a_compiled_step_decodes_the_same_tokens():
    """compile_step=True: the decode step through torch.compile (fusing the small ops between the projections, the
    lever measured on the H100: about 1.7 ms of a 7B step outside the linears) gives the eager step's tokens and
    logits to float tolerance, fused projections included."""
    model = tiny("llama", torch.float32)
    fuse_projections(model)
    ids = prompts(2, 5)
    ref = decode_logits(StaticDecoder(model, 2, max_len=12), ids, 6)
    got = decode_logits(StaticDecoder(model, 2, max_len=12, compile_step=True), ids, 6)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got, ref))
    assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(got, ref))


def test_a_profiled_decode_names_where_the_step_time_goes_and_changes_no_token():
    """profile=N: N more steps under torch.profiler after the timed runs; on the CPU the operators' own times stand in
    for kernels. The matrix products of the blocks must be among the largest entries, the shares sum to at most 1,
    and the decoded tokens are those of an unprofiled run."""
    model = tiny("llama", torch.float32)
    ids = prompts(2, 5)
    plain = time_decode(model, ids, gen_len=6, warmup=0, repeats=1)
    out = time_decode(model, ids, gen_len=6, warmup=0, repeats=1, profile=4)
    assert torch.equal(out["ids"], plain["ids"]) and "profile" not in plain
    pr = out["profile"]
    assert pr["steps"] == 4 and pr["kernel_ms_per_step"] > 0 and pr["wall_ms_per_step"] > 0
    names = [t["name"] for t in pr["top"]]
    assert any(n in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul") for n in names), names
    assert 0 < sum(t["share"] for t in pr["top"]) <= 1 + 1e-9
