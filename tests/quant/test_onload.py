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
from quant.onload import HOST, Placement
from tests.quant.test_awq import _calib, _truncated


def _spy_moves(model, monkeypatch) -> list[tuple[str, str]]:
    """(module name, target device) for every Module.to on a decoder block or on the whole model."""
    names = {id(m): n for n, m in model.named_modules()}
    moves = []
    orig = torch.nn.Module.to

    def to(self, *args, **kwargs):
        name = names.get(id(self))
        if name is not None and (name.startswith("model.layers.") and name.count(".") == 2):
            moves.append((name, str(args[0] if args else kwargs.get("device"))))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
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

    turns = [(n, d) for n, d in moves]
    # every block: onloaded, then offloaded, before the next block is onloaded (the capture onloads each block it
    # runs through and returns them all to the host at its end: those moves come first, for AWQ)
    loop = turns[-6:]
    assert loop == [(f"model.layers.{i}", d) for i in range(3) for d in ("cpu", "cpu")]
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
