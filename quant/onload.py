"""Where calibration computes and where weights rest: the device policy of the block-by-block methods.

With `offload` on a GPU (model.device=cuda; the default there), the model's weights stay in host memory. The parts
outside the decoder blocks (embeddings, rotary tables, final norm, LM head) move to the GPU while the calibration
inputs are captured, then each decoder block moves to the GPU for its turn (forward, search, quantize) and back, its
integer codes going to host memory with it. Peak GPU memory is one block plus its calibration activations, whatever
the depth: a model larger than the GPU quantizes (LMDeploy's `lite` and llm-compressor's sequential pipeline onload
the same way). The arithmetic is the same as with the whole model on the GPU, so the results are too.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

HOST = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    compute: torch.device = HOST  # where blocks compute
    offload: bool = False  # weights rest on the host between their turns (only meaningful off the host)

    @classmethod
    def of(cls, device: str | torch.device, offload: bool) -> "Placement":
        d = torch.device(device)
        return cls(d, offload and d.type != "cpu")

    @contextmanager
    def block(self, block: nn.Module):
        """`block` on the compute device for the duration; back on the host afterwards when offloading."""
        if self.offload:
            block.to(self.compute)
        try:
            yield block
        finally:
            if self.offload:
                block.to(HOST)

    @contextmanager
    def capture(self, model: nn.Module, blocks: nn.ModuleList):
        """While calibration inputs are captured: everything outside the blocks on the compute device; the blocks stay
        where they rest (the capture records what each block is given and never runs a block's weights:
        quant.calibration.capture)."""
        if not self.offload:
            yield
            return
        inside = {id(m) for m in blocks.modules()}
        _move_outside(model, inside, self.compute)
        try:
            yield
        finally:
            _move_outside(model, inside, HOST)

    def to_host(self, qtensors: dict) -> None:
        """Integer codes of a finished block rest where its weights rest."""
        if self.offload:
            qtensors_to_host(qtensors)


def qtensors_to_host(qtensors: dict) -> None:
    """Codes, scales and zeros of every QTensor in host memory, in place."""
    for qt in qtensors.values():
        for f in ("q", "scales", "zeros"):
            t = getattr(qt, f)
            if t is not None and t.device != HOST:
                setattr(qt, f, t.to(HOST))


def _move_outside(model: nn.Module, inside: set[int], device: torch.device) -> None:
    """Move the parameters and buffers of every module not in `inside` (by id) to `device`, in place."""
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for name, p in mod._parameters.items():
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for name, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)


def peak_memory(device: torch.device) -> dict:
    """Peak GPU bytes allocated by torch since the last reset (on a CUDA compute device) and the process's peak
    resident host memory."""
    import resource

    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda" and torch.cuda.is_available():
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out
