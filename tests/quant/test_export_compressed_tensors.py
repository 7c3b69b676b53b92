"""compressed-tensors export (quant/export/compressed_tensors.py) read back by the `compressed-tensors` package itself:
its packing, its per-format compressors' `decompress` on every exported Linear (bit for bit in the decompressor's
output dtype: fp16 for integer codes, whose scales are fp16; bfloat16 for FP4, whose codes and scales are also
compared exactly), and transformers' own loader (`from_pretrained`, which decompresses through the same package) on a
tiny random Llama and a tiny Mixtral / Qwen3-MoE; NVFP4 and MXFP4 codes; which methods may write the format."""
from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor  # a dev dependency (pyproject.toml), pinned
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from safetensors.torch import load_file

from harness.moe_unfuse import unfuse_experts
from quant.export.compressed_tensors import (
    COMPRESSED_TENSORS_VERSION, CompressedTensorsExportError, export_compressed_tensors, pack_int32,
)
from quant.export.names import CheckpointNames
from quant.formats.fp4 import e2m1_values
from quant.primitives import dequantize, quantize_tensor
from quant.surgery import quantizable_linears, quantize_linear_
from tests.quant.test_moe import TINY, tiny_moe


def tiny_llama(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.to(torch.float16)


def _fp16_moe(kind):
    m = tiny_moe(kind).to(torch.float16)
    unfuse_experts(m)
    return m


def _quantize(model, spec):
    """Every quantizable Linear through the harness's surgery; spec(name) -> (w_bit, group_size, zero_point, fmt)."""
    return {n: quantize_linear_(lin, *spec(n)) for n, lin in quantizable_linears(model).items()}


def _read(directory):
    config = json.loads((directory / "config.json").read_text())
    return load_file(str(directory / "model.safetensors")), config, QuantizationConfig.model_validate(
        config["quantization_config"])


def _scheme(qcfg: QuantizationConfig, name: str):
    """The config group whose targets name this Linear, else the one targeting every Linear."""
    groups = list(qcfg.config_groups.values())
    return next((g for g in groups if name in g.targets), None) or next(g for g in groups if "Linear" in g.targets)


def reference_decompress(directory) -> dict[str, torch.Tensor]:
    """Checkpoint module name -> its weight, decompressed by compressed-tensors' compressor for its scheme."""
    tensors, _, qcfg = _read(directory)
    out = {}
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        scheme = _scheme(qcfg, name)
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        out[name] = compressor.decompress(state, scheme)["weight"]
    return out


def _expected_int(qt) -> torch.Tensor:
    """The harness's dequantization with the scales as stored (fp16), rounded to fp16 once."""
    return dequantize(qt.q, qt.scales.half().float(), qt.zeros, qt.group_size).half()


def test_packing_is_compressed_tensors_pack_to_int32():
    import compressed_tensors

    assert compressed_tensors.__version__ == COMPRESSED_TENSORS_VERSION  # the release whose layout is written
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for shape in ((5, 64), (7, 100), (3, 33)):
            u = torch.randint(0, 1 << bits, shape, generator=g)
            signed = (u - (1 << (bits - 1))).to(torch.int8)  # compressed-tensors packs signed codes, offset
            assert torch.equal(pack_int32(u, bits), pack_to_int32(signed, bits)), (bits, shape)
            assert torch.equal(pack_int32(u.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0)), (bits, shape)
    with pytest.raises(CompressedTensorsExportError, match="0..15"):
        pack_int32(torch.tensor([[16]]), 4)


@torch.no_grad()
def test_dense_llama_mixed_schemes_round_trip(tmp_path):
    """Asymmetric 4-bit g16, symmetric 3-bit (densely packed, codes straddling words) and 8-bit per-channel Linears
    in one checkpoint: one config group per scheme; every Linear decompresses to the harness's dequantization."""
    model = tiny_llama()

    def spec(n):
        if n.endswith("down_proj"):
            return 8, -1, True, "int"
        return (3, 32, False, "int") if n.endswith("v_proj") else (4, 16, True, "int")

    qts = _quantize(model, spec)
    out = export_compressed_tensors(model, qts, tmp_path / "ct", quant_meta={"method": "rtn"})
    tensors, config, qcfg = _read(out)
    assert config["quantization_config"]["version"] == COMPRESSED_TENSORS_VERSION
    assert qcfg.quant_method == "compressed-tensors" and qcfg.quantization_status == "compressed"
    assert qcfg.format == "pack-quantized" and len(qcfg.config_groups) == 3
    assert qcfg.ignore == ["lm_head"]  # tied to the embedding, written once, left unquantized
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.float16
    by_bits = {g.weights.num_bits: g.weights for g in qcfg.config_groups.values()}
    assert (by_bits[4].strategy, by_bits[4].group_size, by_bits[4].symmetric) == ("group", 16, False)
    assert (by_bits[3].strategy, by_bits[3].group_size, by_bits[3].symmetric) == ("group", 32, True)
    assert (by_bits[8].strategy, by_bits[8].group_size) == ("channel", None)
    assert json.loads((out / "quant_meta.json").read_text())["method"] == "rtn"

    ref = reference_decompress(out)
    assert ref.keys() == qts.keys()
    for name, qt in qts.items():
        assert ref[name].dtype == torch.float16 and torch.equal(ref[name], _expected_int(qt)), name
        # and the codes themselves, through the package's unpacker
        shape = tensors[f"{name}.weight_shape"].tolist()
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], qt.w_bit, torch.Size(shape)).to(torch.int64)
        assert torch.equal(codes, qt.q.to(torch.int64) - (1 << (qt.w_bit - 1) if qt.zeros is not None else 0))
        if qt.zeros is not None:
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], qt.w_bit,
                                   torch.Size((shape[0], qt.zeros.shape[1])), packed_dim=0)
            assert torch.equal(zp.float() + (1 << (qt.w_bit - 1)), qt.zeros)


