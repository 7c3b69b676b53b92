"""The W4A16 kernel registry (quant/kernels/w4a16.py), its kernels' weights against the harness's own dequantization,
and LMDeploy's W4A16 builder swap (backends/lmdeploy_w4a16.py), on the CPU; the CUDA kernels on a GPU."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from quant.kernels.w4a16 import (W4A16KernelError, kernel_weight, packed_bytes, resolve, swap_w4a16_linears)
from quant.primitives import quantize_tensor

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()


def awq_weight(qt, dtype=torch.float16) -> torch.Tensor:
    """The AWQ checkpoint's weights: (q - z) * s with s rounded to the checkpoint's fp16, in float64 then `dtype`."""
    g = qt.group_size
    s = qt.scales.to(dtype).double().repeat_interleave(g, 1)
    return ((qt.q.double() - qt.zeros.double().repeat_interleave(g, 1)) * s).to(dtype)


@pytest.fixture(scope="module")
def qt():
    return quantize_tensor(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05, 4, 64)


def test_auto_picks_a_real_kernel_and_names_what_it_skipped(qt):
    k, skipped = resolve("auto", "cpu", torch.bfloat16, {"a": qt})
    assert k.name == "tinygemm" and not k.exact and skipped == []
    w3 = quantize_tensor(torch.randn(64, 128), 3, 64)
    k, skipped = resolve("auto", "cpu", torch.bfloat16, {"a": qt, "b": w3})
    assert k.name == "dequant" and "tinygemm" in skipped[0] and "w_bit=3" in skipped[0]
    with pytest.raises(W4A16KernelError, match="CUDA only"):
        resolve("gemlite", "cpu", torch.float16, {"a": qt})
    with pytest.raises(W4A16KernelError, match="choose one of auto, gemlite, tinygemm, dequant"):
        resolve("marlin", "cpu", torch.float16, {"a": qt})


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(c).eval()


@pytest.mark.parametrize("kernel", ["dequant", "tinygemm"])
def test_swap_replaces_every_quantized_linear_and_keeps_the_rest(kernel):
    model = _tiny()
    lin = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    qts = {n: quantize_tensor(m.weight.detach(), 4, 32) for n, m in lin.items()}
    info = swap_w4a16_linears(model, qts, kernel)
    assert info["kernel"] == kernel and info["n_linears"] == len(lin) == 14
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in lin)
    assert isinstance(model.lm_head, nn.Linear)
    pb = packed_bytes(model)
    assert pb["n_w4a16_linears"] == 14 and pb["w4a16_bytes"] > 0 and pb["other_bytes"] > 0
    name = "model.layers.1.mlp.down_proj"
    mod = model.get_submodule(name)
    if kernel == "dequant":  # the simulation's weights, bit for bit
        assert torch.equal(mod.weight, qts[name].dequantize(torch.float32))
    else:  # tinygemm multiplies by its own float-zero weights (quant/kernels/int4_linear.kernel_dequantize)
        from quant.kernels.int4_linear import kernel_dequantize

        w = kernel_weight(mod, mod.in_features, torch.bfloat16, "cpu")
        ref = kernel_dequantize(qts[name])
        assert (w - ref).abs().max() <= ref.abs().max() * 2 ** -7
        # and against AWQ's weights: the bf16 rounding of scale and float zero, nothing more
        step = qts[name].scales.repeat_interleave(32, 1)
        assert ((ref - awq_weight(qts[name], torch.float32)).abs() / step).max() < 0.1
    with pytest.raises(W4A16KernelError, match="not an nn.Linear"):
        swap_w4a16_linears(model, {name: qts[name]}, kernel)


GEMLITE_INTERPRETED = textwrap.dedent('''
    import json, sys, types, torch
    import triton
    # gemlite asks the CUDA driver for the GPU at import; Triton's interpreter runs its kernels on the CPU
    torch.cuda.get_device_capability = lambda *a: (9, 0)
    torch.cuda.get_device_properties = lambda *a: types.SimpleNamespace(name="NVIDIA H100 80GB HBM3",
                                                                         multi_processor_count=132, major=9, minor=0)
    class _Target: backend, arch, warp_size = "cuda", 90, 32
    class _Driver:
        def get_current_target(self): return _Target()
        def get_current_device(self): return 0
        def get_device_interface(self): return torch.cuda
        class utils:
            @staticmethod
            def get_device_properties(i): return {"max_shared_mem": 232448, "multiprocessor_count": 132}
    triton.runtime.driver._active = _Driver()
    import gemlite
    gemlite.set_autotune(False)  # one config per kernel: nothing to time in the interpreter
    from gemlite import DType, GemLiteLinearTriton
    from quant.kernels.gemlite_linear import pack_inputs
    from quant.primitives import quantize_tensor
    out = {}
    for n, k, g in ((64, 128, 64), (32, 64, 32)):  # ~20 s in the interpreter
        qt = quantize_tensor(torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.05, 4, g)
        lin = GemLiteLinearTriton(W_nbits=4, group_size=g, in_features=k, out_features=n,
                                  input_dtype=DType.FP16, output_dtype=DType.FP16)
        lin.pack(*pack_inputs(qt, torch.float16), bias=None, fma_mode=False)
        eye = torch.eye(k, dtype=torch.float16)
        # gemlite's one-token path (GEMV_REVSPLITK: one program per row), what a decode step runs, on the identity
        w = lin.forward_manual(eye, "GEMV_REVSPLITK").t()
        torch.save({"w": w, "q": qt.q, "scales": qt.scales, "zeros": qt.zeros, "g": g}, sys.argv[1] + f"/{n}.pt")
''')


@pytest.mark.skipif(importlib.util.find_spec("gemlite") is None, reason="gemlite is in the dev extra")
@pytest.mark.skipif(CUDA, reason="a CPU check (a faked driver); on a GPU test_cuda_kernel_weights runs the real one")
def test_gemlite_multiplies_by_awqs_weights_bit_for_bit_through_tritons_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", GEMLITE_INTERPRETED, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from quant.primitives import QTensor

    for n in (64, 32):
        d = torch.load(tmp_path / f"{n}.pt")
        qt = QTensor(d["q"], d["scales"], d["zeros"], 4, d["g"])
        assert torch.equal(d["w"], awq_weight(qt)), n  # every weight, every bit


@pytest.mark.skipif(not CUDA, reason="CUDA kernels")
@pytest.mark.parametrize("kernel", ["gemlite", "tinygemm", "dequant"])
def test_cuda_kernel_weights(qt, kernel):
    from quant.kernels.int4_linear import kernel_dequantize
    from quant.kernels.w4a16 import KERNELS, _load_all

    _load_all()
    if kernel == "gemlite":
        pytest.importorskip("gemlite")
    dtype = torch.bfloat16 if kernel == "tinygemm" else torch.float16
    mod = KERNELS.get(kernel).build(qt, None, dtype, torch.device("cuda"), "t")
    w = kernel_weight(mod, 128, dtype, "cuda").cpu()
    if kernel == "tinygemm":
        assert (w - kernel_dequantize(qt)).abs().max() <= kernel_dequantize(qt).abs().max() * 2 ** -7
    elif kernel == "gemlite":
        assert torch.equal(w.half(), awq_weight(qt))
    else:
        assert torch.equal(w.half(), qt.dequantize(torch.float32).half())
    x = torch.randn(32, 128, device="cuda", dtype=dtype)  # the larger-batch paths (split-K GEMM) too
    ref = x.float() @ w.cuda().t()
    assert ((mod(x).float() - ref).norm() / ref.norm()) < 1e-2


# ------------------------------------------------------------------------------------------- LMDeploy's builder


@pytest.fixture
def fake_lmdeploy(monkeypatch):
    """LMDeploy's builder module as the engine sees it (lmdeploy 0.18: awq_modules._build_linear_w4a16)."""
    from backends import lmdeploy_w4a16 as lw

    mod = types.ModuleType(lw.BUILDER_MODULE)

    def engine_builder(spec):
        return "engine impl"

    mod._build_linear_w4a16 = engine_builder
    monkeypatch.setitem(sys.modules, lw.BUILDER_MODULE, mod)
    yield mod, engine_builder
    lw.uninstall()


