"""AWQ then GPTQ, llm-compressor's AWQ->GPTQ recipe: AWQ's activation-aware scales (and, with quant.clip, its
clipping) are searched and folded into the weights without AWQ's final rounding; GPTQ then collects its Hessians on
the smoothed model and rounds the smoothed weights. The FP model's output is unchanged by the fold, so GPTQ starts
from an equivalent model whose weights are easier to round."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from harness.config import WeightQuantConfig, _require
from quant.awq.config import AWQConfig
from quant.awq.method import AWQ
from quant.gptq.config import GPTQKnobs
from quant.gptq.method import run_gptq
from quant.registry import METHODS, Method, QuantOutcome, method
from quant.setup import Setup


@dataclass
class AWQGPTQConfig(AWQConfig, GPTQKnobs):
    """AWQ's search knobs (the AWQ stage) and GPTQ's (the rounding stage) over one calibration set."""

    method: str = "awq_gptq"
    late_fields = AWQConfig.late_fields + ("grid",)

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        text, key = WeightQuantConfig.label_detail(q)  # "g64 (mse grid)": not AWQ's own variants
        return text + cls.grid_text(q), key

    def validate(self) -> None:
        super().validate()
        self.validate_gptq()
        # the recipe always leaves the rounding to GPTQ: a value here would change the run_id, never the weights
        _require(self.round_weights, "quant.round_weights",
                 "does not apply to awq_gptq (its AWQ stage never rounds; GPTQ rounds) — leave it unset")


@method
class AWQGPTQ(Method):
    name, config = "awq_gptq", AWQGPTQConfig
    needs_calibration = True
    formats = ("awq", "compressed-tensors")
    label = "AWQ+GPTQ"

    def quantize(self, model, cfg: AWQGPTQConfig, ctx, setup: Setup) -> QuantOutcome:
        samples = setup.samples  # one draw of the calibration tokens for both stages
        awq_cfg = AWQConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(AWQConfig) if f.name != "method"})
        awq_cfg.round_weights = False  # AWQ's step 5 is left to GPTQ
        ckpt = ctx.checkpoint_dir
        stage = lambda name: dataclasses.replace(  # noqa: E731  (each stage resumes from its own block checkpoints)
            ctx, calibration=lambda: samples, checkpoint_dir=None if ckpt is None else ckpt / name)
        smooth = METHODS.get(AWQ.name)(model, awq_cfg, stage("awq"))
        run, losses, timings = run_gptq(model, cfg, stage("gptq"), setup)
        summary = self.summary(
            cfg, setup, model, run.qtensors,
            awq={k: v for k, v in smooth.summary.items() if k not in ("layers_quantized", "block_seconds", "method")},
            damp_percent=cfg.damp_percent, block_size=cfg.block_size, act_order=cfg.act_order,
            static_groups=cfg.static_groups, grid=cfg.grid, gptq_loss=losses, block_seconds=run.block_seconds,
            resumed_from_block=run.resumed_from)
        return QuantOutcome(summary=summary, qtensors=run.qtensors,
                            timings_s={**{f"awq_{k}": v for k, v in smooth.timings_s.items()},
                                       **{f"gptq_{k}": v for k, v in timings.items()}})
