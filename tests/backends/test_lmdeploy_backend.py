"""CPU-only checks of the LMDeploy side: config translation, command lines, result parsing, roofline arithmetic,
synthetic checkpoints. lmdeploy is not installed here; where its classes are needed a stand-in module records what
it was given."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import lmdeploy_throughput as bench
from app import serve
from app.chat import Conversation, repl
from harness.config import ConfigError
from backends import lmdeploy as lb
from backends import roofline as rl
from harness import synthetic
from harness.compose import compose

LLAMA2_7B_PARAMS = 6_738_415_616  # Llama-2-7b-hf, as published
INTERNLM2_1_8B_PARAMS = 1_889_110_016  # 2 x 92544 x 2048 + 24 x 62,918,656 + 2048


def awq_dir(tmp_path):
    d = tmp_path / "awq"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}}))
    return d


def no_turbomind(name):
    if name == "lmdeploy.turbomind":
        raise ImportError("libcudart.so.12: cannot open shared object file")
    raise AssertionError(name)


# ----------------------------------------------------------------------------------------------- translation


def test_quant_policy_from_kv_bits():
    assert [lb.quant_policy(b) for b in (16, 8, 4)] == [0, 8, 4]
    with pytest.raises(ConfigError, match="kv.bits"):
        lb.quant_policy(2)


def test_engine_kwargs_follow_the_config(tmp_path):
    cfg = compose(["backend=lmdeploy", "kv=int8", "backend.session_len=2048", "backend.max_batch_size=32"])
    kw = lb.engine_kwargs(cfg, tmp_path, "pytorch")  # tmp_path: no config.json, a plain checkpoint
    assert kw == {"dtype": "bfloat16", "tp": 1, "session_len": 2048, "max_batch_size": 32,
                  "cache_max_entry_count": 0.4, "quant_policy": 8}


def test_awq_checkpoint_gets_model_format_and_fp16(tmp_path):
    cfg = compose(["backend=lmdeploy", "kv=int4"])
    kw = lb.engine_kwargs(cfg, awq_dir(tmp_path), "pytorch")
    assert kw["model_format"] == "awq" and kw["dtype"] == "float16" and kw["quant_policy"] == 4


def test_other_quantized_formats_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ConfigError, match="gptq"):
        lb.checkpoint_format(tmp_path)


def test_pytorch_engine_needs_cache_share_below_one(tmp_path):
    cfg = compose(["backend=lmdeploy", "backend.cache_max_entry_count=1.0"])
    with pytest.raises(ConfigError, match="cache_max_entry_count"):
        lb.engine_kwargs(cfg, tmp_path, "pytorch")
    assert lb.engine_kwargs(cfg, tmp_path, "turbomind")["cache_max_entry_count"] == 1.0


def test_engine_falls_back_to_pytorch_when_turbomind_does_not_import():
    cfg = compose(["backend=lmdeploy"])
    engine, reason = lb.choose_engine(cfg, no_turbomind)
    assert engine == "pytorch" and "libcudart.so.12" in reason
    with pytest.raises(ConfigError, match="turbomind was asked for"):
        lb.choose_engine(compose(["backend=lmdeploy", "backend.engine=turbomind"]), no_turbomind)
    # an importable package whose native module is missing counts as unavailable too
    stub = types.SimpleNamespace(is_available=lambda: False, _import_error="no _turbomind")
    assert lb.choose_engine(cfg, lambda n: stub)[0] == "pytorch"
    assert lb.choose_engine(cfg, lambda n: types.SimpleNamespace(is_available=lambda: True)) == ("turbomind", None)


def test_build_engine_config_calls_the_chosen_class(tmp_path):
    made = {}

    class Cfg:
        def __init__(self, **kw):
            made[type(self).__name__] = kw

    fake = types.SimpleNamespace(PytorchEngineConfig=type("PytorchEngineConfig", (Cfg,), {}),
                                 TurbomindEngineConfig=type("TurbomindEngineConfig", (Cfg,), {}))

    def importer(name):
        return fake if name == "lmdeploy" else no_turbomind(name)

    cfg = compose(["backend=lmdeploy", "kv=int8"])
    _, engine, _ = lb.build_engine_config(cfg, awq_dir(tmp_path), importer)
    assert engine == "pytorch"
    assert made["PytorchEngineConfig"]["quant_policy"] == 8 and made["PytorchEngineConfig"]["model_format"] == "awq"


def test_lmdeploy_stays_an_optional_import():
    code = ("import sys, backends.lmdeploy, harness.synthetic, benchmarks.lmdeploy_throughput, app.serve, "
            "app.chat; assert 'lmdeploy' not in sys.modules and 'openai' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# ----------------------------------------------------------------------------------------------- command lines


def test_api_server_command(tmp_path):
    cfg = compose(["backend=lmdeploy", "kv=int8", "backend.session_len=4096"])
    cmd = lb.api_server_command(cfg, awq_dir(tmp_path), port=24000, python="python3")
    assert cmd[:6] == ["python3", "-m", "lmdeploy", "serve", "api_server", str(tmp_path / "awq")]
    args = dict(zip(cmd[6::2], cmd[7::2]))
    assert args == {"--backend": "pytorch", "--server-name": "127.0.0.1", "--server-port": "24000",
                    "--cache-max-entry-count": "0.4", "--quant-policy": "8", "--max-batch-size": "128", "--tp": "1",
                    "--dtype": "float16", "--session-len": "4096", "--model-format": "awq"}


def test_api_server_command_plain_checkpoint_has_no_format_or_session(tmp_path):
    cmd = lb.api_server_command(compose(["backend=lmdeploy"]), tmp_path)
    assert "--model-format" not in cmd and "--session-len" not in cmd
    assert cmd[cmd.index("--quant-policy") + 1] == "0"


def test_wait_healthy_polls_until_a_model_is_listed():
    answers = iter([OSError("refused"), '{"object": "list", "data": []}',
                    '{"object": "list", "data": [{"id": "m1", "object": "model"}]}'])

    def fetch(url):
        assert url == "http://127.0.0.1:1/v1/models"
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    ids, _ = serve.wait_healthy("http://127.0.0.1:1", fetch=fetch, interval_s=0)
    assert ids == ["m1"]


def test_wait_healthy_fails_when_the_server_exits():
    proc = types.SimpleNamespace(poll=lambda: 3, returncode=3)
    with pytest.raises(RuntimeError, match="exited with 3"):
        serve.wait_healthy("http://127.0.0.1:1", proc, fetch=lambda u: "")


# ----------------------------------------------------------------------------------------------- result parsing


def test_summarize_a_round():
    # two requests submitted at t=0; first tokens at 0.10 / 0.12; then one token every 10 ms, one chunk of 2
    a = bench.RequestTrace(0.0, [(0.10, 1), (0.11, 1), (0.12, 1), (0.14, 2)])
    b = bench.RequestTrace(0.0, [(0.12, 1), (0.13, 1), (0.14, 1), (0.15, 1)])
    s = bench.summarize([a, b])
    assert s["output_tokens"] == 9 and s["elapsed_s"] == pytest.approx(0.15)
    assert s["output_tok_s"] == pytest.approx(9 / 0.15)
    # decode: tokens after each first token (4 + 3) over the span from the last first token (0.12) to the end (0.15)
    assert s["decode_tok_s"] == pytest.approx(7 / 0.03)
    assert s["ttft_s"] == pytest.approx(0.11) and s["ttft_max_s"] == pytest.approx(0.12)
    # every per-token gap is 10 ms (the 2-token chunk came 20 ms after the previous one)
    assert s["token_latency_p50_s"] == pytest.approx(0.01) and s["token_latency_p99_s"] == pytest.approx(0.01)


def test_percentile_matches_numpy():
    import numpy as np

    v = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 50, 90, 99, 100):
        assert bench.percentile(v, q) == pytest.approx(np.percentile(v, q))


def test_median_over_rounds():
    rounds = [{"decode_tok_s": x, "ttft_s": y} for x, y in ((100.0, 0.3), (120.0, 0.1), (110.0, 0.2))]
    m = bench.median_rounds(rounds)
    assert m["decode_tok_s"] == 110.0 and m["ttft_s"] == 0.2 and (m["decode_tok_s_min"], m["decode_tok_s_max"]) == (100.0, 120.0)


def test_report_renders_table_and_plot(tmp_path):
    mb = rl.ModelBytes(13_214_687_232, 524_288, 6_607_077_376)
    res = []
    for v, label, tok_s in (("fp16", "FP16", 160.0), ("awq_w4a16", "AWQ w4 g128", 129.0)):
        res.append({"variant": v, "label": label + " (synthetic)", "synthetic": True, "model": "m",
                    "engine": "pytorch", "prompt_len": 128, "gen_len": 256, "repeats": 3, "warmup": 1,
                    "config": {"backend": {"cache_max_entry_count": 0.4}},
                    "environment": {"gpu": "NVIDIA H100 80GB HBM3", "roofline_bw_bytes_s": 3.35e12, "copy_bw_bytes_s": 3.0e12},
                    "memory": {"weights_gpu_bytes": 13e9, "weights_stored_bytes": 13e9, "kv_bytes_per_token": 524288,
                               "kv_capacity_tokens": 50_000, "kv_capacity_ideal_tokens": 52_000},
                    "batches": [{"batch": 1, "measured": {"decode_tok_s": tok_s, "output_tok_s": tok_s, "ttft_s": 0.02,
                                                          "token_latency_p50_s": 0.006, "token_latency_p99_s": 0.007},
                                 "roofline": bench.rooflines(mb, 1, 128, 256, 3.35e12, 989e12)}]})
    for r in res:
        (tmp_path / f"{bench.NAME}_{r['variant']}.json").write_text(json.dumps(r))
    bench.write_report(tmp_path, ["fp16", "awq_w4a16"], "python -m benchmarks.lmdeploy_throughput")
    md = (tmp_path / f"{bench.NAME}.md").read_text()
    assert "Synthetic weights" in md and "| FP16 (synthetic) | 1 | 160 |" in md and "0.81x" in md
    assert (tmp_path / f"{bench.NAME}.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------- roofline


def test_kv_bytes_per_token_llama2_7b():
    fp16 = rl.kv_bytes_per_token(32, 32, 128, 16)
    int8 = rl.kv_bytes_per_token(32, 32, 128, 8)
    int4 = rl.kv_bytes_per_token(32, 32, 128, 4)
    assert fp16 == 32 * 2 * 32 * 128 * 2 == 524_288
    # uint8 K and V plus an fp16 scale and zero per token, head, K and V
    assert int8 == 32 * 32 * (2 * 128 + 2 * 2 * 2) == 270_336
    assert int4 == 32 * 32 * (2 * 64 + 8)
    assert fp16 / int8 >= 1.9  # the capacity target at a fixed cache share


def test_decode_roofline_llama2_7b():
    a = synthetic.load_arch("llama2-7b")
    fp16 = synthetic.weight_bytes(a, synthetic.WeightFormat())
    awq = synthetic.weight_bytes(a, synthetic.WeightFormat("awq", 4, 128))
    assert fp16["total"] == 2 * LLAMA2_7B_PARAMS
    # every linear plus the LM head; the embedding table is read one row at a time
    assert fp16["decode_read"] == fp16["total"] - 32000 * 4096 * 2
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert awq["linear"] == linear // 2 + linear // 128 * 2 + linear // 128 // 2  # codes + fp16 scales + int4 zeros
    kv = rl.kv_bytes_per_token(32, 32, 128, 16)
    mb = rl.ModelBytes(fp16["decode_read"], kv, linear)
    ctx = rl.mean_decode_context(128, 256)
    assert ctx == 256
    tok_s = rl.decode_roofline_tok_s(mb, 1, ctx, 3.35e12)
    assert tok_s == pytest.approx(3.35e12 / (fp16["decode_read"] + 256 * kv))
    assert 240 < tok_s < 260  # GPU.md: 249 tok/s counting every stored byte
    # batch 32 reads the weights once and 32 contexts of KV
    assert rl.decode_roofline_tok_s(mb, 32, ctx, 3.35e12) == pytest.approx(32 * 3.35e12 / (fp16["decode_read"] + 32 * 256 * kv))
    assert rl.step_time_floor_s(mb, 1, ctx, 3.35e12) == pytest.approx(1 / tok_s)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_weight_bytes_of_a_mixture_of_experts_count_its_router(name):
    """An MoE's router is a linear kept in the model dtype: its bytes are counted (and read by a decode step)."""
    a = synthetic.load_arch(name)
    n = synthetic.parameter_count(a)
    fp16 = synthetic.weight_bytes(a, synthetic.WeightFormat())
    awq = synthetic.weight_bytes(a, synthetic.WeightFormat("awq", 4, 128))
    assert n["kept_linear"] > 0 and fp16["kept_linear"] == awq["kept_linear"] == 2 * n["kept_linear"]
    assert fp16["total"] == 2 * n["total"]
    assert fp16["decode_read"] == fp16["total"] - fp16["embedding"]  # the LM head is not tied in either


