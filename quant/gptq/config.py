"""GPTQ's knobs as one typed dataclass. The method takes any object with these attributes (today the flat
harness.config.QuantConfig, which lacks the GPTQ-only ones: those keep the defaults below)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from harness.config import CalibConfig, ConfigError


@dataclass
class GPTQConfig:
    w_bit: int = 4
    group_size: int = 64  # -1 = one group per output channel
    zero_point: bool = True  # asymmetric with an integer zero point, as RTN/AWQ here (quant/primitives.py)
    # dampening added to diag(H): damp_percent * mean(diag(H)) (AutoGPTQ damp_percent, llm-compressor dampening_frac)
    damp_percent: float = 0.01
    block_size: int = 128  # columns per lazy batch update (paper section 3.3, "lazy batch-updates")
    act_order: bool = True  # quantize columns in order of decreasing diag(H) (AutoGPTQ desc_act)
    # group parameters computed on the original weights before reordering, so the checkpoint keeps g_idx = k // g
    # (AutoGPTQ static_groups; llm-compressor's default actorder="static")
    static_groups: bool = True
    group_fallback: str = "error"  # a group size not dividing in_features: error | per_channel
    calib: CalibConfig = field(default_factory=CalibConfig)

    def validate(self) -> "GPTQConfig":
        def bad(name, value, allowed):
            return ConfigError(f"quant.{name}: {value!r} — {allowed}")

        if not 2 <= self.w_bit <= 8:
            raise bad("w_bit", self.w_bit, "must be in 2..8")
        if not (self.group_size == -1 or self.group_size >= 8):
            raise bad("group_size", self.group_size, "must be -1 (per channel) or >= 8")
        if not 0.0 < self.damp_percent < 1.0:
            raise bad("damp_percent", self.damp_percent, "must be in (0, 1) (AutoGPTQ's bound); 0.01 is the default")
        if self.block_size < 1:
            raise bad("block_size", self.block_size, "must be >= 1")
        if self.group_fallback not in ("error", "per_channel"):
            raise bad("group_fallback", self.group_fallback, "is not one of error, per_channel")
        if self.act_order and not self.static_groups and self.group_size != -1:
            raise bad("static_groups", False, "act_order with dynamic groups gives a permuted g_idx, which the "
                      "harness's QTensor and real-kernel paths do not take; set static_groups=true")
        self.calib.validate()
        return self

    @classmethod
    def from_any(cls, cfg) -> "GPTQConfig":
        """A validated GPTQConfig from any object carrying some of these fields (the rest keep their defaults)."""
        if isinstance(cfg, cls):
            return cfg.validate()
        kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        return cls(**kw).validate()
