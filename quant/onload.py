"""Where calibration computes and where weights rest: the device policy of the block-by-block methods.

With `offload` on a GPU (model.device=cuda; the default there), the model's weights stay in host memory. The parts
outside the decoder blocks (embeddings, rotary tables, final norm, LM head) move to the GPU while the calibration
inputs are captured, then each decoder block moves to the GPU for its turn (forward, search, quantize) and back, its
integer codes going to host memory with it. Peak GPU memory is one block plus its calibration activations, whatever
the depth: a model larger than the GPU quantizes (LMDeploy's `lite` and llm-compressor's sequential pipeline onload
the same way). The arithmetic is the same as with the whole model on the GPU, so the results are too.

How a block travels (`Transfer`): through one page-locked staging buffer the size of a block, in both directions, and
back into the host tensors it came from (in place). `Module.to` instead copies from pageable memory and allocates
fresh host memory for every block on the way back: on the H200 machine that made moving a 7B's blocks cost about
18 s of a 27 s AWQ run (RTN, which computes nothing, took 17.8 s). Only one block's worth of host memory is pinned,
whatever the model's size.
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
        """`block` on the compute device for the duration; back on the host afterwards when offloading (into the
        host tensors it came from)."""
        if not self.offload:
            yield block
            return
        transfer = _transfer(self.compute)
        moved = transfer.onload(block)
        try:
            yield block
        finally:
            transfer.offload(block, moved)

    @contextmanager
    def capture(self, model: nn.Module, blocks: nn.ModuleList):
        """While calibration inputs are captured: everything outside the blocks on the compute device; the blocks stay
        where they rest (the capture records what each block is given and never runs a block's weights:
        quant.calibration.capture). Nothing moves when the blocks compute on the host."""
        if not self.offload or self.compute.type == "cpu":
            yield
            return
        inside = {id(m) for m in blocks.modules()}
        _move_outside(model, inside, self.compute)
        try:
            yield
        finally:
            _move_outside(model, inside, HOST)

    def check(self, method, cfg, ctx) -> None:
        """Before any work: whether `method` can run with this placement (every method can with this one)."""

    def describe(self) -> dict:
        """The record's words for this placement (the quant summary's `placement`)."""
        return {"compute": str(self.compute), "offload": self.offload}

    def to_host(self, qtensors: dict) -> None:
        """Integer codes of a finished block rest where its weights rest."""
        if self.offload:
            qtensors_to_host(qtensors, _transfer(self.compute))


def qtensors_to_host(qtensors: dict, transfer: "Transfer | None" = None) -> None:
    """Codes, scales and zeros of every QTensor in host memory, in place of the QTensor's fields."""
    fields = [(qt, f) for qt in qtensors.values() for f in ("q", "scales", "zeros")
              if getattr(qt, f) is not None and getattr(qt, f).device != HOST]
    if transfer is None:
        for qt, f in fields:
            setattr(qt, f, getattr(qt, f).to(HOST))
        return
    for (qt, f), host in zip(fields, transfer.to_host([getattr(qt, f) for qt, f in fields])):
        setattr(qt, f, host)


