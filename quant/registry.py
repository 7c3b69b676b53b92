"""The quantization-method registry. A method is one class in one file (docs/methods.md, "Adding a method"): a
subclass of `Method` that declares, as class attributes, everything the harness knows about it, registered with
`@method`; its `quantize` changes the model in place and returns a QuantOutcome. `import quant` imports every file
under quant/ that registers one, so a new method is its file, its conf/quant/*.yaml and its test."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch

from harness.config import QUANT_CONFIGS, ConfigError, QuantConfig, WeightQuantConfig, quant_config
from harness.labels import ROWS, UNREGISTERED_ORDER, MethodRow
from harness.registry import Registry
from harness.storage_bytes import packed_weight_bytes
from quant.moe.coverage import expert_summary
from quant.onload import HostPeak, Placement
from quant.setup import Setup, setup
from quant.sources import module_sources


@dataclass
class QuantContext:
    calibration: Callable[[], torch.Tensor]  # lazily gives [n_samples, seqlen] token ids
    progress: bool = True
    placement: Placement = field(default_factory=Placement)  # where blocks compute, where weights rest (quant.onload)
    # where a block-by-block method keeps each finished block, to resume a killed run (quant.calibration.checkpoint);
    # quantized_cache.quantize_cached names it by the cache key; None: no checkpoints
    checkpoint_dir: Optional[Path] = None


@dataclass
class QuantOutcome:
    summary: dict = field(default_factory=dict)  # what the method did: layers, fallbacks, bytes
    timings_s: dict = field(default_factory=dict)
    # per quantized Linear (by qualified name): integer codes, scales, zeros, for export and real-kernel runs
    qtensors: dict = field(default_factory=dict)


class Method:
    """A quantization method. A subclass declares:

    name               its quant.method, the schema its conf/quant/*.yaml options select
    config             its config dataclass (a QuantConfig, or WeightQuantConfig for bits/grouping/overrides): only its
                       fields exist under `quant.`, `validate()` runs before any work, `label_detail` names its rows
    needs_calibration  it draws calibration tokens (config.calib: a CalibConfig) and calibrates routed experts as
                       config.moe says (a MoEConfig; the shared setup passes it on as setup.moe)
    cacheable          its result is the model's own parameters plus codes (quant.quantized_cache restores them); a
                       method that swaps modules for others (SmoothQuant's W8A8 Linears) is recomputed every run
    formats            checkpoint formats its codes can be written in, preferred first (quant.export.FORMATS); () none.
                       A recipe is written only in formats every step allows (a rotation that needs online Hadamards
                       at run time allows none); `export_formats(cfg)` narrows them per config
    rounds             it can be a recipe's last step: it rounds every planned Linear to its LayerSpec (bits, group
                       size, zero point: quant.surgery.plan_layers) and returns the codes; a new weight format is a
                       field of the config and the LayerSpec that the rounding primitives read
    prepares           it can come before a recipe's rounding step, with these field values (those that keep it from
                       rounding: {"round_weights": False}; {} for a step that never rounds); None: it cannot
    streams            it passes over the decoder blocks once, in order, touching no block outside its turn, so its
                       blocks can be read from the checkpoint one at a time (quant.streaming); False: it refuses there
    label, order       its name in the report (default: `name` in capitals) and its rows' rank (harness.labels.ROWS)

    and `quantize(model, cfg, ctx, setup)`, which starts from the shared preamble (quant.setup: validated config,
    architecture, layer plan, calibration tokens) and ends with `self.summary(...)`. Its code version is the files
    its module imports (quant.sources), never a list."""

    name: ClassVar[str]
    config: ClassVar[type]
    needs_calibration: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    formats: ClassVar[tuple[str, ...]] = ()
    rounds: ClassVar[bool] = False
    prepares: ClassVar[Optional[dict[str, Any]]] = None
    streams: ClassVar[bool] = False
    label: ClassVar[Optional[str]] = None
    order: ClassVar[int] = UNREGISTERED_ORDER

    def __call__(self, model, cfg: QuantConfig, ctx: QuantContext) -> QuantOutcome:
        if not isinstance(cfg, self.config):  # another method's config never runs as this one
            raise ConfigError(f"quant.method: {getattr(cfg, 'method', cfg)!r} — {self.name} needs its own config "
                              f"({self.config.__name__}) — use a conf/quant preset of {self.name}")
        ctx.placement.check(self, cfg, ctx)  # before any work: a placement the method cannot use says so
        with HostPeak() as host:  # every run's host memory peak (quant.onload.HostPeak says how it is measured)
            out = self.quantize(model, cfg, ctx, setup(model, cfg, ctx, self.needs_calibration))
        out.summary["host_memory"] = host.summary()
        return out

    def quantize(self, model, cfg, ctx: QuantContext, setup: Setup) -> QuantOutcome:
        raise NotImplementedError

    def export_formats(self, cfg) -> tuple[str, ...]:
        """The checkpoint formats this run's codes can be written in (a config may narrow them)."""
        return self.formats

    def caches(self, cfg) -> bool:
        """Whether quant.quantized_cache may keep this run's result and restore it into a fresh model (`cacheable`;
        a recipe: every step's)."""
        return self.cacheable

    def check_followers(self, cfg, later: list) -> None:
        """As a recipe step: ConfigError, before any work, when a step after it (`later`: their configs) cannot
        follow it (a rotation with online parts refuses a step that folds scales across them). Default: any can."""

    def extra_calibration_bytes(self, model_config, cfg, act_bytes: int = 2) -> int:
        """Memory its calibration holds beyond the runner's activations (eval.memory.calibration_bytes), for the
        preflight before the model loads (`model_config`: the transformers config): a method with a backward pass
        (AutoRound) counts its autograd graph. 0: none."""
        return 0

    def sources(self, cfg=None) -> tuple[str, ...]:
        """The files that decide this method's numbers (its code version), derived from its module's imports."""
        return module_sources(type(self).__module__)

    def weight_bytes(self, model, qtensors: dict) -> dict:
        """The summary's bytes (harness.storage_bytes): AWQ's packed layout unless the method stores another."""
        return packed_weight_bytes(model, qtensors)

    def summary(self, cfg, setup: Setup, model, qtensors: dict, calibration: Optional[dict] = None, **own) -> dict:
        """What every record's quant summary holds (method, bits, calibration, layers, overrides, placement, bytes),
        with the method's own entries `own` and extra `calibration` entries."""
        out: dict = {"method": cfg.method}
        if isinstance(cfg, WeightQuantConfig):
            out.update(w_bit=cfg.w_bit, group_size=cfg.group_size, zero_point=cfg.zero_point)
        out.update(own)
        if self.needs_calibration:
            c = cfg.calib
            out["calibration"] = {"dataset": c.dataset, "n_samples": c.n_samples, "seqlen": c.seqlen, "seed": c.seed,
                                  **(calibration or {})}
        out["layers_quantized"] = len(qtensors)
        if setup.plan is not None:
            out["group_fallback_layers"] = setup.plan.fallbacks
            out.update(setup.plan.summary())
        out["placement"] = setup.placement.describe()
        out.update(self.weight_bytes(model, qtensors))
        out.update(expert_summary(model, setup.arch, qtensors))  # a mixture of experts' "moe" entry; {} when dense
        return out


METHODS: Registry[Method] = Registry("quantization method (quant.method)")


def method(cls: type) -> type:
    """Register a Method subclass: its config as quant_schema/<name> (harness.config.QUANT_CONFIGS), the method
    under its name, its report row; a declaration that cannot work fails here, at import."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"@method: {cls!r} must be a Method subclass with a `name`")
    cfg = getattr(cls, "config", None)
    if not (isinstance(cfg, type) and dataclasses.is_dataclass(cfg) and issubclass(cfg, QuantConfig)):
        raise TypeError(f"@method {cls.name}: its `config` must be a dataclass subclassing QuantConfig")
    fields = {f.name for f in dataclasses.fields(cfg)}
    if cls.needs_calibration and "calib" not in fields:
        raise TypeError(f"@method {cls.name}: it calibrates, so {cfg.__name__} needs a `calib: CalibConfig` field")
    if cls.needs_calibration and "moe" not in fields:  # the runner's routed-expert calibration (quant.setup)
        raise TypeError(f"@method {cls.name}: it calibrates, so {cfg.__name__} needs a `moe: MoEConfig` field")
    if cls.prepares is not None and not set(cls.prepares) <= fields:
        raise TypeError(f"@method {cls.name}: prepares sets {sorted(set(cls.prepares) - fields)}, not fields of "
                        f"{cfg.__name__}")
    if not (isinstance(cls.formats, tuple) and all(isinstance(f, str) for f in cls.formats)):
        raise TypeError(f"@method {cls.name}: formats must be a tuple of format names (quant.export.FORMATS)")
    if cls.name in METHODS:
        raise TypeError(f"@method {cls.name}: a method of that name is registered already")
    if cls.name not in QUANT_CONFIGS:
        quant_config(cls.name)(cfg)  # checks that the config's `method` defaults to the name
    elif QUANT_CONFIGS.get(cls.name) is not cfg:  # fp16's config is harness's own (RunConfig's default)
        raise TypeError(f"@method {cls.name}: another config is registered under its name")
    METHODS.add(cls.name, cls())
    ROWS.add(cls.name, MethodRow(cls.label or cls.name.upper(), cls.order))
    return cls


def method_sources(cfg) -> list[str]:
    """The sources of a run's method (`cfg`: its quant config, or a method's name)."""
    if isinstance(cfg, str):
        return list(METHODS.get(cfg).sources())
    return list(METHODS.get(cfg.method).sources(cfg))
