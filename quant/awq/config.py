"""AWQ's config (Lin et al. 2023): the scale search, the clipping search and the calibration set. Selected by
conf/quant/awq*.yaml and registered with the method (quant.awq.method); its fields are the method's whole interface,
`label_detail` its report rows' variant."""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import CalibConfig, MoEConfig, WeightQuantConfig, _require, group_text


@dataclass
class AWQConfig(WeightQuantConfig):
    method: str = "awq"
    # scale search over alpha in [0, 1) on n_grid points, else a fixed smoothing ratio (LMDeploy `lite auto_awq`)
    search_scale: bool = True
    smooth_ratio: float = 0.5
    n_grid: int = 20
    duo_scaling: bool = False  # s = mean|x|^a / mean|w|^(1-a) (AutoAWQ) instead of mean|x|^a (paper, llm-awq)
    # which alphas are scored: full (every grid point, llm-awq) | coarse_fine (9 of 20, exact when the loss is unimodal)
    scale_grid: str = "full"
    # calibration sequences whose attention output scores each grid point (all are used for the statistics)
    search_samples: int = 16
    # tokens, drawn at random over all calibration sequences, that score groups inspected token by token (MLP,
    # single Linears); 0 = the first search_samples sequences, as for the attention
    search_tokens: int = 0
    clip: bool = True
    clip_n_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512  # calibration tokens (seeded random) that score the clipping; 0 = every one
    # what the next decoder block calibrates on (quant.calibration.runner): the outputs of the fp16 block (llm-awq,
    # AutoAWQ) or of the quantized one (llm-compressor); auto = AWQ's own convention, fp16
    propagate: str = "auto"
    # false: search and fold the scales (and clip) but leave the rounding to a later step (the awq_gptq recipe)
    round_weights: bool = True
    calib: CalibConfig = field(default_factory=CalibConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)  # routed experts' calibration (a mixture of experts only)
    late_fields = WeightQuantConfig.late_fields + ("propagate", "round_weights", "moe")

    def validate(self) -> None:
        super().validate()
        _require(0.0 <= self.smooth_ratio <= 1.0, "quant.smooth_ratio", "must be in [0, 1]")
        _require(self.n_grid >= 1, "quant.n_grid", "must be >= 1")
        _require(self.scale_grid in ("full", "coarse_fine"), "quant.scale_grid", f"{self.scale_grid!r} is not one of full, coarse_fine")
        _require(self.search_samples >= 1, "quant.search_samples", "must be >= 1")
        _require(self.clip_tokens >= 0, "quant.clip_tokens", "must be >= 0 (0 = every calibration token)")
        _require(self.search_tokens >= 0, "quant.search_tokens", "must be >= 0 (0 = whole sequences)")
        _require(0.0 < self.clip_max_shrink < 1.0, "quant.clip_max_shrink", "must be in (0, 1)")
        _require(self.propagate in ("auto", "fp16", "quantized"), "quant.propagate",
                 f"{self.propagate!r} is not one of auto, fp16, quantized")
        self.calib.validate()
        self.moe.validate()

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        # Lin et al. 2023: scale search (Sec. 3.2) + weight clipping; LMDeploy's `lite auto_awq` default is a fixed
        # smoothing ratio with neither search nor clipping.
        search, clip, ratio = q.get("search_scale", True), q.get("clip", True), q.get("smooth_ratio", 0.5)
        if search:
            variant, rank = ("search+clip" if clip else "search"), 0 if clip else 1
        elif not clip and ratio == 0.5:
            variant, rank = "LMDeploy smoothing", 2
        else:
            variant, rank = f"smoothing α={ratio:g}" + ("+clip" if clip else ""), 3
        if q.get("duo_scaling"):
            variant += ", duo"
        if q.get("layer_overrides"):
            variant += ", overrides"
        return f"{group_text(q)} ({variant})", (rank,)
