"""Hadamard rotation (QuaRot, Ashkboos et al. 2024) as a recipe's preparing step: the weights are rotated so that the
FP model computes the same logits, and the rounding step after it (RTN, GPTQ, AutoRound) rounds rotated weights,
whose outliers the rotation spread over every channel of a group.

    python -m experiments.run quant=rotation_gptq_w4          # R1 + R2 + R4, then GPTQ w4 g64
    python -m experiments.run quant=recipe 'quant.steps=[{method: rotation, online: false}, {method: rtn}]'

Where to rotate is the architecture's data (harness.architectures.RotationPoints); the surgery is
quant/rotation/surgery.py, the matrices quant/rotation/hadamard.py (seeded random Hadamards). The online Hadamard
before down_proj (R4) runs as a forward pre-hook, which the harness's own evaluation applies and no checkpoint
runtime does: with it the run has no export format (and no quantized-weight cache entry: a fresh model would lack
the hook and the untied LM head). Without it (`online: false`) every rotation is in the weights and the run exports
as the rounding step does."""
from __future__ import annotations

import time
from dataclasses import dataclass

from harness.config import ConfigError, QuantConfig, _require
from quant.registry import METHODS, Method, QuantOutcome, method
from quant.rotation.hadamard import seeded_rotation
from quant.rotation.surgery import add_online_rotation_, roles, rotate_heads_, rotate_residual_
from quant.setup import Setup

RESIDUAL = ("auto", "on", "off")


@dataclass
class RotationConfig(QuantConfig):
    """`residual`: rotate the residual stream (R1) where the architecture says that is exact (auto), always (on:
    refused where it is not), or not (off); `heads`: R2 on values/output per head; `online`: R4, a Hadamard on
    down_proj's input at run time; `seed`: the random signs (R1 uses seed, R2 seed + 1, R4 seed + 2)."""

    method: str = "rotation"
    seed: int = 0
    residual: str = "auto"
    heads: bool = True
    online: bool = True

    def validate(self) -> None:
        _require(self.residual in RESIDUAL, "quant.residual", f"{self.residual!r} — choose one of {', '.join(RESIDUAL)}")

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        parts = ([f"residual {q['residual']}"] if q.get("residual", "auto") != "auto" else []) + \
                (["no R2"] if not q.get("heads", True) else []) + (["no online"] if not q.get("online", True) else []) + \
                ([f"seed {q['seed']}"] if q.get("seed", 0) else [])
        return (f"({', '.join(parts)})" if parts else ""), ()


@method
class Rotation(Method):
    name, config = "rotation", RotationConfig
    prepares = {}  # it never rounds
    cacheable = False  # the online hook and the untied LM head are not parameters a fresh model would take
    formats = ("awq",)  # only when nothing runs online (export_formats)
    label, order = "Rotation", 120

    def export_formats(self, cfg: RotationConfig) -> tuple[str, ...]:
        return () if cfg.online else self.formats

    def check_followers(self, cfg: RotationConfig, later: list) -> None:
        """After an online rotation only rounding steps: a step that also prepares (AWQ's scales) folds a scale
        across up_proj -> down_proj, which the online Hadamard between them breaks."""
        for s in later:
            if cfg.online and METHODS.get(s.method).prepares is not None:
                raise ConfigError(f"{s.method} after a rotation with an online Hadamard (online: true): it folds "
                                  f"scales into the Linear before down_proj, across the online rotation; put it "
                                  f"before the rotation, or set online: false")

    def quantize(self, model, cfg: RotationConfig, ctx, setup: Setup) -> QuantOutcome:
        arch = setup.arch
        pts = arch.rotation
        if pts is None:
            raise ConfigError(f"quant.method=rotation: the {arch.family} architecture has no rotation points "
                              f"(harness.architectures: Architecture.rotation); it cannot be rotated")
        if cfg.residual == "on" and pts.residual_inexact:
            raise ConfigError(f"quant.residual=on: the residual stream of {arch.family} cannot be rotated exactly "
                              f"({pts.residual_inexact}); use residual: auto or off")
        c = model.config.get_text_config()
        hidden, heads_n = c.hidden_size, c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or hidden // heads_n
        by_role = roles(arch)
        done: dict = {}
        if cfg.residual != "off" and not pts.residual_inexact:
            rot = seeded_rotation(hidden, cfg.seed)
            done["untied_lm_head"] = rotate_residual_(model, arch, rot.matrix())
            done["residual"] = rot.kind
        blocks = model.get_submodule(arch.blocks)
        if cfg.heads:
            rot = seeded_rotation(head_dim, cfg.seed + 1)
            v, o = (by_role[r] for r in pts.heads)
            for block in blocks:
                for vn, on in zip(v, o):
                    rotate_heads_(block.get_submodule(vn), block.get_submodule(on), rot.matrix())
            done["heads"] = rot.kind
        online = []
        if cfg.online:
            for rel in (n for r in pts.online for n in by_role.get(r, [])):
                rot = seeded_rotation(blocks[0].get_submodule(rel).in_features, cfg.seed + 2)
                for block in blocks:
                    add_online_rotation_(block.get_submodule(rel), rot)
                online.append({"linears": f"{arch.blocks}.*.{rel}", "rotation": rot.kind})
        summary = self.summary(cfg, setup, model, {}, seed=cfg.seed, residual=done.get("residual"),
                               residual_inexact=pts.residual_inexact if cfg.residual != "off" else None,
                               untied_lm_head=done.get("untied_lm_head", False), heads=done.get("heads"),
                               online_rotations=online, needs_online_rotation=bool(online))
        return QuantOutcome(summary=summary, timings_s={"rotation": time.perf_counter() - setup.started_s})