def test_prefill_floor_and_capacity():
    mb = rl.ModelBytes(10**10, 2**19, 5 * 10**9)
    assert rl.prefill_floor_s(mb, 1, 1e15, 1e12) == pytest.approx(0.01)  # one token: bound by reading the weights
    assert rl.prefill_floor_s(mb, 4096, 1e15, 1e12) == pytest.approx(2 * 5e9 * 4096 / 1e15)
    assert rl.kv_capacity_tokens(60 * 2**30, 0.4, 2**19) == int(60 * 2**30 * 0.4) // 2**19
    assert rl.lookup(rl.HBM_BANDWIDTH_BYTES_S, "NVIDIA H100 80GB HBM3") == 3.35e12
    assert rl.lookup(rl.HBM_BANDWIDTH_BYTES_S, "NVIDIA H100 PCIe") == 2.0e12


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_match_the_released_models():
    assert synthetic.parameter_count(synthetic.load_arch("llama2-7b"))["total"] == LLAMA2_7B_PARAMS
    il = synthetic.load_arch("internlm2-chat-1_8b")
    assert synthetic.parameter_count(il)["total"] == INTERNLM2_1_8B_PARAMS
    wqkv = next(t for t in il.tensors() if t.name.endswith("layers.0.attention.wqkv"))
    assert wqkv.shape == ((16 + 2 * 8) * 128, 2048)
    assert synthetic.parameter_count(synthetic.load_arch("smollm2-135m"))["total"] == 134_515_008


