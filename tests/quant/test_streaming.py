"""Blocks streamed from disk (quant/streaming.py): a streamed quantization gives the in-memory path's codes bit for bit
(RTN, AWQ, GPTQ) and, straight to the export, its AWQ GEMM checkpoint tensor for tensor; synthetic weights generated
block by block equal the file-backed synthetic checkpoint; what cannot stream is refused before any work; and host
memory stays bounded: measured in a subprocess on a checkpoint many blocks larger than the bound, beside the same
process loading that model whole (which the bound must catch)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness import synthetic
from quant import METHODS, QuantContext
from quant.awq.config import AWQConfig
from quant.export.awq import export_awq
from quant.export.awq_shards import AWQShardWriter
from quant.gptq.config import GPTQConfig
from quant.rtn import RTNConfig
from harness.architectures import architecture_for
from quant.streaming import StreamingError, open_streamed

CONFIGS = {"rtn": RTNConfig(w_bit=4, group_size=64),
           "awq": AWQConfig(w_bit=4, group_size=64, search_samples=2, n_grid=4, clip_n_grid=4, clip_tokens=64),
           "gptq": GPTQConfig(w_bit=4, group_size=64)}
VOCAB = 256


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random Llama (3 blocks, grouped-query attention, untied head) saved in fp16 as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).half().save_pretrained(d)
    return d


def _samples():
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


_REFERENCE: dict = {}


def _in_memory(model_dir, qcfg):
    """The whole model loaded and quantized in place (the path streaming must reproduce), once per method."""
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), qcfg.method)
    if key not in _REFERENCE:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        s = _samples()
        _REFERENCE[key] = model, METHODS.get(qcfg.method)(model, qcfg, QuantContext(lambda: s, progress=False))
    return _REFERENCE[key]


def _streamed(qcfg, sink=None, **where):
    model, place = open_streamed(device="cpu", dtype=torch.float32, sink=sink, **where)
    s = _samples()
    return model, place, METHODS.get(qcfg.method)(model, qcfg, QuantContext(lambda: s, progress=False,
                                                                            placement=place))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_streamed_codes_are_the_in_memory_codes_bit_for_bit(method, tiny_llama):
    qcfg = CONFIGS[method]
    _, ref = _in_memory(tiny_llama, qcfg)
    model, place, out = _streamed(qcfg, model_dir=tiny_llama)
    assert out.qtensors.keys() == ref.qtensors.keys() and len(out.qtensors) == 3 * 7
    for name, qt in out.qtensors.items():
        r = ref.qtensors[name]
        assert torch.equal(qt.q, r.q) and torch.equal(qt.scales, r.scales) and torch.equal(qt.zeros, r.zeros), name
    # the quantized Linears' weights were released after their block's turn; the small tensors stayed (AWQ's folds)
    blocks = model.model.layers
    assert all(blocks[i].mlp.down_proj.weight.device.type == "meta" for i in range(3))
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if "norm" in n)
    s = out.summary
    assert s["placement"]["codes"] == "host" and s["placement"]["blocks_read"] == 3
    assert s["host_memory"]["host_peak_rss_bytes"] >= s["host_memory"]["host_rss_start_bytes"] > 0
    assert s["weight_bytes"] == ref.summary["weight_bytes"]  # the bytes count from shapes, not from weights


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_codes_straight_to_the_export_equal_the_in_memory_export(method, tiny_llama, tmp_path):
    """Codes packed and written block by block (none kept) give the checkpoint export_awq writes from the in-memory
    run, tensor for tensor, norms with AWQ's folded scales included; the QTensors left behind are shells."""
    from safetensors.torch import load_file

    qcfg = CONFIGS[method]
    ref_model, ref = _in_memory(tiny_llama, qcfg)
    export_awq(ref_model, ref.qtensors, tmp_path / "ref")
    model, place, out = _streamed(qcfg, sink=AWQShardWriter(tmp_path / "streamed"), model_dir=tiny_llama)
    assert all(qt.q.device.type == "meta" for qt in out.qtensors.values())
    assert out.summary["placement"]["codes"] == "export"
    place.sink.finish(model, out.qtensors)
    want = load_file(str(tmp_path / "ref" / "model.safetensors"))
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(tmp_path / "streamed" / f)))
    assert got.keys() == want.keys() == index["weight_map"].keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    a = json.loads((tmp_path / "ref" / "config.json").read_text())["quantization_config"]
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"] == a