def test_lmdeploy_builder_swap_is_applied_used_and_undone(qt, fake_lmdeploy):
    from backends import lmdeploy_w4a16 as lw
    from quant.export.awq import qtensor_to_awq

    mod, engine_builder = fake_lmdeploy
    assert lw.installed_kernel() == "engine"
    lw.install("tinygemm")
    assert lw.installed_kernel() == "tinygemm" and mod._build_linear_w4a16 is not engine_builder
    spec = types.SimpleNamespace(in_features=128, out_features=64, w_bit=4, group_size=64)
    impl = mod._build_linear_w4a16(spec)
    t = qtensor_to_awq(qt)  # what the engine loads from an exported AWQ GEMM checkpoint
    back = impl.update_weights(t["qweight"], t["scales"], t["qzeros"], None)
    assert all(a is b for a, b in zip(back, (t["qweight"], t["scales"], t["qzeros"])))
    assert lw.built_layers() == {"layers": 1, "kernel": "tinygemm"}
    x = torch.randn(3, 128, dtype=torch.float16)
    y = impl.forward(x, t["qweight"], t["scales"], t["qzeros"], None)
    ref = x.double() @ awq_weight(qt).double().t()
    assert y.shape == (1, 3, 64) and ((y[0].double() - ref).norm() / ref.norm()) < 1e-2
    lw.install("engine")  # the engine's own kernel again
    assert mod._build_linear_w4a16 is engine_builder and lw.installed_kernel() == "engine"
    with pytest.raises(ValueError, match="choose one of engine, gemlite, tinygemm, hybrid"):
        lw.install("marlin")
    assert lw.label("gemlite") == "LMDeploy PyTorch engine + gemlite W4A16"