def test_synthetic_conf_files_compose():
    for model, arch in (("llama2_7b_synthetic", "llama2-7b"), ("internlm2_1_8b_synthetic", "internlm2-chat-1_8b")):
        cfg = compose([f"model={model}"])
        assert cfg.model.weights == "random" and synthetic.arch_name(cfg.model.path) == arch
        synthetic.load_arch(arch)


def test_quality_metrics_are_refused_on_random_weights():
    with pytest.raises(synthetic.SyntheticWeightsError, match="eval.perplexity.enabled"):
        synthetic.refuse_quality_metrics(compose(["model=llama2_7b_synthetic"]))
    synthetic.refuse_quality_metrics(compose(["model=llama2_7b_synthetic", "eval.perplexity.enabled=false"]))
    synthetic.refuse_quality_metrics(compose([]))  # pretrained weights: anything goes


def test_weight_format_from_quant_config():
    assert synthetic.weight_format(compose([])).label == "fp16"
    f = synthetic.weight_format(compose(["quant=awq", "quant.group_size=128"]))
    assert f.label == "awq-w4g128"
    with pytest.raises(ValueError, match="w_bit"):
        synthetic.weight_format(compose(["quant=awq", "quant.w_bit=3"]))


TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512)


def test_tiny_fp16_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    arch = synthetic.load_arch("smollm2-135m", **TINY)
    out = synthetic.write_checkpoint(arch, tmp_path / "fp16", synthetic.WeightFormat(), seed=1)
    marker = synthetic.read_marker(out)
    assert marker["synthetic"] and marker["format"] == "fp16" and synthetic.is_synthetic(out)
    assert marker["weight_bytes"]["total"] == 2 * synthetic.parameter_count(arch)["total"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == synthetic.parameter_count(arch)["total"]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tiny_awq_checkpoint_has_autoawq_gemm_layout(tmp_path):
    from safetensors import safe_open

    arch = synthetic.load_arch("llama2-7b", **TINY)
    fmt = synthetic.WeightFormat("awq", 4, 32)
    out = synthetic.write_checkpoint(arch, tmp_path / "awq", fmt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    assert lb.checkpoint_format(out) == "awq"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        down = {p: f.get_tensor(f"model.layers.1.mlp.down_proj.{p}") for p in ("qweight", "qzeros", "scales")}
    assert down["qweight"].shape == (128, 64 // 8) and down["qweight"].dtype == torch.int32
    assert down["qzeros"].shape == (128 // 32, 64 // 8) and down["scales"].shape == (128 // 32, 64)
    assert down["scales"].dtype == torch.float16
    assert "lm_head.weight" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys
    total = sum(t.numel() * t.element_size() for t in _all_tensors(out / "model.safetensors"))
    assert total == synthetic.weight_bytes(arch, fmt)["total"]


def _all_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path)).values()


def test_checkpoint_shards_and_index(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "SHARD_BYTES", 100_000)
    arch = synthetic.load_arch("llama2-7b", **TINY)
    out = synthetic.write_checkpoint(arch, tmp_path / "sharded", synthetic.WeightFormat())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert len(index["weight_map"]) == len(arch.tensors())


def test_materialize_reuses_a_complete_checkpoint(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synthetic, "write_checkpoint", lambda *a, **k: calls.append(a))
    cfg = compose(["model=llama2_7b_synthetic"])
    d = tmp_path / "llama2-7b-fp16-seed0"
    d.mkdir()
    (d / synthetic.COMPLETE).write_text("ok")
    assert synthetic.materialize(cfg, tmp_path) == d and not calls
    with pytest.raises(ValueError, match="not synthetic"):
        synthetic.materialize(compose([]), tmp_path)


def test_tokenizer_must_fit_the_vocabulary(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    (tmp_path / synthetic.MARKER).write_text(json.dumps({"tokenizer_vocab": 49152}))
    with pytest.raises(ValueError, match="32000 embedding rows"):
        synthetic.check_tokenizer_fits(tmp_path)


# ----------------------------------------------------------------------------------------------- chat


def test_chat_loop_keeps_history_and_resets():
    seen = []

    def respond(messages):
        seen.append([m["content"] for m in messages])
        yield "ok"

    lines = iter(["hi", "again", "/reset", "fresh", "/exit"])
    out = []
    repl(respond, Conversation(system="sys"), read=lambda p: next(lines), write=out.append)
    assert seen == [["sys", "hi"], ["sys", "hi", "ok", "again"], ["sys", "fresh"]]


def test_conversation_trims_oldest_turns():
    c = Conversation(max_turns=1)
    for i in range(3):
        c.add("user", f"u{i}")
        c.add("assistant", f"a{i}")
    assert [m["content"] for m in c.messages()] == ["u2", "a2"]


# ----------------------------------------------------------------------------------------------- real-kernel PPL


def test_ppl_parts_round_trip_and_window_means(tmp_path):
    from benchmarks import lmdeploy_ppl

    blob = tmp_path / "model.safetensors"
    blob.write_bytes(bytes(range(256)) * 41)
    names = lmdeploy_ppl.split_file(blob, tmp_path / "parts", part_bytes=1000)
    assert len(names) == 11 and all((tmp_path / "parts" / n).stat().st_size <= 1000 for n in names)
    lmdeploy_ppl.join_parts([tmp_path / "parts" / n for n in names], tmp_path / "joined")
    assert (tmp_path / "joined").read_bytes() == blob.read_bytes()
    # equal-length windows: exp of the mean window NLL is the token PPL
    nll = torch.rand(5, 511, dtype=torch.float64) * 6
    assert lb.ppl_from_window_means(nll.mean(1).tolist()) == pytest.approx(nll.mean().exp().item())
    assert lmdeploy_ppl.relative_gap(101.0, 100.0) == pytest.approx(0.01)


def test_tp2_reaches_engine_config_and_server_command_with_multicast_off():
    """Two GPUs (issue 9's CPU side): tp travels into the engine kwargs and the api_server command line, and every
    engine/server environment keeps NVLink multicast off."""
    from backends import lmdeploy as lb
    from harness.compose import compose

    cfg = compose(["backend=lmdeploy", "backend.tp=2", "kv=int8"])
    kw = lb.engine_kwargs(cfg, "/m", "pytorch")
    assert kw["tp"] == 2 and kw["quant_policy"] == 8
    cmd = lb.api_server_command(cfg, "/m", engine="pytorch")
    assert cmd[cmd.index("--tp") + 1] == "2"
    env = lb.engine_env(cfg, {"PATH": "/bin"})
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["PATH"] == "/bin"
    one = lb.engine_env(compose(["backend=lmdeploy"]), {"PATH": "/bin"})
    assert one == {"PATH": "/bin"}


# ----------------------------------------------------------------------------------------------- tp > 1 arithmetic

LLAMA2_13B_PARAMS = 13_015_864_320  # Llama-2-13b-hf, as published


def _marker_dir(tmp_path, arch, fmt):
    """A checkpoint directory with config.json and synthetic.json only (no weights): what model_bytes reads."""
    d = tmp_path / f"{arch.name}-{fmt.label}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(arch.hf_config))
    (d / synthetic.MARKER).write_text(json.dumps({"synthetic": True, "weight_bytes": synthetic.weight_bytes(arch, fmt),
                                                  "parameters": synthetic.parameter_count(arch)}))
    return d


def test_llama2_13b_preset_has_the_released_shape():
    a = synthetic.load_arch("llama2-13b")
    assert synthetic.parameter_count(a)["total"] == LLAMA2_13B_PARAMS
    assert (a.num_layers, a.num_kv_heads, a.head_dim) == (40, 40, 128)
    cfg = compose(["model=llama2_13b_synthetic", "backend=lmdeploy", "backend.tp=2"])
    assert cfg.model.weights == "random" and synthetic.arch_name(cfg.model.path) == "llama2-13b"
    assert cfg.backend.tp == 2 and lb.engine_kwargs(cfg, "/m", "pytorch")["tp"] == 2


def test_kv_heads_per_gpu():
    assert rl.kv_heads_per_gpu(40, 1) == 40 and rl.kv_heads_per_gpu(40, 2) == 20 and rl.kv_heads_per_gpu(8, 8) == 1
    assert rl.kv_heads_per_gpu(2, 4) == 1  # fewer heads than GPUs: each GPU keeps one, replicated
    with pytest.raises(ValueError, match="split evenly"):
        rl.kv_heads_per_gpu(40, 3)


def test_per_gpu_without_replicated_weights_is_the_model_over_tp_times_the_bandwidth():
    mb = rl.ModelBytes(10**10, 2**19, 5 * 10**9)
    assert rl.per_gpu(mb, 1) is mb
    g = rl.per_gpu(mb, 2)
    assert (g.weight_read_bytes, g.kv_bytes_per_token, g.matmul_params) == (5 * 10**9, 2**18, 25 * 10**8)
    for batch in (1, 8, 32):
        # one GPU's bandwidth over what it reads == the aggregate bandwidth over what the whole model reads
        assert rl.decode_roofline_tok_s(g, batch, 256, 4.8e12) == pytest.approx(rl.decode_roofline_tok_s(mb, batch, 256, 2 * 4.8e12))
        assert rl.decode_roofline_tok_s(g, batch, 256, 4.8e12) == pytest.approx(2 * rl.decode_roofline_tok_s(mb, batch, 256, 4.8e12))
    assert rl.prefill_floor_s(g, 4096, 1e15, 1e12) == pytest.approx(rl.prefill_floor_s(mb, 4096, 1e15, 1e12) / 2)
    with pytest.raises(ValueError):
        rl.per_gpu(rl.ModelBytes(10, 1, 10, replicated_read_bytes=11), 2)


@pytest.mark.parametrize("fmt", [synthetic.WeightFormat(), synthetic.WeightFormat("awq", 4, 128)], ids=["fp16", "awq"])
def test_tp2_per_gpu_bytes_rooflines_and_kv_llama2_13b(tmp_path, fmt):
    """tp=2 on the 13B shape: each GPU holds and reads half of every linear and half the KV heads, plus the LM head
    and norms whole (LMDeploy's Llama replicates them, and the embedding table); rooflines are one GPU's bandwidth
    over that GPU's bytes."""
    arch = synthetic.load_arch("llama2-13b")
    wb = synthetic.weight_bytes(arch, fmt)
    d = _marker_dir(tmp_path, arch, fmt)
    m1, g1, s1 = bench.model_bytes(d, 16, tp=1)
    m2, g2, s2 = bench.model_bytes(d, 16, tp=2)
    assert m1 == m2 and g1 == m1  # the model's bytes do not depend on tp; tp=1 reads all of them
    assert m1.weight_read_bytes == wb["linear"] + wb["lm_head"] + wb["norm"]
    assert g2.weight_read_bytes == wb["linear"] // 2 + wb["lm_head"] + wb["norm"]
    assert g2.kv_bytes_per_token == m1.kv_bytes_per_token // 2 == 40 * 20 * 2 * 128 * 2
    assert s1["weights_per_gpu_expected_bytes"] == wb["total"]
    assert s2["weights_per_gpu_expected_bytes"] == wb["linear"] // 2 + wb["embedding"] + wb["lm_head"] + wb["norm"]
    bw = 4.8e12
    ctx = rl.mean_decode_context(128, 256)
    for batch in (1, 8, 32):
        r1, r2 = (bench.rooflines(g, batch, 128, 256, bw, 989e12) for g in (g1, g2))
        per_gpu_bytes = wb["linear"] / 2 + wb["lm_head"] + wb["norm"] + batch * ctx * m1.kv_bytes_per_token / 2
        assert r2["bytes_per_step"] == pytest.approx(per_gpu_bytes)
        assert r2["decode_tok_s"] == pytest.approx(batch * bw / per_gpu_bytes)
        # below 2x only by the replicated LM head and norms
        speedup = r2["decode_tok_s"] / r1["decode_tok_s"]
        assert 1.75 < speedup < 2
        assert speedup == pytest.approx(2 * r1["bytes_per_step"] / (r1["bytes_per_step"] + wb["lm_head"] + wb["norm"]))
        assert r2["ttft_s"] < r1["ttft_s"]
    if fmt.name == "fp16":
        assert 180 < bench.rooflines(g1, 1, 128, 256, bw, None)["decode_tok_s"] < 190  # 4.8 TB/s / 25.9 GB
    # the same free memory holds twice the tokens when a GPU stores half the heads
    one, two = (rl.kv_capacity_tokens(100 * 2**30, 0.4, g.kv_bytes_per_token) for g in (g1, g2))
    assert two - 2 * one in (0, 1)


def test_tp_result_names_and_executor_choice(monkeypatch):
    assert bench.variant_id("fp16", 1) == "fp16" and bench.variant_id("awq_w4a16_kv8", 2) == "awq_w4a16_kv8_tp2"
    assert bench._tp_of(["backend.tp=2"]) == 2 and bench._tp_of([]) == 1
    monkeypatch.delenv("LMDEPLOY_EXECUTOR_BACKEND", raising=False)
    assert bench.ensure_executor_backend(1) is None

    def no_ray(name):
        raise ImportError("No module named 'ray'")

    assert bench.ensure_executor_backend(2, no_ray) == "mp"
    import os

    assert os.environ["LMDEPLOY_EXECUTOR_BACKEND"] == "mp"
    monkeypatch.delenv("LMDEPLOY_EXECUTOR_BACKEND")
    assert bench.ensure_executor_backend(2, lambda n: object()) == "ray"
    monkeypatch.setenv("LMDEPLOY_EXECUTOR_BACKEND", "ray")
    assert bench.ensure_executor_backend(2, no_ray) == "ray"  # an explicit choice is kept


def test_process_tree_env_sees_spawned_processes():
    import os

    env = {**os.environ, **lb.MULTI_GPU_ENV}
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '5'])"], env=env)
    try:
        import time

        for _ in range(50):  # until the grandchild exists
            procs = bench.process_tree_env(os.getpid())
            if any(p["cmd"].startswith("sleep") for p in procs):
                break
            time.sleep(0.1)
        mine = [p for p in procs if p["pid"] != os.getpid()]
        assert {p["pid"] for p in mine} >= {child.pid} and any(p["cmd"].startswith("sleep") for p in mine)
        assert bench.multicast_off(mine)  # the grandchild inherited the variables
        assert not bench.multicast_off([{"pid": 1, "cmd": "x", "env": {"NCCL_NVLS_ENABLE": None}}]) and not bench.multicast_off([])
    finally:
        child.kill()
        child.wait()


def test_run_child_kills_its_process_group_on_timeout():
    import time

    t = time.monotonic()
    assert bench.run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1) == "timeout"
    assert time.monotonic() - t < 20
    assert bench.run_child([sys.executable, "-c", "raise SystemExit(3)"], None) == "exit 3"
    assert bench.run_child([sys.executable, "-c", "pass"], None) == "ok"