@pytest.mark.parametrize("zero_point", [True, False])
@torch.no_grad()
def test_transformers_loads_the_export(zero_point, tmp_path):
    """transformers' from_pretrained (compressed-tensors decompressing each Linear) gives the harness model's parameters
    exactly: the plain ones as exported (fp16), the quantized ones as dequantized.
    Symmetric codes go through its default path (modules compressed at load, decompressed with their own scheme at
    the first forward: two schemes here); asymmetric through `dequantize=True`, which takes one scheme for every dense
    Linear: transformers 5.24 with compressed-tensors 0.20.1 builds the compressed modules' zero points unpacked
    ([out, G]) on the meta device and re-initialises the packed ones it reads (a size mismatch)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_llama()
    if zero_point:
        qts = _quantize(model, lambda n: (4, 16, True, "int"))
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    else:
        qts = _quantize(model, lambda n: (8, -1, False, "int") if n.endswith("o_proj") else (4, 16, False, "int"))
        kw = {}
    out = export_compressed_tensors(model, qts, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, **kw)
    assert loaded(torch.arange(1, 17)[None]).logits.isfinite().all()  # without dequantize=True: decompresses
    expected = dict(model.state_dict())
    for name, qt in qts.items():
        expected[f"{name}.weight"] = _expected_int(qt)
    got = loaded.state_dict()
    assert {k for k in got if not k.endswith(("_scale", "_zero_point", "_shape"))} == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@torch.no_grad()
def test_moe_experts_keep_the_architecture_names(kind, tmp_path):
    """Each expert is its own Linear under the architecture's checkpoint names (Mixtral: block_sparse_moe.experts.N.w1,
    Qwen3-MoE: mlp.experts.N.gate_proj), exactly the names transformers' save_pretrained writes for the FP16 model;
    the router stays in fp16 and is ignored; every expert decompresses to the harness's dequantization."""
    model = _fp16_moe(kind)
    qts = _quantize(model, lambda n: (4, 16, True, "int"))
    out = export_compressed_tensors(model, qts, tmp_path / "ct")
    tensors, _, qcfg = _read(out)

    fp16 = tiny_moe(kind).to(torch.float16)
    fp16.save_pretrained(tmp_path / "fp16")
    saved = set(load_file(str(tmp_path / "fp16" / "model.safetensors")))
    names = CheckpointNames(model)
    quantized = {names.module(n) for n in qts}
    written = {k for k in tensors if not k.startswith(tuple(f"{q}.weight_" for q in quantized))}
    assert written | {f"{q}.weight" for q in quantized} == saved
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    gate, up = ("w1", "w3") if kind == "mixtral" else ("gate_proj", "up_proj")
    assert {f"model.layers.1.{block}.experts.3.{gate}", f"model.layers.1.{block}.experts.3.{up}"} <= quantized
    router = f"model.layers.1.{block}.gate"
    assert router in qcfg.ignore and tensors[f"{router}.weight"].dtype == torch.float16

    ref = reference_decompress(out)
    assert ref.keys() == quantized
    for name, qt in qts.items():
        assert torch.equal(ref[names.module(name)], _expected_int(qt)), name