def test_synthetic_blocks_generated_alone_equal_the_file(tmp_path):
    """harness.synthetic makes any block's tensors from (seed, tensor name) alone, equal to the checkpoint file it
    writes (several shards); a streamed quantization from the seed gives the file's codes."""
    from safetensors import safe_open

    arch = synthetic.load_arch("llama2-7b", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)
    old = synthetic.SHARD_BYTES
    synthetic.SHARD_BYTES = 200_000  # several shards, so blocks span files
    try:
        d = synthetic.write_checkpoint(arch, tmp_path / "syn", synthetic.WeightFormat(), seed=3)
    finally:
        synthetic.SHARD_BYTES = old
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    file = {}
    for f in set(index.values()):
        with safe_open(str(d / f), "pt") as h:
            file.update({k: h.get_tensor(k) for k in h.keys()})
    made = synthetic.outside_tensors(arch, seed=3)
    for i in reversed(range(3)):  # any order
        made.update(synthetic.block_tensors(arch, i, seed=3))
    assert made.keys() == file.keys()
    assert all(torch.equal(made[k], file[k]) for k in file)
    assert not torch.equal(synthetic.block_tensors(arch, 0, seed=4)["model.layers.0.mlp.up_proj.weight"],
                           made["model.layers.0.mlp.up_proj.weight"])
    assert synthetic.read_marker(d)["generator"] == synthetic.GENERATOR

    _, _, from_file = _streamed(CONFIGS["rtn"], model_dir=d)
    _, _, from_seed = _streamed(CONFIGS["rtn"], synthetic_arch=arch, seed=3)
    assert from_file.qtensors.keys() == from_seed.qtensors.keys()
    assert all(torch.equal(from_file.qtensors[k].q, from_seed.qtensors[k].q) for k in from_file.qtensors)
    assert "generated block by block" in from_seed.summary["placement"]["stream"]


def test_a_mixture_of_experts_streams_from_the_seed(tmp_path):
    """A tiny Mixtral (4 experts, top-2) streamed from the seed, AWQ with per-expert statistics: the codes of the same
    weights held whole in memory, and the expert token counts recorded the same (the Mixtral-8x7B shape's path)."""
    from harness.architectures import get_blocks
    from quant.streaming import SyntheticBlocks, _fill, streamed_model, synthetic_config

    hf = {**synthetic.load_arch("mixtral-8x7b").hf_config, "hidden_size": 128, "intermediate_size": 256,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
          "num_local_experts": 4}
    arch = synthetic.Arch("mixtral-tiny", "mixtral", hf, "test")
    qcfg = CONFIGS["awq"]
    whole = streamed_model(synthetic_config(arch), torch.float32, SyntheticBlocks(arch, 2))
    for i, block in enumerate(get_blocks(whole, architecture_for(whole))):
        _fill(block, f"model.layers.{i}.", synthetic.block_tensors(arch, i, seed=2), torch.device("cpu"))
    s = _samples()
    ref = METHODS.get("awq")(whole, qcfg, QuantContext(lambda: s, progress=False))
    model, place, out = _streamed(qcfg, sink=AWQShardWriter(tmp_path / "streamed"), synthetic_arch=arch, seed=2)
    assert out.qtensors.keys() == ref.qtensors.keys() and sum(".experts." in k for k in out.qtensors) == 2 * 4 * 3
    assert out.summary["moe"]["calibration"]["expert_tokens"] == ref.summary["moe"]["calibration"]["expert_tokens"]
    # the codes went straight to the checkpoint under Mixtral's own names (block_sparse_moe.experts.N.w1/w3/w2),
    # tensor for tensor what export_awq writes from the whole model
    from safetensors.torch import load_file

    place.sink.finish(model, out.qtensors)
    export_awq(whole, ref.qtensors, tmp_path / "ref")
    want = load_file(str(tmp_path / "ref" / "model.safetensors"))
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(tmp_path / "streamed" / f)))
    assert got.keys() == want.keys() and any(".block_sparse_moe.experts.3.w2.qweight" in k for k in got)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    config = lambda d: json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert config("streamed") == config("ref")


