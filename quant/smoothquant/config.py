"""SmoothQuant's config: what determines a W8A8 quantization, and nothing else.

The method accepts any object with these attributes (a `SmoothQuantConfig`, or the per-method quant config the
harness composes from conf/quant/); `as_smoothquant_config` also reads today's flat harness QuantConfig, where
`smooth_ratio` is alpha and the dtype is int8."""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import CalibConfig, ConfigError
from quant.smoothquant.numerics import QUANT_DTYPES


@dataclass
class SmoothQuantConfig:
    method: str = "smoothquant"
    # migration strength (Xiao et al. 2023, Sec. 4.2); LMDeploy's lite `smooth_quant` leaves smooth_ln_fcs's default 0.5
    alpha: float = 0.5
    # weights and activations share one dtype, as LMDeploy's kernels take both operands in it (`quant_dtype`)
    dtype: str = "int8"  # int8 | fp8_e4m3 | fp8_e5m2
    calib: CalibConfig = field(default_factory=CalibConfig)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"quant.alpha: must be in [0, 1], got {self.alpha}")
        if self.dtype not in QUANT_DTYPES:
            raise ConfigError(f"quant.dtype: {self.dtype!r} is not one of {', '.join(QUANT_DTYPES)}")
        self.calib.validate()


def as_smoothquant_config(cfg) -> SmoothQuantConfig:
    """A validated SmoothQuantConfig from any config object with alpha/dtype/calib (or the flat QuantConfig:
    smooth_ratio, int8)."""
    if isinstance(cfg, SmoothQuantConfig):
        out = cfg
    else:
        alpha = getattr(cfg, "alpha", None)
        out = SmoothQuantConfig(alpha=getattr(cfg, "smooth_ratio", 0.5) if alpha is None else alpha,
                                dtype=getattr(cfg, "dtype", "int8"), calib=getattr(cfg, "calib", CalibConfig()))
    out.validate()
    return out
