"""A method as a list of steps, as llm-compressor's recipes chain modifiers: every step but the last changes the
weights without rounding them (AWQ with its rounding left out: scales, and clipping, folded into the weights; the FP
model's output is unchanged), the last one rounds them (RTN, AWQ or GPTQ). The steps share the recipe's bits, grouping,
zero point, layer overrides and one draw of calibration tokens; each step's own knobs are its method's config fields.

    python -m experiments.run quant=recipe_awq_gptq_w4                       # AWQ's scales, then GPTQ's rounding
    python -m experiments.run quant=recipe_awq_gptq_w4 +quant.steps.1.grid=mse
    python -m experiments.run quant=recipe quant.steps='[{method: awq, clip: false}, {method: rtn}]'

A method that can run before the rounding step says which of its fields keep it from rounding (its class's `prepares`);
one that can be the last step says `rounds = True` (quant.registry.Method). `quant=awq_gptq_w4` (quant/gptq/awq_gptq.py) is the same two steps as one method; the
recipe reproduces its codes bit for bit (tests/quant/test_recipe.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

from harness.config import QUANT_CONFIGS, CalibConfig, ConfigError, MoEConfig, WeightQuantConfig, _require
from quant.registry import METHODS, Method, QuantOutcome, method
from quant.setup import Setup
from quant.sources import module_sources

# fields the steps take from the recipe (a step that sets one is refused: one value for the whole recipe)
SHARED = ("w_bit", "group_size", "zero_point", "group_fallback", "layer_overrides", "calib", "moe")


@dataclass
class RecipeConfig(WeightQuantConfig):
    """Bits, grouping, zero point, overrides and calibration for every step; `steps`: each a method's name and its own
    knobs ({"method": "gptq", "grid": "mse"})."""

    method: str = "recipe"
    steps: List[Dict[str, Any]] = field(default_factory=list)
    calib: CalibConfig = field(default_factory=CalibConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)  # routed experts' calibration, for every step that calibrates
    late_fields = WeightQuantConfig.late_fields + ("moe",)

    def step_configs(self) -> list:
        """Each step's own config (its method's dataclass), the recipe's shared fields filled in; ConfigError naming
        the step and the field for a step that cannot be built."""
        out = []
        for i, step in enumerate(self.steps):
            where, step = f"quant.steps[{i}]", dict(step)
            name = step.pop("method", None)
            last = i == len(self.steps) - 1
            allowed = [n for n in METHODS if (METHODS.get(n).rounds if last else METHODS.get(n).prepares is not None)]
            _require(name in allowed, f"{where}.method", f"{name!r} — {'the last step' if last else 'a step before the last'}"
                     f" must be one of {', '.join(allowed)}")
            cls = QUANT_CONFIGS.get(name)
            names = {f.name for f in dataclasses.fields(cls)} - {"method"}
            unknown = sorted(set(step) - names)
            own = sorted(names - set(SHARED))
            _require(not unknown, where, f"{', '.join(unknown)}: not fields of {name}'s config "
                     f"({'its own: ' + ', '.join(own) if own else 'it has no knobs of its own'})")
            shared = sorted(set(step) & set(SHARED))
            _require(not shared, where, f"{', '.join(shared)}: set on the recipe (quant.{', quant.'.join(shared)}), "
                     f"not per step")
            if not last:
                prepares = METHODS.get(name).prepares
                clash = [f"{k}={step[k]}" for k, v in prepares.items() if k in step and step[k] != v]
                _require(not clash, where, f"{', '.join(clash)}: a step before the last never rounds (leave it out)")
                step.update(prepares)
            kw = {k: getattr(self, k) for k in SHARED if k in names}
            out.append(cls(**kw, **step))
        return out

    def validate(self) -> None:
        super().validate()
        self.calib.validate()
        self.moe.validate()
        _require(len(self.steps) >= 1, "quant.steps", "is empty: give at least the rounding step ({method: rtn})")
        steps = self.step_configs()
        for i, cfg in enumerate(steps):
            try:
                cfg.validate()
                METHODS.get(cfg.method).check_followers(cfg, steps[i + 1:])
            except ConfigError as e:
                raise ConfigError(f"quant.steps[{i}] ({cfg.method}): {e}") from None

    @classmethod
    def label_name(cls, q: dict) -> str:
        """"AWQ→GPTQ": its steps' methods in order."""
        from harness.labels import method_name

        return "→".join(method_name(s) for s in q.get("steps", [])) or "recipe"

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        """"g64 (search+clip) → (mse grid)": each step's own detail, the shared grouping once."""
        from harness.labels import method_detail

        shared = {k: q[k] for k in SHARED if k in q and k != "moe"}  # quant.moe: once, by method_detail
        base = WeightQuantConfig.label_detail(q)[0]
        parts = [method_detail({**shared, **s})[0].replace(base, "", 1).strip() for s in q.get("steps", [])]
        parts = [p for p in parts if p]
        return base + (" " + " → ".join(parts) if parts else ""), ()


@method
class Recipe(Method):
    name, config = "recipe", RecipeConfig
    needs_calibration = True

    def quantize(self, model, cfg: RecipeConfig, ctx, setup: Setup) -> QuantOutcome:
        steps = cfg.step_configs()
        samples = setup.samples  # one draw for every step
        ckpt = ctx.checkpoint_dir
        outcomes = []
        for i, scfg in enumerate(steps):
            sctx = dataclasses.replace(ctx, calibration=lambda: samples,  # each step resumes from its own checkpoints
                                       checkpoint_dir=None if ckpt is None else ckpt / f"{i}-{scfg.method}")
            outcomes.append(METHODS.get(scfg.method)(model, scfg, sctx))
        last = outcomes[-1]
        summary = {**last.summary, "method": "recipe",
                   "steps": [{k: v for k, v in o.summary.items() if k not in ("block_seconds", "gptq_loss")}
                             for o in outcomes]}
        summary.update(self.weight_bytes(model, last.qtensors))
        timings = {f"{i}_{s.method}_{k}": v for i, (s, o) in enumerate(zip(steps, outcomes))
                   for k, v in o.timings_s.items()}
        return QuantOutcome(summary=summary, timings_s=timings, qtensors=last.qtensors)

    def export_formats(self, cfg: RecipeConfig) -> tuple[str, ...]:
        """The rounding step's formats that every step before it can be written in too."""
        *before, last = cfg.step_configs()
        return tuple(f for f in METHODS.get(last.method).export_formats(last)
                     if all(f in METHODS.get(s.method).export_formats(s) for s in before))

    def caches(self, cfg: RecipeConfig) -> bool:
        return all(METHODS.get(s.method).caches(s) for s in cfg.step_configs())

    def extra_calibration_bytes(self, model_config, cfg: RecipeConfig, act_bytes: int = 2) -> int:
        """The most any step needs (the steps run one after another)."""
        return max(METHODS.get(s.method).extra_calibration_bytes(model_config, s, act_bytes)
                   for s in cfg.step_configs())

    def sources(self, cfg: RecipeConfig | None = None) -> tuple[str, ...]:
        """Its own and its steps' (without a config: those of every method that can be a step)."""
        steps = [(METHODS.get(s.method), s) for s in cfg.step_configs()] if cfg is not None else [
            (METHODS.get(n), None) for n in METHODS if METHODS.get(n).rounds or METHODS.get(n).prepares is not None]
        return tuple(sorted(set(module_sources(__name__)).union(*(m.sources(s) for m, s in steps))))
