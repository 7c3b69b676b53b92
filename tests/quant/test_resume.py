"""Resume inside a long quantization (#15) and the runner's propagation option (#16): a run killed after some blocks
goes on from the first block not checkpointed and ends with the same tensors, bit for bit, as a run never
interrupted; the next block calibrates on the fp16 or the quantized block's outputs, as asked."""
from __future__ import annotations

import copy
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.architectures import architecture_for
from harness.assets import REPO_ROOT
from harness.config import CalibConfig
from quant.awq.config import AWQConfig
from quant import METHODS, QuantContext, quantized_cache
from quant.awq.method import AWQBlocks
from quant.calibration.checkpoint import BlockCheckpoints
from quant.calibration.runner import BlockResult, Keep, run_sequential
from quant.surgery import quantize_linear_
from tests.quant.test_awq import _calib, _truncated


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _tensors(model, outcome) -> dict:
    out = {f"params.{k}": v for k, v in model.state_dict().items()}
    for n, q in outcome.qtensors.items():
        out[f"codes.{n}"], out[f"scales.{n}"], out[f"zeros.{n}"] = q.q, q.scales, q.zeros
    return out


class _Crash(Exception):
    pass


@pytest.mark.parametrize("propagate", ["fp16", "quantized"])
def test_a_run_that_died_resumes_from_its_checkpoints_bit_for_bit(propagate, smollm2_fp32, calib_ids, tmp_path,
                                                                 monkeypatch):
    base = _truncated(smollm2_fp32, 3)
    cfg = AWQConfig(w_bit=4, group_size=64, search_samples=2, n_grid=3, clip_n_grid=3, clip_tokens=0,
                      propagate=propagate, calib=CalibConfig(n_samples=4, seqlen=32))
    samples = _calib(calib_ids, 4, 32)
    ref_model = copy.deepcopy(base)
    ref = METHODS.get("awq")(ref_model, cfg, QuantContext(lambda: samples, progress=False))

    monkeypatch.setenv("QH_CACHE", str(tmp_path))
    real = AWQBlocks.quantize_block

    def dies_in_block_2(self, block, index, *args):
        res = real(self, block, index, *args)  # block 2 changed in place, not yet checkpointed
        if index == 2:
            raise _Crash
        return res

    monkeypatch.setattr(AWQBlocks, "quantize_block", dies_in_block_2)
    key = quantized_cache.quant_key("sha", cfg, "float32")
    with pytest.raises(_Crash):
        quantized_cache.quantize_cached(copy.deepcopy(base), cfg, "sha", "float32",
                                        QuantContext(lambda: samples, progress=False), {})
    ckpt = quantized_cache.checkpoint_dir(key)
    assert sorted(p.name for p in ckpt.glob("block_*.json")) == ["block_0000.json", "block_0001.json"]

    monkeypatch.setattr(AWQBlocks, "quantize_block", real)
    model = copy.deepcopy(base)  # a fresh process would load the unquantized model again
    out = quantized_cache.quantize_cached(model, cfg, "sha", "float32", QuantContext(lambda: samples, progress=False), {})
    assert out.summary["resumed_from_block"] == 2 and out.summary["propagate"] == propagate
    assert out.summary["alpha_mean"] == ref.summary["alpha_mean"]
    _same(_tensors(model, out), _tensors(ref_model, ref))
    assert quantized_cache.is_cached(key) and not ckpt.exists()  # in the cache: the checkpoints are gone


def test_checkpoints_of_other_calibration_samples_are_not_used(smollm2_fp32, calib_ids, tmp_path):
    base = _truncated(smollm2_fp32, 2)
    cfg = AWQConfig(w_bit=4, group_size=64, search_samples=2, n_grid=2, clip_n_grid=2,
                      calib=CalibConfig(n_samples=2, seqlen=32))
    a, b = _calib(calib_ids, 2, 32), _calib(calib_ids[1000:], 2, 32)
    METHODS.get("awq")(copy.deepcopy(base), cfg, QuantContext(lambda: a, progress=False, checkpoint_dir=tmp_path))
    assert BlockCheckpoints(tmp_path, {}).finished(2) == 2
    ref_model, fresh_model = copy.deepcopy(base), copy.deepcopy(base)
    ref = METHODS.get("awq")(ref_model, cfg, QuantContext(lambda: b, progress=False))
    out = METHODS.get("awq")(fresh_model, cfg, QuantContext(lambda: b, progress=False, checkpoint_dir=tmp_path))
    assert out.summary["resumed_from_block"] == 0
    _same(_tensors(fresh_model, out), _tensors(ref_model, ref))


