"""GPTQ's config (Frantar et al. 2022), registered with the method (quant.gptq.method) and selected by
conf/quant/gptq_*.yaml; the AWQ->GPTQ recipe's config adds these knobs to AWQ's (quant/gptq/awq_gptq.py). Its run_id
hashes these fields only."""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import CalibConfig, MoEConfig, WeightQuantConfig, _require


@dataclass
class GPTQKnobs:
    # dampening added to diag(H): damp_percent * mean(diag(H)) (AutoGPTQ damp_percent, llm-compressor dampening_frac)
    damp_percent: float = 0.01
    block_size: int = 128  # columns per lazy batch update (paper section 3.3, "lazy batch-updates")
    act_order: bool = True  # quantize columns in order of decreasing diag(H) (AutoGPTQ desc_act)
    # group parameters computed on the original weights before reordering, so the checkpoint keeps g_idx = k // g
    # (AutoGPTQ static_groups; llm-compressor's default actorder="static")
    static_groups: bool = True
    # each group's grid: its min/max range (llm-compressor's default observer) or "mse", the range shrunk to the least
    # |w - q|^2.4 (the GPTQ reference's Quantizer(mse=True), AutoGPTQ's `mse`); quant.gptq.algorithm.group_grid
    grid: str = "minmax"

    @staticmethod
    def grid_text(q: dict) -> str:
        """The label's mark of a non-default grid (harness.labels)."""
        return " (mse grid)" if q.get("grid", "minmax") == "mse" else ""

    def validate_gptq(self) -> None:
        from quant.gptq.algorithm import GRIDS

        _require(self.grid in GRIDS, "quant.grid", f"{self.grid!r} is not one of {', '.join(GRIDS)}")
        _require(0.0 < self.damp_percent < 1.0, "quant.damp_percent",
                 f"{self.damp_percent!r} — must be in (0, 1) (AutoGPTQ's bound); 0.01 is the default")
        _require(self.block_size >= 1, "quant.block_size", f"must be >= 1, got {self.block_size}")
        _require(not (self.act_order and not self.static_groups and self.group_size != -1), "quant.static_groups",
                 "False — act_order with dynamic groups gives a permuted g_idx, which the harness's QTensor and "
                 "real-kernel paths do not take — set quant.static_groups=true")


@dataclass
class GPTQConfig(WeightQuantConfig, GPTQKnobs):
    method: str = "gptq"
    calib: CalibConfig = field(default_factory=CalibConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)  # routed experts' calibration (a mixture of experts only)
    late_fields = WeightQuantConfig.late_fields + ("grid", "moe")
    weight_formats = ("int", "nvfp4", "mxfp4")  # FP4: the format's block scales, static (quant.gptq.algorithm)

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        text, key = WeightQuantConfig.label_detail(q)
        return text + cls.grid_text(q), key

    def validate(self) -> "GPTQConfig":
        super().validate()
        self.validate_gptq()
        if self.format != "int":  # the format defines every block's scale, before the column loop
            _require(self.static_groups, "quant.static_groups", f"False — quant.format={self.format} computes every "
                     f"block's scale from the original weights (static) — set quant.static_groups=true")
            _require(self.grid == "minmax", "quant.grid", f"{self.grid} — quant.format={self.format} takes the "
                     f"format's own block scales, not a searched grid — leave quant.grid at minmax")
        self.calib.validate()
        self.moe.validate()
        return self