def test_the_hybrid_impl_sends_small_calls_to_the_harness_kernel_and_large_ones_to_the_engines(qt, fake_lmdeploy):
    """backend.w4a16_kernel=hybrid: calls of at most 8 tokens (decode at small batches) through the harness's kernel,
    larger ones (prefill, batch 32) through the engine's own implementation, which keeps the tensors it loaded."""
    from backends import lmdeploy_w4a16 as lw
    from quant.export.awq import qtensor_to_awq

    class EngineImpl:  # LMDeploy's AwqLinearW4A16Impl as the engine holds it: its forward reads the AWQ tensors
        def __init__(self):
            self.loaded = None

        def update_weights(self, qweight, scales, qzeros, bias=None):
            self.loaded = (qweight.clone(), scales, qzeros)
            return self.loaded + (bias,)

        def forward(self, x, qweight, scales, qzeros, bias=None, all_reduce=False, group=None):
            from quant.export.awq import awq_to_qtensor

            w = awq_weight(awq_to_qtensor(qweight, qzeros, scales)).float()
            return (x.float() @ w.t()).half().reshape(1, -1, w.shape[0])

    spec = types.SimpleNamespace(in_features=128, out_features=64, w_bit=4, group_size=64)
    engine = EngineImpl()
    impl = lw.HybridW4A16Impl(engine, spec, small_kernel="tinygemm")  # gemlite needs CUDA: torch's int4 here
    t = qtensor_to_awq(qt)
    back = impl.update_weights(t["qweight"], t["scales"], t["qzeros"], None)
    assert back[0] is engine.loaded[0] and torch.equal(back[0], t["qweight"])  # the engine's own tensors go back
    ref_w = awq_weight(qt).double()
    for tokens, side in ((1, "small"), (8, "small"), (9, "engine"), (32, "engine")):
        x = torch.randn(tokens, 128, dtype=torch.float16)
        before = dict(impl.calls)
        y = impl.forward(x, *back[:3])
        assert impl.calls[side] == before[side] + 1, (tokens, side)
        ref = x.double() @ ref_w.t()
        assert y.shape == (1, tokens, 64) and ((y[0].double() - ref).norm() / ref.norm()) < 1e-2
    # installed: the builder wraps LMDeploy's own builder's impl
    mod, engine_builder = fake_lmdeploy
    lw.install("hybrid")
    built = mod._build_linear_w4a16(spec)
    assert isinstance(built, lw.HybridW4A16Impl) and built.engine == "engine impl"
    assert "both packings held" in lw.label("hybrid")