class _RecordingRTN:
    """Test method: keeps the input of q_proj (RTN changes no norm, so it is the block input's norm in the final
    model too) and rounds every Linear to nearest."""

    def __init__(self, arch):
        self.arch, self.seen = arch, []

    def observers(self, block, index):
        return {"self_attn.q_proj": Keep()}

    def quantize_block(self, block, index, stats, kwargs, reduce):
        self.seen.append(stats["self_attn.q_proj"].clone())
        return BlockResult({rel: quantize_linear_(block.get_submodule(rel), 3, 64, True) for rel in self.arch.linears})


@torch.no_grad()
def test_each_block_calibrates_on_the_fp16_or_the_quantized_outputs_of_the_blocks_before(smollm2_fp32, calib_ids):
    base = _truncated(smollm2_fp32, 3)
    arch = architecture_for(base)
    samples = _calib(calib_ids, 4, 32)

    def q_inputs(model):  # q_proj's input in every block, in the model's own forward
        got = []
        hooks = [b.self_attn.q_proj.register_forward_hook(lambda m, a, o: got.append(a[0])) for b in model.model.layers]
        model(input_ids=samples, use_cache=False)
        for h in hooks:
            h.remove()
        return got

    fp16_inputs = q_inputs(base)
    seen = {}
    for propagate in ("fp16", "quantized"):
        model = copy.deepcopy(base)
        method = _RecordingRTN(arch)
        run_sequential(model, arch, method, samples, propagate=propagate, progress=False)
        seen[propagate] = method.seen
        expected = fp16_inputs if propagate == "fp16" else q_inputs(model)
        for i in range(3):
            torch.testing.assert_close(method.seen[i], expected[i], rtol=1e-5, atol=1e-5)
    assert torch.equal(seen["fp16"][0], seen["quantized"][0])  # block 0: the same embeddings either way
    assert (seen["fp16"][2] - seen["quantized"][2]).abs().max() > 1e-2  # later: w3 errors accumulated


def test_propagate_is_validated():
    from harness.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="quant.propagate"):
        AWQConfig(propagate="int4").validate()


@pytest.mark.slow  # two processes that load torch and the model: ~1-2.5 min here; the in-process crash test is fast
def test_a_sigkilled_quantization_resumes_bit_for_bit(tmp_path, monkeypatch):
    """A real SIGKILL of a subprocess while it quantizes block 2 (blocks 0 and 1 checkpointed), a second process that
    resumes, and every tensor compared with an uninterrupted run (tests/quant/resume_worker.py)."""
    from tests.quant import resume_worker

    monkeypatch.setenv("QH_CACHE", str(REPO_ROOT / ".cache"))  # restored afterwards: the worker's main changes it
    (tmp_path / "ref").mkdir()
    resume_worker.main(tmp_path / "ref", "fp16", None)

    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, "-m", "tests.quant.resume_worker", str(run), "fp16"]
    proc = subprocess.Popen(cmd + ["2"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "quantized block 2", line
        ckpts = list((run / "cache" / "quant_checkpoints").glob("*/block_*.json"))
        assert sorted(p.name for p in ckpts) == ["block_0000.json", "block_0001.json"]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed_from_block=2" in done.stdout and "resumed from block 2" in done.stderr
    assert not list((run / "cache" / "quant_checkpoints").glob("*/*"))  # deleted once in the quantized cache
    _same(load_file(str(run / "result.safetensors")), load_file(str(tmp_path / "ref" / "result.safetensors")))