ALIGN = 256  # bytes: every tensor's place in the staging buffer starts on this boundary


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Transfer:
    """Copies between host tensors and the compute device through one reusable page-locked (pinned) staging buffer,
    a batch of tensors at a time (a block's parameters and buffers, or its codes): host -> staging is a multithreaded
    memory copy, staging <-> device a DMA at the link's full speed, device -> staging -> the host tensor it came from
    needs no new host memory. A batch larger than the buffer grows it (the largest block sets its size). On a host
    device (tests; a CPU run never offloads) the same steps run with an ordinary buffer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self.buf = torch.empty(0, dtype=torch.uint8)

    def _staging(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the staging buffer shaped like `tensors`, one after the other on ALIGN boundaries."""
        offsets, end = [], 0
        for t in tensors:
            offsets.append(end)
            end += -(-_nbytes(t) // ALIGN) * ALIGN
        if end > self.buf.numel():
            self.buf = torch.empty(0, dtype=torch.uint8)  # the old buffer goes before the bigger one is pinned
            self.buf = torch.empty(end, dtype=torch.uint8, pin_memory=self.pin)
        return [self.buf[o:o + _nbytes(t)].view(t.dtype).view(t.shape) for o, t in zip(offsets, tensors)]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def to_device(self, hosts: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.upload(self.stage(hosts))

    def stage(self, hosts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The host tensors copied into the staging buffer (views of it, valid until the buffer's next use)."""
        hosts = [h.contiguous() for h in hosts]
        stage = self._staging(hosts)
        for s, h in zip(stage, hosts):
            s.copy_(h)
        return stage

    def upload(self, stage: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of staged tensors on the device (one DMA each from pinned memory)."""
        out = [s.to(self.device, non_blocking=self.pin, copy=True) for s in stage]
        self._sync()  # the staging buffer is free again when this returns
        return out

    def back(self, devs: list[torch.Tensor], hosts: list[torch.Tensor]) -> None:
        """Each device tensor into the host tensor given with it (same shape and dtype), in place."""
        stage = self._staging(devs)
        for s, d in zip(stage, devs):
            s.copy_(d, non_blocking=self.pin)
        self._sync()
        for s, h in zip(stage, hosts):
            h.copy_(s)

    def to_host(self, devs: list[torch.Tensor]) -> list[torch.Tensor]:
        """New host tensors holding the device tensors."""
        hosts = [torch.empty(d.shape, dtype=d.dtype) for d in devs]
        self.back([d.contiguous() for d in devs], hosts)
        return hosts

    def onload(self, module: nn.Module) -> dict:
        """Copies of every parameter and buffer of `module` on the device (on a host device too: tests see the same
        round trip); returns {(id(owner), name, kind): the host tensor it came from}."""
        slots = _slots(module)
        hosts = {(id(mod), name, kind): t.data for mod, name, kind, t in slots}
        devs = self.to_device([t.data for *_, t in slots])
        for (mod, name, kind, _), dev in zip(slots, devs):
            _set(mod, name, kind, dev)
        return hosts

    def offload(self, module: nn.Module, moved: dict) -> None:
        """Every parameter and buffer of `module` back on the host: into the host tensor it came from where it still
        has that tensor's shape and dtype, otherwise (a module the method replaced, a tensor it re-shaped) into new
        host memory."""
        slots, homes = [], []
        for mod, name, kind, t in _slots(module):
            home = moved.get((id(mod), name, kind))
            if home is not None and t.data.data_ptr() == home.data_ptr():
                continue  # never left the host
            if home is None or home.shape != t.shape or home.dtype != t.dtype or not home.is_contiguous():
                home = torch.empty(t.shape, dtype=t.dtype)
            slots.append((mod, name, kind, t))
            homes.append(home)
        self.back([t.data.contiguous() for *_, t in slots], homes)
        for (mod, name, kind, _), h in zip(slots, homes):
            _set(mod, name, kind, h)


def _slots(module: nn.Module) -> list[tuple]:
    """(owner module, name, "p" parameter | "b" buffer, tensor) for every tensor of `module` and its submodules."""
    return [(mod, name, kind, t) for mod in module.modules() for kind, d in (("p", mod._parameters),
                                                                             ("b", mod._buffers))
            for name, t in d.items() if t is not None]


def _set(mod: nn.Module, name: str, kind: str, t: torch.Tensor) -> None:
    if kind == "p":
        mod._parameters[name].data = t
    else:
        mod._buffers[name] = t


_TRANSFERS: dict[str, Transfer] = {}


def _transfer(device: torch.device) -> Transfer:
    """One staging buffer per compute device for the process (a block's worth of pinned memory, reused)."""
    return _TRANSFERS.setdefault(str(device), Transfer(device))


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


class HostPeak:
    """Peak resident host memory (RSS) of this process over a window, e.g. one quantization (`with HostPeak() as m:
    ...; m.summary()`).

    Two readings, because neither alone is right: the kernel's high-water mark (getrusage ru_maxrss) is exact but
    covers the process's whole life (a model loaded before the window, a peak from an earlier run in the same
    process), and it cannot be reset without side effects on every other reader; a thread reading /proc/self/statm
    every `interval_s` sees the window only, but can miss a spike shorter than the interval. So: when ru_maxrss rose
    during the window, the window set the process's peak and that exact value is reported ("ru_maxrss"); otherwise the
    window stayed below an earlier peak and the sampled maximum is reported ("sampled"). The start RSS is reported
    beside it, so the growth during the window is known too."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start = self.sampled = self.max_before = self.max_after = 0
        self._stop = None

    @staticmethod
    def rss_bytes() -> int | None:
        """Resident set size now (Linux /proc/self/statm; None elsewhere)."""
        import os

        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def maxrss_bytes() -> int:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sampled = max(self.sampled, self.rss_bytes() or 0)

    def __enter__(self) -> "HostPeak":
        import threading

        self.max_before = self.maxrss_bytes()
        self.start = self.sampled = self.rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="host-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, self.rss_bytes() or 0)
        self.max_after = self.maxrss_bytes()

    @property
    def exact(self) -> bool:
        return self.max_after > self.max_before

    @property
    def peak(self) -> int:
        return self.max_after if self.exact else self.sampled

    def summary(self) -> dict:
        return {"host_peak_rss_bytes": self.peak, "host_rss_start_bytes": self.start,
                "host_peak_growth_bytes": self.peak - self.start, "how": "ru_maxrss" if self.exact else "sampled"}


def peak_memory(device: torch.device) -> dict:
    """Peak GPU bytes allocated by torch since the last reset (on a CUDA compute device) and the process's peak
    resident host memory."""
    import resource

    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda" and torch.cuda.is_available():
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out
