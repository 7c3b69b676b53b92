"""SmoothQuant's config (registered with the method, quant.smoothquant.method; selected by
conf/quant/smoothquant_*.yaml): what determines a W8A8 quantization, and nothing else (its run_id hashes these fields
only)."""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import CalibConfig, ConfigError, MoEConfig, QuantConfig
from quant.smoothquant.numerics import QUANT_DTYPES


@dataclass
class SmoothQuantConfig(QuantConfig):
    method: str = "smoothquant"
    # migration strength (Xiao et al. 2023, Sec. 4.2); LMDeploy's lite `smooth_quant` leaves smooth_ln_fcs's default 0.5
    alpha: float = 0.5
    # weights and activations share one dtype, as LMDeploy's kernels take both operands in it (`quant_dtype`)
    dtype: str = "int8"  # int8 | fp8_e4m3 | fp8_e5m2
    calib: CalibConfig = field(default_factory=CalibConfig)
    # every calibrated method has it (quant.registry); SmoothQuant refuses a mixture of experts, so only the defaults
    moe: MoEConfig = field(default_factory=MoEConfig)
    late_fields = ("moe",)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"quant.alpha: {self.alpha} — must be in [0, 1] — 0.5 is LMDeploy's default")
        if self.dtype not in QUANT_DTYPES:
            raise ConfigError(f"quant.dtype: {self.dtype!r} — not one of {', '.join(QUANT_DTYPES)} — e.g. quant.dtype=int8")
        self.calib.validate()
        self.moe.validate()

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        # Xiao et al. 2023: weights and activations both in 8 bits (LMDeploy's `lite smooth_quant`), migration strength α
        return f"W8A8 {q.get('dtype', 'int8').replace('_', ' ')} (α={q.get('alpha', 0.5):g})", ()


def as_smoothquant_config(cfg) -> SmoothQuantConfig:
    """The run's SmoothQuantConfig, validated (a config of another method is refused in one line)."""
    if not isinstance(cfg, SmoothQuantConfig):
        raise ConfigError(f"quant.method: {getattr(cfg, 'method', cfg)!r} — smoothquant needs its own config "
                          f"(SmoothQuantConfig) — use quant=smoothquant_w8a8")
    cfg.validate()
    return cfg