def _fake_result(variant, tp, tok_s, kv_tokens, mb):
    return {"variant": variant, "variant_id": bench.variant_id(variant, tp), "tp": tp,
            "label": {"fp16": "FP16", "awq_w4a16": "AWQ w4 g128", "awq_w4a16_kv8": "AWQ w4 g128 + KV int8"}[variant] + " (synthetic)", "synthetic": True, "model": "m", "engine": "pytorch",
            "prompt_len": 128, "gen_len": 256, "repeats": 2, "warmup": 1,
            "config": {"backend": {"cache_max_entry_count": 0.4, "tp": tp}},
            "environment": {"gpu": "NVIDIA H200", "roofline_bw_bytes_s": 4.8e12, "copy_bw_bytes_s": 4.3e12},
            "memory": {"weights_gpu_bytes": 26e9 if tp == 1 else None, "weights_per_gpu_bytes": 26e9 / tp,
                       "weights_stored_bytes": 26e9, "kv_bytes_per_token": 819200 // tp,
                       "kv_capacity_tokens": kv_tokens, "kv_capacity_ideal_tokens": kv_tokens + 1000},
            "batches": [{"batch": b, "measured": {"decode_tok_s": tok_s * b, "output_tok_s": tok_s * b, "ttft_s": 0.03,
                                                  "token_latency_p50_s": 0.008, "token_latency_p99_s": 0.009},
                         "roofline": bench.rooflines(rl.per_gpu(mb, tp), b, 128, 256, 4.8e12, 989e12)}
                        for b in (1, 8, 32)]}


