"""The model surgery of a QuaRot rotation (Ashkboos et al. 2024, §4), from the architecture's rotation points
(harness.architectures.RotationPoints); the matrices come from quant.rotation.hadamard. Every weight is transformed
in float64 and cast back to its dtype once.

  residual (R1)  each norm's weight is fused into the Linears that read it (w, or 1 + w for Gemma's norms, then the
                 norm's weight is made the identity), then the stream is rotated: embedding E Q, readers W Q, writers
                 Qᵀ W (and bias b Q); RMSNorm(x Q) = RMSNorm(x) Q, so the logits are unchanged. A tied LM head is
                 untied first (it takes the final norm's weight, the embedding does not).
  heads (R2)     the values' rows and the output projection's input columns, per head, by one head_dim rotation.
  online (R4)    a Linear's weight absorbs Q (W Q) and its input gets x Q at run time (OnlineRotation, a forward
                 pre-hook), which is what no checkpoint runtime here applies.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.architectures import Architecture, get_blocks
from quant.rotation.hadamard import F64, Orthogonal

NORM_KINDS = {"norm": 0.0, "norm_plus_one": 1.0}  # what the stored weight adds to make the norm's multiplier


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


@torch.no_grad()
def fuse_norm_(norm: nn.Module, readers: list[nn.Linear], kind: str) -> None:
    """The norm's multiplier (w, or 1 + w) moved into the columns of the Linears that read it; the norm then
    multiplies by 1."""
    plus = NORM_KINDS[kind]
    g = norm.weight.to(F64) + plus
    for lin in readers:
        _set(lin.weight, lin.weight.to(F64) * g[None, :])
    _set(norm.weight, torch.full_like(g, 1.0 - plus))


@torch.no_grad()
def rotate_input_(lin: nn.Module, q: torch.Tensor) -> None:
    """A Linear (or embedding table, rows = tokens) whose input x becomes x Q: W Q."""
    _set(lin.weight, lin.weight.to(F64) @ q.to(lin.weight.device))


@torch.no_grad()
def rotate_output_(lin: nn.Linear, q: torch.Tensor) -> None:
    """A Linear whose output y must become y Q: Qᵀ W, bias b Q."""
    q = q.to(lin.weight.device)
    _set(lin.weight, q.T @ lin.weight.to(F64))
    if lin.bias is not None:
        _set(lin.bias, lin.bias.to(F64) @ q)


@torch.no_grad()
def rotate_heads_(values: nn.Linear, out: nn.Linear, r: torch.Tensor) -> None:
    """R2: every head's values v R (rows of v_proj, per KV head) and the output projection's columns of every
    attention head by R too, so o_proj(attention(v R)) = o_proj(attention(v)): attention mixes positions, not
    channels, and a query head reads one KV head's values whole (grouped-query attention included)."""
    hd = r.shape[0]
    r = r.to(values.weight.device)
    w = values.weight.to(F64)
    _set(values.weight, torch.einsum("hdi,de->hei", w.view(-1, hd, w.shape[1]), r).reshape(w.shape))
    if values.bias is not None:
        _set(values.bias, (values.bias.to(F64).view(-1, hd) @ r).reshape(-1))
    wo = out.weight.to(F64)
    _set(out.weight, (wo.view(wo.shape[0], -1, hd) @ r).reshape(wo.shape))


class OnlineRotation:
    """A forward pre-hook: the module's input x becomes x Q (fast: Q's Kronecker factors, not a dense matrix).
    `quant.rotation` marks a module that carries one by `module.online_rotation`."""

    def __init__(self, rot: Orthogonal):
        self.rot = rot

    def __call__(self, module, args):
        return (self.rot.apply(args[0]),) + tuple(args[1:])


@torch.no_grad()
def add_online_rotation_(lin: nn.Linear, rot: Orthogonal) -> None:
    """R4: W Q, and the input x Q at run time, so (x Q)(W Q)ᵀ = x Wᵀ."""
    rotate_input_(lin, rot.matrix())
    lin.register_forward_pre_hook(OnlineRotation(rot))
    lin.online_rotation = rot.kind


def untie_lm_head_(model, arch: Architecture) -> bool:
    """Give the LM head its own weight when it shares the embedding's (and say so in the config, so nothing ties them
    again); True when it did."""
    head, emb = model.get_submodule(arch.lm_head), model.get_submodule(arch.embedding)
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for c in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        c.tie_word_embeddings = False
    return True


def roles(arch: Architecture) -> dict[str, list[str]]:
    """Role -> the block's Linears of that role."""
    out: dict[str, list[str]] = {}
    for name, role in arch.linear_roles:
        out.setdefault(role, []).append(name)
    return out


def residual_readers(arch: Architecture) -> list[tuple[str, tuple[str, ...], str]]:
    """(norm, the Linears reading it, norm kind) per norm of a block: the scaling groups that start at a norm. Every
    Linear of the block is such a reader or a writer (RotationPoints.writers), else ValueError: a Linear whose input
    the rotation would not know."""
    groups = [(g.prev_op, g.linears, g.prev_kind) for g in arch.groups if g.prev_kind in NORM_KINDS and g.input is None]
    by_role = roles(arch)
    writers = {n for r in arch.rotation.writers for n in by_role.get(r, [])}
    unknown = set(arch.linears) - writers - {n for _, lins, _ in groups for n in lins}
    if unknown:
        raise ValueError(f"{arch.family}: Linears {sorted(unknown)} neither read a norm nor write the residual "
                         f"stream; its rotation points are incomplete")
    return groups


@torch.no_grad()
def rotate_residual_(model, arch: Architecture, q: torch.Tensor) -> bool:
    """R1 over the whole model (module docstring); returns whether the LM head was untied."""
    untied = untie_lm_head_(model, arch)
    groups = residual_readers(arch)
    by_role = roles(arch)
    writers = [n for r in arch.rotation.writers for n in by_role.get(r, [])]
    head = model.get_submodule(arch.lm_head)
    fuse_norm_(model.get_submodule(arch.final_norm), [head], groups[0][2])
    rotate_input_(head, q)
    rotate_input_(model.get_submodule(arch.embedding), q)
    for block in get_blocks(model, arch):
        for norm, lins, kind in groups:
            readers = [block.get_submodule(n) for n in lins]
            fuse_norm_(block.get_submodule(norm), readers, kind)
            for lin in readers:
                rotate_input_(lin, q)
        for n in writers:
            rotate_output_(block.get_submodule(n), q)
    return untied
