"""The device policy of block-by-block quantization (quant/onload.py), on the CPU: with offloading, each decoder
block goes to the compute device for its own turn and back before the next one goes, the parts outside the blocks
go there for the capture and come back, the codes rest on the host; and the quantized weights are bit-identical to
a run with the whole model in place. (On this machine the compute device is the CPU, so moves are recorded rather
than seen in memory; the GPU run is in results/gpu/.)"""
from __future__ import annotations

import copy

import pytest
import torch

from quant.awq.config import AWQConfig
from quant.rtn import RTNConfig
from quant import METHODS, QuantContext
from quant.onload import HOST, Placement, Transfer
from tests.quant.test_awq import _calib, _truncated


def _spy_moves(model, monkeypatch) -> list[tuple[str, str]]:
    """("on" | "off", module name) for every decoder block the placement moves."""
    names = {id(m): n for n, m in model.named_modules()}
    moves = []
    on, off = Transfer.onload, Transfer.offload

    def onload(self, module):
        moves.append(("on", names.get(id(module))))
        return on(self, module)

    def offload(self, module, moved):
        moves.append(("off", names.get(id(module))))
        return off(self, module, moved)

    monkeypatch.setattr(Transfer, "onload", onload)
    monkeypatch.setattr(Transfer, "offload", offload)
    return moves


@pytest.mark.parametrize("method", ["rtn", "awq", "smoothquant"])
def test_blocks_take_turns_and_results_do_not_change(method, smollm2_fp32, calib_ids, monkeypatch):
    from quant.smoothquant.config import SmoothQuantConfig

    base = _truncated(smollm2_fp32, 3)
    cfg = RTNConfig(w_bit=4, group_size=64)
    if method == "awq":
        cfg = AWQConfig(w_bit=4, group_size=64, search_samples=2, n_grid=4, clip_n_grid=4,
                          clip_tokens=256)
    if method == "smoothquant":
        cfg = SmoothQuantConfig()
    samples = _calib(calib_ids, 4, 64)
    in_place = copy.deepcopy(base)
    ref = METHODS.get(method)(in_place, cfg, QuantContext(lambda: samples, progress=False))

    offloaded = copy.deepcopy(base)
    moves = _spy_moves(offloaded, monkeypatch)
    place = Placement(torch.device("cpu"), offload=True)  # what Placement.of("cuda", True) is on a GPU machine
    out = METHODS.get(method)(offloaded, cfg, QuantContext(lambda: samples, progress=False, placement=place))

    # every block: onloaded, then offloaded, before the next block is onloaded; nothing else moves through them
    assert moves == [(d, f"model.layers.{i}") for i in range(3) for d in ("on", "off")]
    assert out.summary["placement"] == {"compute": "cpu", "offload": True}
    for name, qt in out.qtensors.items():
        assert qt.q.device == HOST
        torch.testing.assert_close(qt.q, ref.qtensors[name].q, rtol=0, atol=0)
        torch.testing.assert_close(qt.scales, ref.qtensors[name].scales, rtol=0, atol=0)
    for (n, p), (_, p_ref) in zip(offloaded.named_parameters(), in_place.named_parameters()):
        assert torch.equal(p, p_ref), n