def test_report_with_tp_columns_speedups_and_line_plot(tmp_path):
    mb = rl.ModelBytes(25_704_048_640, 819_200, 12_851_609_600, replicated_read_bytes=328_509_440,
                       replicated_matmul_params=163_840_000)
    res = [_fake_result("fp16", 1, 100.0, 40_000, mb), _fake_result("fp16", 2, 180.0, 200_000, mb)]
    for r in res:
        (tmp_path / f"x_{r['variant_id']}.json").write_text(json.dumps(r))
    (tmp_path / "x.json").write_text(json.dumps({"command": "c", "results": res}))  # a report is not a variant
    (tmp_path / "x_other_fp16.json").write_text(json.dumps({**res[0], "variant_id": "fp16"}))  # another stem
    assert bench._saved_ids(tmp_path, "x") == ["fp16", "fp16_tp2"]
    bench.write_report(tmp_path, None, "cmd", name="x")
    md = (tmp_path / "x.md").read_text()
    assert "| FP16 (synthetic) | 2 | 8 | 1,440 |" in md and "**per GPU**" in md
    assert "| 12.11* (24.21) |" in md  # tp=2 weights from the shard arithmetic, marked
    assert "| FP16 (synthetic) | 32 | 3,200 | 5,760 (tp=2) | 1.80x" in md
    assert (tmp_path / "x.png").stat().st_size > 10_000