@torch.no_grad()
def test_transformers_loads_a_symmetric_mixtral(tmp_path):
    """transformers merges the per-expert tensors into its fused experts; symmetric codes only: transformers 5.24
    drops an expert's weight_zero_point (huggingface/transformers PR 47430) and NVFP4's weight_global_scale (issue
    48371) when it merges experts, so asymmetric and NVFP4 experts are checked through the compressors above."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = _fp16_moe("mixtral")
    qts = _quantize(model, lambda n: (4, 16, False, "int"))
    out = export_compressed_tensors(model, qts, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    unfuse_experts(loaded)
    got = loaded.state_dict()
    for name, qt in qts.items():
        assert torch.equal(got[f"{name}.weight"], _expected_int(qt)), name
    assert torch.equal(got["model.layers.0.mlp.gate.weight"], model.state_dict()["model.layers.0.mlp.gate.weight"])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@torch.no_grad()
def test_fp4_round_trip(fmt, tmp_path):
    """NVFP4 (also an MoE's experts) and MXFP4: the package's unpacked codes and scales are the harness's exactly, and
    its decompressor's weight (bfloat16) is the harness's float32 dequantization rounded to bfloat16."""
    model = tiny_llama() if fmt == "mxfp4" else _fp16_moe("qwen3_moe")  # MXFP4's block of 32 needs in % 32 == 0
    qts = _quantize(model, lambda n: (4, 16 if fmt == "nvfp4" else 32, False, fmt))
    out = export_compressed_tensors(model, qts, tmp_path / "ct")
    tensors, _, qcfg = _read(out)
    (group,) = qcfg.config_groups.values()
    preset = preset_name_to_scheme(f"{fmt.upper()}A16", ["Linear"])
    assert group.weights.model_dump(mode="json") == preset.weights.model_dump(mode="json")
    assert qcfg.format == f"{fmt}-pack-quantized"

    names = CheckpointNames(model)
    ref = reference_decompress(out)
    for name, qt in qts.items():
        ck = names.module(name)
        out_f, in_f = qt.q.shape
        codes = unpack_fp4_from_uint8(tensors[f"{ck}.weight_packed"], out_f, in_f, dtype=torch.float32)
        values = e2m1_values(qt.q)
        assert torch.equal(codes, values) and torch.equal(torch.signbit(codes), torch.signbit(values))  # -0 kept
        assert torch.equal(tensors[f"{ck}.weight_scale"].view(torch.uint8), qt.scales.view(torch.uint8))
        if fmt == "nvfp4":  # the divisor form, 448 * 6 / amax, as compressed-tensors' generate_gparam
            assert torch.equal(tensors[f"{ck}.weight_global_scale"], qt.global_scale)
        assert ref[ck].dtype == torch.bfloat16 and torch.equal(ref[ck], qt.dequantize(torch.float32).bfloat16()), name


def test_which_methods_write_the_format():
    """AWQ stays the first format of the integer methods (existing exports unchanged); FP4 configs have
    compressed-tensors only, which LMDeploy's backend does not take; SmoothQuant and fp16 are refused."""
    from harness.compose import compose
    from harness.config import ConfigError
    from quant.export import format_for, formats_of
    from quant.export.compressed_tensors import check_compressed_tensors_config

    for option in ("rtn_w4", "awq_w4", "gptq_w4", "autoround_w4", "recipe_awq_gptq_w4", "awq_w3"):
        q = compose([f"quant={option}"]).quant
        assert format_for(q).name == "awq", option
        assert format_for(q, ("compressed-tensors",)).name == "compressed-tensors", option
        check_compressed_tensors_config(q)
    for option in ("rtn_nvfp4", "gptq_nvfp4", "rtn_mxfp4", "gptq_mxfp4"):
        q = compose([f"quant={option}"]).quant
        assert formats_of(q) == ("compressed-tensors",), option
        check_compressed_tensors_config(q)
        with pytest.raises(ConfigError, match=r"its formats are compressed-tensors; this needs one of awq"):
            format_for(q, ("awq", "smooth_quant"))
    with pytest.raises(CompressedTensorsExportError,
                       match=r"^quant\.method: smoothquant — its checkpoint formats are smooth_quant"):
        check_compressed_tensors_config(compose(["quant=smoothquant_w8a8"]).quant)
    with pytest.raises(CompressedTensorsExportError, match=r"^quant\.method=fp16"):
        check_compressed_tensors_config(compose(["quant=fp16"]).quant)
    with torch.device("meta"):  # against the shapes, before any weight: 64 does not divide down_proj's 96 inputs
        skeleton = tiny_llama().to("meta")
    check_compressed_tensors_config(compose(["quant=rtn_w4", "quant.group_size=32"]).quant, skeleton)
    with pytest.raises(CompressedTensorsExportError, match=r"quant\.group_size=64 does not divide in_features=96"):
        check_compressed_tensors_config(compose(["quant=rtn_w4"]).quant, skeleton)


@torch.no_grad()
def test_codes_that_do_not_describe_the_model_are_refused(tmp_path):
    model = tiny_llama()
    qts = _quantize(model, lambda n: (4, 16, True, "int"))
    name = "model.layers.0.mlp.down_proj"
    bad = dict(qts, **{name: quantize_tensor(model.get_submodule(name).weight.float() * 2, 4, 16, True)})
    with pytest.raises(CompressedTensorsExportError, match="down_proj"):
        export_compressed_tensors(model, bad, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    fp4 = _quantize(tiny_llama(), lambda n: (4, 16, False, "nvfp4"))
    with pytest.raises(CompressedTensorsExportError, match="FP4 codes"):
        export_compressed_tensors(model, fp4, tmp_path / "ct")
