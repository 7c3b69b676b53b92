"""W4A16 linears: one registry of real int4 kernels (and the dequantized reference), chosen by name in config
(`eval.throughput.kernel`), built from the harness's QTensors (AWQ's convention: w = (q - z) * s, integer z).

  kernel     device  activations  dequantized weight the kernel multiplies by          module
  gemlite    cuda    fp16 / bf16  (q - z) * s, s in the activation dtype: AWQ's, exact  quant/kernels/gemlite_linear.py
  tinygemm   cuda    bf16         (q - 8) * s + (8 - z) * s, s and the float zero bf16  quant/kernels/int4_linear.py
             cpu     bf16         the same (torch's CPU op)
  dequant    any     any          (q - z) * s cast to the activation dtype: the fake-   quant/kernels/dequant_linear.py
                                  quantized simulation, as fast as FP16 and as large

`auto` takes the first kernel of AUTO_ORDER[device] that is available here and takes every layer's shape, so a run
names the kernel it used (a record never says "int4" for weights that ran dequantized).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from harness.registry import Registry
from quant.primitives import QTensor


class W4A16KernelError(RuntimeError):
    """A kernel that cannot take this device, dtype or layer (the message says which and why)."""


@dataclass(frozen=True)
class W4A16Kernel:
    name: str
    description: str  # what a record and a table call it
    # (QTensor, bias or None, activation dtype, device, where) -> module with forward(x) and packed_bytes()
    build: Callable[..., nn.Module]
    # (device type, activation dtype) -> None when it runs here, else why not
    unavailable: Callable[[str, torch.dtype], Optional[str]]
    # (QTensor, where) -> raises W4A16KernelError when the layer's shape or format does not fit
    check: Callable[[QTensor, str], None]
    exact: bool  # multiplies by AWQ's dequantized weight bit for bit (in the activation dtype)


KERNELS: Registry[W4A16Kernel] = Registry("W4A16 kernel")
AUTO_ORDER = {"cuda": ("gemlite", "tinygemm", "dequant"), "cpu": ("tinygemm", "dequant")}
CHOICES = ("auto", "gemlite", "tinygemm", "dequant")


def register(kernel: W4A16Kernel) -> W4A16Kernel:
    return KERNELS.add(kernel.name, kernel)


def check_w4(qt: QTensor, where: str) -> None:
    """What every int4 kernel here needs: 4-bit unsigned codes with an integer zero point, grouped along in."""
    at = f" ({where})" if where else ""
    if getattr(qt, "format", "int") != "int":
        raise W4A16KernelError(f"quant.format={qt.format}{at}: W4A16 kernels take integer codes")
    if qt.w_bit != 4:
        raise W4A16KernelError(f"quant.w_bit={qt.w_bit}{at}: W4A16 kernels take 4-bit weights only")
    if qt.zeros is None:
        raise W4A16KernelError(f"quant.zero_point=False{at}: W4A16 kernels take unsigned codes with a zero point")
    if qt.q.shape[1] % qt.group_size:
        raise W4A16KernelError(f"group size {qt.group_size}{at} does not divide in_features={qt.q.shape[1]}")


def _load_all() -> None:
    # the kernels register themselves on import; heavy imports (gemlite, triton) happen only when one is built
    from quant.kernels import dequant_linear, gemlite_linear, int4_linear  # noqa: F401


def resolve(name: str, device: str, dtype: torch.dtype, qtensors: dict[str, QTensor]) -> tuple[W4A16Kernel, list[str]]:
    """The kernel `name` names (or `auto` picks) for these layers on `device`, and why `auto` passed over the others.
    A named kernel that cannot run raises W4A16KernelError with the reason."""
    _load_all()
    device = torch.device(device).type
    if name not in CHOICES:
        raise W4A16KernelError(f"eval.throughput.kernel={name!r}: choose one of {', '.join(CHOICES)}")
    candidates = AUTO_ORDER.get(device, ("dequant",)) if name == "auto" else (name,)
    skipped = []
    for cand in candidates:
        k = KERNELS.get(cand)
        why = k.unavailable(device, dtype)
        if why is None:
            try:
                for where, qt in qtensors.items():
                    k.check(qt, where)
            except W4A16KernelError as e:
                why = str(e)
        if why is None:
            return k, skipped
        if name != "auto":
            raise W4A16KernelError(f"eval.throughput.kernel={name}: {why}")
        skipped.append(f"{cand}: {why}")
    raise W4A16KernelError(f"no W4A16 kernel runs here ({'; '.join(skipped)})")


def swap_w4a16_linears(model: nn.Module, qtensors: dict[str, QTensor], kernel: str = "auto",
                       dtype: torch.dtype | None = None) -> dict:
    """Replace each named nn.Linear of `model` by the chosen kernel's module, in place (lm_head tied to the embedding
    and every unquantized module stay as they are). Returns what ran: kernel name, description, exactness, and why
    `auto` skipped others."""
    params = next(model.parameters())
    device, dtype = params.device, dtype or params.dtype
    modules = dict(model.named_modules())
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in qtensors:
        if not isinstance(modules.get(name), nn.Linear):
            raise W4A16KernelError(f"{name}: not an nn.Linear of this model")
        if modules[name] is out_emb:
            raise W4A16KernelError(f"{name}: the output embedding is kept unquantized")
    k, skipped = resolve(kernel, device.type, dtype, qtensors)
    for name, qt in qtensors.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        new = k.build(qt, modules[name].bias, dtype, device, name)
        # what transforms the Linear's input stays with it (an online rotation: quant/rotation/surgery.py)
        new._forward_pre_hooks.update(modules[name]._forward_pre_hooks)
        new._forward_pre_hooks_with_kwargs.update(modules[name]._forward_pre_hooks_with_kwargs)
        setattr(parent, child, new)
    return {"kernel": k.name, "description": k.description, "exact": k.exact, "skipped": skipped,
            "n_linears": len(qtensors)}


def kernel_weight(module: nn.Module, in_features: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The weight [out, in] a linear module multiplies by, read through its own forward on the identity (one row at a
    time through the kernel's small-batch path): what exactness tests compare with the harness's dequantization."""
    rows = []
    eye = torch.eye(in_features, dtype=dtype, device=device)
    for i in range(in_features):
        rows.append(module(eye[i:i + 1]).float())
    bias = getattr(module, "bias", None)
    w = torch.cat(rows, 0)
    if isinstance(bias, torch.Tensor) and bias.numel():
        w = w - bias.float()
    return w.t().contiguous()


def packed_bytes(model: nn.Module) -> dict:
    """Bytes the weights really occupy: parameters and persistent buffers counted once by storage, split into the
    W4A16 modules' (codes + scales/zeros) and the rest."""
    seen, total, kernel_bytes, n = set(), 0, 0, 0
    kernel_modules = {id(m) for m in model.modules() if hasattr(m, "packed_bytes")}
    for mod in model.modules():
        in_kernel = id(mod) in kernel_modules
        n += in_kernel
        buffers = [b for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]
        for t in list(mod.parameters(recurse=False)) + buffers:  # not rotary tables and other derived buffers
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.numel() else id(t)
            if key in seen:
                continue
            seen.add(key)
            b = t.numel() * t.element_size()
            total += b
            kernel_bytes += b if in_kernel else 0
    return {"total_bytes": total, "w4a16_bytes": kernel_bytes, "other_bytes": total - kernel_bytes,
            "n_w4a16_linears": n}