@pytest.mark.parametrize("method, fields, why", [
    ("smoothquant", {}, "methods that stream: awq, gptq, rtn"),
    ("awq_gptq", {}, "more than one"),
    ("recipe", {"steps": [{"method": "awq"}, {"method": "gptq"}]}, "more than one"),
    ("awq", {"round_weights": False}, "round_weights=false"),
])
def test_what_cannot_stream_is_refused_before_any_work(method, fields, why, tiny_llama):
    from harness.config import QUANT_CONFIGS

    cfg = QUANT_CONFIGS.get(method)(**fields)
    model, place = open_streamed(device="cpu", dtype=torch.float32, model_dir=tiny_llama)

    def no_calibration():
        raise AssertionError("drew calibration data before refusing")

    with pytest.raises(StreamingError, match=why):
        METHODS.get(method)(model, cfg, QuantContext(no_calibration, progress=False, placement=place))
    assert place.state["done"] == set()  # no block was read


def test_a_block_is_read_once_and_resume_checkpoints_are_refused(tiny_llama, tmp_path):
    model, place = open_streamed(device="cpu", dtype=torch.float32, model_dir=tiny_llama)
    block = model.model.layers[1]
    with place.block(block):
        assert block.self_attn.q_proj.weight.device.type == "cpu"
    with pytest.raises(StreamingError, match="second time"):
        with place.block(block):
            pass
    s = _samples()
    with pytest.raises(StreamingError, match="checkpoint"):
        METHODS.get("rtn")(model, CONFIGS["rtn"], QuantContext(lambda: s, progress=False, placement=place,
                                                               checkpoint_dir=tmp_path / "ckpt"))


def test_a_checkpoint_named_otherwise_is_refused_naming_the_tensor(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "renamed"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama / "config.json").read_text())
    t = load_file(str(tiny_llama / "model.safetensors"))
    t["model.layers.2.mlp.gate.weight"] = t.pop("model.layers.2.mlp.gate_proj.weight")
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(StreamingError, match="model.layers.2.mlp.gate_proj.weight"):
        _streamed(CONFIGS["rtn"], model_dir=d)


# ------------------------------------------------------------------------------------------------ host memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from transformers import AutoConfig, AutoModelForCausalLM
    from quant import METHODS, QuantContext
    from quant.export.awq_shards import AWQShardWriter
    from quant.onload import HostPeak
    from quant.rtn import RTNConfig
    from quant.streaming import SafetensorsBlocks, StreamingPlacement, streamed_model

    d, layers, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cfg = AutoConfig.from_pretrained(d)
    whole_model = layers == cfg.num_hidden_layers
    cfg.num_hidden_layers = layers  # the first `layers` blocks of the checkpoint
    source = SafetensorsBlocks(d)
    model = streamed_model(cfg, torch.float32, source)
    place = StreamingPlacement.of("cpu", model, source, AWQShardWriter(out))
    res = METHODS.get("rtn")(model, RTNConfig(w_bit=4, group_size=128),
                             QuantContext(lambda: None, progress=False, placement=place))
    place.sink.finish(model, res.qtensors)
    got = {"streamed": res.summary["host_memory"], "blocks_read": len(place.state["done"])}
    if whole_model:
        with HostPeak() as whole:  # the control: the same checkpoint loaded whole, as the in-memory path does
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        got["whole"] = whole.summary()
    print(json.dumps(got))