def test_placement_of_a_host_device_never_offloads():
    assert Placement.of("cpu", True) == Placement(torch.device("cpu"), False)
    assert Placement.of("cuda", True).offload and not Placement.of("cuda", False).offload


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned staging path needs a GPU (run on the device machine)"))])
def test_a_block_comes_back_into_the_host_tensors_it_left(device):
    """Offloading writes the block's new values into the host memory its tensors came from (no new host memory per
    block); a tensor the method replaced with one of another shape or dtype, or a module it swapped in, gets new host
    memory; nothing stays on the compute device."""
    block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    block[1].register_buffer("seen", torch.zeros(3))
    homes = {n: p.data_ptr() for n, p in block.state_dict(keep_vars=True).items()}
    t = Transfer(torch.device(device))
    moved = t.onload(block)
    assert all(p.data_ptr() != homes[n] and p.device.type == device
               for n, p in block.state_dict(keep_vars=True).items())  # copies computed on
    with torch.no_grad():
        block[0].weight.mul_(2)
        block[1].seen.fill_(7)
        block[1].bias.data = torch.ones(16, dtype=torch.float64, device=device)  # same shape, other dtype
        block[2] = torch.nn.Linear(16, 4, device=device)  # a module the method swapped in
    want = {n: p.detach().cpu().clone() for n, p in block.state_dict(keep_vars=True).items()}
    t.offload(block, moved)
    after = block.state_dict(keep_vars=True)
    assert all(p.device == HOST for p in after.values())
    for n in ("0.weight", "0.bias", "1.weight", "1.seen"):
        assert after[n].data_ptr() == homes[n], n
    assert after["1.bias"].dtype == torch.float64 and after["1.bias"].data_ptr() != homes["1.bias"]
    for n, v in want.items():
        assert torch.equal(after[n], v), n


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned staging path needs a GPU (run on the device machine)"))])
def test_codes_and_a_block_larger_than_the_staging_buffer_round_trip(device):
    t = Transfer(torch.device(device))
    small = [torch.arange(10, dtype=torch.uint8)]
    t.to_device(small)
    size = t.buf.numel()
    big = [torch.randn(300, 7), torch.randint(0, 16, (5, 33), dtype=torch.uint8), torch.randn(64).half()]
    on = t.to_device(big)
    assert all(x.device.type == device for x in on)
    back = t.to_host(on)
    assert t.buf.numel() > size and t.buf.is_pinned() == (device == "cuda")
    for a, b in zip(big, back):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "smoothquant"])
def test_offloaded_blocks_on_a_gpu_give_the_whole_model_on_the_gpus_results(method):
    """On a GPU: a model resting in host memory, its blocks onloaded one at a time through the pinned staging buffer,
    quantizes to the codes and weights the same model quantized whole on the GPU gets, bit for bit (a random
    Llama-shaped model: no download on the device machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quant.gptq.config import GPTQConfig
    from quant.smoothquant.config import SmoothQuantConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = LlamaForCausalLM(cfg).eval()
    qcfg = {"rtn": RTNConfig(w_bit=4, group_size=64),
            "awq": AWQConfig(w_bit=4, group_size=64, search_samples=2, n_grid=4, clip_n_grid=4, clip_tokens=256),
            "gptq": GPTQConfig(w_bit=4, group_size=64), "smoothquant": SmoothQuantConfig()}[method]
    samples = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    whole = copy.deepcopy(base).cuda()
    ref = METHODS.get(method)(whole, qcfg, QuantContext(lambda: samples, progress=False,
                                                        placement=Placement(torch.device("cuda"), False)))
    host = copy.deepcopy(base)
    out = METHODS.get(method)(host, qcfg, QuantContext(lambda: samples, progress=False,
                                                       placement=Placement.of("cuda", True)))
    assert out.summary.get("placement", {"offload": True})["offload"]
    for name, qt in out.qtensors.items():
        assert qt.q.device == HOST
        assert torch.equal(qt.q, ref.qtensors[name].q.cpu()) and torch.equal(qt.scales, ref.qtensors[name].scales.cpu())
    for (n, p), (_, p_ref) in zip(host.named_parameters(), whole.named_parameters()):
        assert p.device == HOST and torch.equal(p, p_ref.cpu()), n


def test_host_peak_sees_memory_held_inside_its_window_only():
    """HostPeak (every quantization's host_memory): 64 MiB touched and held for a moment inside the window show as
    growth, whether the window set the process's peak (exact, ru_maxrss) or stayed under an earlier one (sampled);
    memory freed before the window does not. In a fresh process: a long test session's freed pages would be reused."""
    import json
    import subprocess
    import sys

    code = """
import json, time, torch
from quant.onload import HostPeak
before = torch.ones(96 << 20, dtype=torch.uint8); del before
with HostPeak() as m:
    x = torch.ones(64 << 20, dtype=torch.uint8)
    deadline = time.monotonic() + 10
    while m.sampled < m.start + (60 << 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    del x
with HostPeak() as idle:
    time.sleep(0.05)
print(json.dumps([m.summary(), idle.summary()]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s, idle = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["how"] in ("ru_maxrss", "sampled")
    assert (64 << 20) * 0.9 <= s["host_peak_growth_bytes"] <= (64 << 20) * 1.5 + (16 << 20), s
    assert idle["host_peak_growth_bytes"] < 16 << 20