def test_tokenizer_trim_keeps_the_first_ids_and_the_merges_they_need():
    from harness.tokenizer_trim import trim_tokenizer_json

    tok = {"added_tokens": [{"id": 0, "content": "<s>"}],
           "model": {"type": "BPE", "vocab": {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "bc": 6},
                     "merges": [["a", "b"], ["ab", "c"], ["b", "c"]]}}
    out = trim_tokenizer_json(tok, 5)
    assert out["model"]["vocab"] == {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4}
    assert out["model"]["merges"] == [["a", "b"]] and tok["model"]["merges"][1] == ["ab", "c"]  # input untouched
    assert trim_tokenizer_json({**tok, "model": {**tok["model"], "merges": ["a b", "ab c"]}}, 5)["model"]["merges"] == ["a b"]
    with pytest.raises(ValueError, match="special"):
        trim_tokenizer_json({**tok, "added_tokens": [{"id": 6, "content": "<x>"}]}, 5)


def test_every_quantization_method_has_a_checkpoint_format_lmdeploy_loads(tmp_path):
    """backend=lmdeploy writes each method's weights in the first of its formats (its class's, quant.export.FORMATS)
    that LMDeploy loads; a SmoothQuant checkpoint is read back as 'smooth_quant', goes to the engine in fp16 and
    without an AWQ model_format."""
    from quant import METHODS
    from quant.export import FORMATS, format_for

    for option in ("rtn_w4", "awq_w4", "gptq_w4", "awq_gptq_w4", "recipe_awq_gptq_w4", "smoothquant_w8a8"):
        q = compose([f"quant={option}"]).quant
        assert format_for(q, lb.CHECKPOINT_FORMATS).name in lb.CHECKPOINT_FORMATS, option
    assert {f for m in METHODS.names() for f in METHODS.get(m).formats} <= set(FORMATS.names())
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "smooth_quant",
                                                                              "quant_dtype": "int8"}}))
    assert lb.checkpoint_format(tmp_path) == "smooth_quant"
    cfg = compose(["quant=smoothquant_w8a8", "backend=lmdeploy", "backend.engine=pytorch"])
    kw = lb.engine_kwargs(cfg, tmp_path, "pytorch")
    assert kw["dtype"] == "float16" and "model_format" not in kw