""")


def _memory_run(model_dir: Path, layers: int, out: Path) -> dict:
    import os

    # tensors of 1 MiB and more in their own mappings, returned to the system when freed, as a 7B's tensors (32-90 MB,
    # above glibc's largest dynamic mmap threshold) always are: without it, the heap's fragmentation from this small
    # model's 2-6 MB tensors adds noise that grows with the number of blocks
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(model_dir), str(layers), str(out)],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["blocks_read"] == layers and (out / "model.safetensors.index.json").exists()
    return got


@pytest.mark.slow  # two fresh processes and a 230 MB checkpoint: about a minute; guards the streaming claim
def test_host_memory_stays_within_a_few_blocks_on_a_model_many_blocks_larger(tmp_path):
    """A 16-block Llama (230 MB in fp16 on disk, 480 MB as the fp32 model it is quantized in) quantized streamed
    (RTN), codes straight to the export, each run in a fresh process: the host memory the quantization adds is the
    same, within one block, for the first 4 blocks and for all 16 (a per-block working set, whatever the depth), and
    below 40% of the model; the same process loading the model whole grows by the model's size, so the measurement
    sees a whole-model load when there is one."""
    arch = memory_arch(16)
    d = synthetic.write_checkpoint(arch, tmp_path / "syn", synthetic.WeightFormat(), seed=0)
    shallow = _memory_run(d, 4, tmp_path / "awq4")["streamed"]["host_peak_growth_bytes"]
    deep_run = _memory_run(d, 16, tmp_path / "awq16")
    check_host_growth(arch, shallow, deep_run["streamed"]["host_peak_growth_bytes"],
                      deep_run["whole"]["host_peak_growth_bytes"])


def memory_arch(layers: int):
    """The Llama the host-memory tests stream: 768 wide, `layers` blocks (about 14 MB each in fp16)."""
    return synthetic.load_arch("llama2-7b", hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                               num_attention_heads=12, num_key_value_heads=12, vocab_size=2048)


def check_host_growth(arch, shallow: int, deep: int, whole: int) -> None:
    """Host growth of a streamed run over 4 blocks (`shallow`) and over every block of `arch` (`deep`) differs by
    less than one fp32 block (plus 32 MiB of slack) and stays below 40% of the fp32 model, while loading the model
    whole (`whole`) grows by nearly all of it."""
    block = sum(4 * torch.Size(t.shape).numel() for t in synthetic.block_specs(arch)[1][0])
    model = sum(4 * torch.Size(t.shape).numel() for t in arch.tensors())
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    msg = f"growth: 4 blocks {mib(shallow)}, 16 blocks {mib(deep)}, whole load {mib(whole)}; block {mib(block)}"
    assert deep - shallow < block + (32 << 20), msg
    assert deep < 0.4 * model, msg
    assert whole > 0.9 * model, msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_streamed_on_a_gpu_gives_the_whole_model_on_the_gpus_codes(method, tiny_llama, tmp_path):
    """On a GPU: blocks read from the file (through the pinned staging buffer) or generated on the GPU from the seed
    quantize to the codes of the whole model quantized on the GPU, bit for bit."""
    from transformers import AutoModelForCausalLM

    from quant.onload import Placement

    qcfg, s = CONFIGS[method], _samples()
    whole = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).cuda().eval()
    ref = METHODS.get(method)(whole, qcfg, QuantContext(lambda: s, progress=False,
                                                        placement=Placement(torch.device("cuda"), False)))
    model, place = open_streamed(device="cuda", dtype=torch.float16, model_dir=tiny_llama)
    out = METHODS.get(method)(model, qcfg, QuantContext(lambda: s, progress=False, placement=place))
    for name, qt in out.qtensors.items():
        assert qt.q.device.type == "cpu"
        assert torch.equal(qt.q, ref.qtensors[name].q.cpu()), name
        assert torch.equal(qt.scales, ref.qtensors[name].scales.cpu()), name

    arch = synthetic.load_arch("llama2-7b", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)
    d = synthetic.write_checkpoint(arch, tmp_path / "syn", synthetic.WeightFormat(), seed=5, device="cuda")
    runs = []
    for where in ({"model_dir": d}, {"synthetic_arch": arch, "seed": 5}):
        model, place = open_streamed(device="cuda", dtype=torch.float16, **where)
        runs.append(METHODS.get(method)(model, qcfg, QuantContext(lambda: s, progress=False, placement=place)))
    assert all(torch.equal(runs[0].qtensors[k].q, runs[1].qtensors[k].q) for k in runs[0].qtensors)


@pytest.mark.parametrize("name", sorted(p.stem for p in synthetic.ARCH_DIR.glob("*.json")))
def test_every_synthetic_architecture_names_each_parameter_of_its_model(name):
    """Streamed from the seed, a block holds exactly the tensors of Architecture.tensors: each architecture file's
    tensor list, at small widths, names every parameter of the model transformers builds from it (a norm the list
    left out, such as Qwen3's per-head q_norm/k_norm, stops a streamed run at its first block)."""
    from quant.streaming import skeleton, synthetic_config

    small = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
             "num_local_experts": 4, "num_experts": 4}
    full = synthetic.load_arch(name)
    if full.remote_code:
        pytest.skip(f"{name} is remote code (streamed from its checkpoint file, not from the seed)")
    arch = synthetic.load_arch(name, **{k: v for k, v in small.items() if k in full.hf_config or k == "head_dim"})
    model = skeleton(synthetic_config(arch), torch.float32)
    listed = {t.name if t.name.endswith(".weight") or t.kind == "norm" else t.name + ".weight" for t in arch.tensors()}
    tied = {"lm_head.weight"} if arch.hf_config.get("tie_word_embeddings") else set()  # the embedding, tied at load
    assert listed == set(dict(model.named_parameters())) - tied