@pytest.mark.parametrize("kind, spec, experts_only, as_kimi, why", [
    ("qwen3_moe", (4, 32, False), True, True, None),
    ("qwen3_moe", (4, 32, False), True, False, "weight_scale stored F16 (needs BF16); weight_shape stored I64 (needs I32)"),
    ("qwen3_moe", (4, 32, False), False, True, "8 dense Linears quantized (e.g. model.layers.0.self_attn.k_proj)"),
    ("qwen3_moe", (4, 32, True), True, True, "symmetric False (needs True)"),
    ("qwen3_moe", (4, 16, False), True, True, "group_size 16 (needs 32)"),
    ("mixtral", (4, 32, False), True, True, "architecture MixtralForCausalLM"),
])
@torch.no_grad()
def test_a_compressed_tensors_checkpoint_is_served_only_as_lmdeploy_reads_it(kind, spec, experts_only, as_kimi, why,
                                                                            tmp_path):
    """LMDeploy 0.18 reads compressed-tensors W4A16 only as Kimi-K2's checkpoint has it: int4 g32 symmetric, routed
    experts only, bf16 scales and int32 shapes, in a model that names its layers (Qwen3-MoE). The harness's export
    (the compressed-tensors package's conventions: fp16 scales, int64 shapes) is refused before any engine starts,
    naming what differs; rewritten in Kimi-K2's dtypes, an experts-only export is served, in the model's dtype."""
    from safetensors.torch import load_file, save_file

    from harness.moe_unfuse import unfuse_experts
    from quant.export.compressed_tensors import export_compressed_tensors
    from quant.surgery import quantizable_linears, quantize_linear_
    from tests.quant.test_moe import tiny_moe

    model = tiny_moe(kind, moe_intermediate_size=64).to(torch.float16)  # every in_features a multiple of 32
    model.config.architectures = [type(model).__name__]  # as in a checkpoint loaded from disk (save_pretrained sets it)
    unfuse_experts(model)
    qts = {n: quantize_linear_(lin, *spec, "int") for n, lin in quantizable_linears(model).items()
           if ".experts." in n or not experts_only}
    out = export_compressed_tensors(model, qts, tmp_path / "ct")
    if as_kimi:  # the parts in the dtypes Kimi-K2's released checkpoint stores
        f = out / "model.safetensors"
        t = load_file(str(f))
        t = {k: v.to(torch.bfloat16) if k.endswith(".weight_scale") else v.to(torch.int32) if k.endswith(".weight_shape")
             else v for k, v in t.items()}
        save_file(t, str(f), metadata={"format": "pt"})
    if why is not None:
        with pytest.raises(ConfigError, match=r"compressed-tensors checkpoint LMDeploy 0.18's engine does not serve: .*"
                                              + re.escape(why)):
            lb.checkpoint_format(out)
        return
    assert lb.checkpoint_format(out) == "compressed-tensors"
    cfg = compose(["quant=fp16", "backend=lmdeploy", "backend.engine=pytorch", "model.dtype=bfloat16"])
    kw = lb.engine_kwargs(cfg, out, "pytorch")
    assert kw["dtype"] == "bfloat16" and "model_format" not in kw


def test_a_mixture_of_experts_roofline_reads_only_the_routed_experts(tmp_path):
    """Qwen3-30B-A3B's shape (48 layers x 128 experts, top-8): a decode step of one token reads the dense weights and
    8/128 of each layer's routed experts; a batch of b reads 1 - (120/128)^b of them (uniform routing); prefill FLOPs
    count a token's 8 experts. Against a float64 count from the shapes, through the benchmark's own model_bytes."""
    arch = synthetic.load_arch("qwen3-30b-a3b")
    (tmp_path / "config.json").write_text(json.dumps(arch.hf_config))
    (tmp_path / synthetic.MARKER).write_text(json.dumps({"weight_bytes": synthetic.weight_bytes(arch, synthetic.WeightFormat()),
                                                         "parameters": synthetic.parameter_count(arch)}))
    mb, per_gpu, _ = bench.model_bytes(tmp_path, 16)
    assert per_gpu == mb and mb.experts == 128 and mb.experts_per_token == 8
    h, inter, layers, vocab = 2048, 768, 48, 151936
    routed = layers * 128 * 3 * h * inter  # gate, up, down of every expert: weights
    attn = layers * (h * 32 * 128 + 2 * h * 4 * 128 + 32 * 128 * h)
    dense_read = 2.0 * (attn + layers * h * 128 + vocab * h + layers * (2 * h + 2 * 128) + h)  # + router, LM head, norms
    assert mb.routed_expert_read_bytes == 2 * routed and mb.weight_read_bytes == dense_read + 2 * routed
    kv = rl.kv_bytes_per_token(layers, 4, 128, 16)
    for b in (1, 8, 32):
        want = dense_read + 2.0 * routed * (1 - (1 - 8 / 128) ** b) + b * 256 * kv
        assert rl.decode_bytes_per_step(mb, b, 256) == pytest.approx(want, rel=1e-12)
        assert rl.decode_roofline_tok_s(mb, b, 256, 3.35e12) == pytest.approx(b * 3.35e12 / want, rel=1e-12)
    assert rl.weight_read_bytes(mb, 1) == pytest.approx(dense_read + 2 * routed / 16, rel=1e-12)  # ~3B active
    active = mb.matmul_params - routed * (1 - 8 / 128)
    assert rl.active_matmul_params(mb) == pytest.approx(active, rel=1e-12)
    read_512 = dense_read + 2.0 * routed * (1 - (1 - 8 / 128) ** 512)  # 512 prompt tokens reach (nearly) every expert
    assert rl.prefill_floor_s(mb, 512, 989e12, 3.35e12) == pytest.approx(max(2 * active * 512 / 989e12,
                                                                             read_512 / 3.35e12), rel=1e-12)
    two = rl.per_gpu(mb, 2, kv // 2)  # experts shard like the other linears
    assert two.routed_expert_read_bytes == mb.routed_expert_read_bytes // 2 and two.experts == 128
