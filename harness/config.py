"""Typed configs. Every Hydra group under conf/ merges into one of these dataclasses, so an unknown field
or a wrong type fails when the config is composed, and `validate()` checks values before any long work."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from harness.registry import Registry


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


def user_error(field_name: str, value, allowed: str, fix: str) -> ConfigError:
    """The one shape of a user error: `<field>: <value> — <allowed> — <fix>` (printed as `error: ...`)."""
    return ConfigError(f"{field_name}: {value} — {allowed} — {fix}")


def _require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


@dataclass
class ModelConfig:
    name: str = MISSING
    # embedded:<name> | a Hugging Face hub id | a local HF directory | a path to a .gguf file
    path: str = MISSING
    gguf_file: Optional[str] = None
    trust_remote_code: bool = False
    # pretrained | random (synthetic weights at a real shape: throughput and memory only, never quality)
    weights: str = "pretrained"
    dtype: str = "bfloat16"
    device: str = "cpu"
    # what the unquantized model is, shown beside every result (e.g. the GGUF origin of the embedded model); blank:
    # the loaded model's own description (harness.models.describe_model: its model_type, origin and weights' sha)
    reference_note: str = ""
    # blocks streamed from the checkpoint's safetensors (or generated from the seed for synthetic:<arch>), never the
    # whole model in host memory (quant/streaming.py, experiments/streamed.py): quantize and export only (eval=none)
    stream: bool = False

    def validate(self) -> None:
        if not self.name:  # a model option's name describes its own path only (conf/model/*.yaml, qh.of_path)
            self.name = model_name_of(self.path)
        _require(self.weights in ("pretrained", "random"), "model.weights", f"{self.weights!r} is not one of pretrained, random")
        _require(self.dtype in ("bfloat16", "float16", "float32"), "model.dtype", f"{self.dtype!r} is not one of bfloat16, float16, float32")


def model_name_of(path: str) -> str:
    """A model's name from what model.path points at, when no name is given for it: embedded:<name> -> <name>,
    synthetic:<arch> -> <arch>-synthetic, a .gguf file -> its stem, a directory or hub id -> its last part."""
    for prefix, suffix in (("embedded:", ""), ("synthetic:", "-synthetic")):
        if path.startswith(prefix):
            return path[len(prefix):] + suffix
    last = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    return last[: -len(".gguf")] if last.endswith(".gguf") else last


def of_path(path: str, value: str, _parent_) -> str:
    """The `qh.of_path` resolver of conf/model/*.yaml: a model option's name and reference_note describe the model at
    its own path; with another model.path (and no model.name / model.reference_note given) they are blank, so the
    name comes from the path (model_name_of) and the note from the loaded model (harness.models.describe_model)."""
    return value if _parent_.get("path") == path else ""


@dataclass
class DataConfig:
    name: str = MISSING
    # text sources scored for perplexity (names registered in harness.data.TEXT_SOURCES, or file:<path> of a local
    # .txt / .jsonl file: harness/text_files.py)
    splits: list[str] = field(default_factory=list)
    # a BOS token at the head of every evaluation window and calibration sample: auto (lm-eval's convention: when the
    # tokenizer defines one and adds it itself) | true | false (harness.data.bos_token_id)
    add_bos: str = "auto"

    def validate(self) -> None:
        _require(len(self.splits) > 0, "data.splits", "needs at least one split")
        self.add_bos = str(self.add_bos).lower()  # a command-line true/false arrives as a bool turned into "True"
        _require(self.add_bos in ("auto", "true", "false"), "data.add_bos", f"{self.add_bos!r} is not one of auto, true, false")


@dataclass
class PerplexityConfig:
    enabled: bool = True
    seqlen: int = 512
    max_windows: Optional[int] = 40  # None = every full window of the split
    batch_size: int = 8

    def validate(self) -> None:
        _require(self.seqlen >= 2, "eval.perplexity.seqlen", f"must be >= 2, got {self.seqlen}")
        _require(self.max_windows is None or self.max_windows >= 1, "eval.perplexity.max_windows", "must be >= 1 or null")
        _require(self.batch_size >= 1, "eval.perplexity.batch_size", "must be >= 1")


@dataclass
class WordPerplexityConfig:
    """lm-eval's rolling-window loglikelihood: word perplexity and bits per byte (a second, labelled protocol)."""

    enabled: bool = False
    max_length: int = 512
    batch_size: int = 8
    max_chars: Optional[int] = 60000  # characters of each split scored (None = all)


@dataclass
class FidelityConfig:
    """Divergence from the FP16 model on the same windows: KL (mean, p99), top-1 agreement, PPL ratio."""

    enabled: bool = False
    max_windows: Optional[int] = 8  # windows of each split (of eval.perplexity.seqlen tokens)


@dataclass
class TasksConfig:
    """Task accuracy through lm-eval. Offline, only the local tasks shipped under eval/tasks/ exist."""

    enabled: bool = False
    names: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    num_fewshot: int = 0
    batch_size: int = 8


@dataclass
class MemoryConfig:
    enabled: bool = True
    context_len: int = 4096  # KV bytes reported at this context and batch
    batch_size: int = 1


@dataclass
class ThroughputConfig:
    enabled: bool = False
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 128
    gen_len: int = 64
    warmup: int = 1
    repeats: int = 3
    int4_kernel: bool = True  # W4A16 through real int4 kernels, not dequantized weights
    # which W4A16 kernel (quant/kernels/w4a16.py): auto (gemlite on CUDA where it imports, else torch's int4
    # kernel, else dequantized weights) | gemlite | tinygemm | dequant
    kernel: str = "auto"
    cuda_graph: bool = True  # on CUDA, decode through a static KV cache and one CUDA graph per step (eval/static_decode)


@dataclass
class KernelQualityConfig:
    """Token PPL through the real W4A16 kernel beside the simulation (eval/kernel_quality.py)."""

    enabled: bool = False
    kernel: str = "auto"  # as eval.throughput.kernel

    def validate(self) -> None:
        _require(self.kernel in ("auto", "gemlite", "tinygemm", "dequant"), "eval.kernel_quality.kernel",
                 f"{self.kernel!r} is not one of auto, gemlite, tinygemm, dequant")


@dataclass
class EvalConfig:
    name: str = MISSING
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    word_perplexity: WordPerplexityConfig = field(default_factory=WordPerplexityConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    kernel_quality: KernelQualityConfig = field(default_factory=KernelQualityConfig)

    def validate(self) -> None:
        self.perplexity.validate()
        self.kernel_quality.validate()
        _require(all(b >= 1 for b in self.throughput.batch_sizes), "eval.throughput.batch_sizes", "every batch size must be >= 1")
        _require(self.throughput.kernel in ("auto", "gemlite", "tinygemm", "dequant"), "eval.throughput.kernel",
                 f"{self.throughput.kernel!r} is not one of auto, gemlite, tinygemm, dequant")
        _require(self.throughput.prompt_len >= 1 and self.throughput.gen_len >= 1, "eval.throughput", "prompt_len and gen_len must be >= 1")
        _require(self.tasks.batch_size >= 1, "eval.tasks.batch_size", "must be >= 1")


@dataclass
class CalibConfig:
    dataset: str = "shakespeare_calib"  # a text source name, or file:<path> (harness/text_files.py)
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0

    def validate(self) -> None:
        _require(self.n_samples >= 1, "quant.calib.n_samples", "must be >= 1")
        _require(self.seqlen >= 2, "quant.calib.seqlen", "must be >= 2")


# quant.moe.fallback -> what an expert with too few calibration tokens is calibrated on (quant/moe/coverage.py applies
# it; the record names it). One fallback so far: RTN or an MSE grid for such experts would need each method to round
# a few Linears its own way, which none does yet
EXPERT_FALLBACKS = {
    "all_tokens": "statistics from every calibration token entering the block's MoE (the expert run on all of them; "
                  "the block's output stays the routed one)",
}


@dataclass
class MoEConfig:
    """How a calibrated method calibrates the routed experts of a mixture of experts (quant/moe/coverage.py, in the
    shared runner). An expert is under-covered when it receives no token or fewer than `min_share` of an even share
    (all routed token slots / experts); it gets `fallback`. A dense model takes the defaults only (quant.setup)."""

    min_share: float = 0.1  # 0: only experts with no token fall back
    calibrate_all_experts: bool = False  # every expert gets the fallback (llm-compressor's moe_calibrate_all_experts)
    fallback: str = "all_tokens"  # a key of EXPERT_FALLBACKS

    def validate(self) -> None:
        _require(0 <= self.min_share <= 1, "quant.moe.min_share", f"must be in [0, 1], got {self.min_share}")
        if self.fallback not in EXPERT_FALLBACKS:
            raise user_error("quant.moe.fallback", repr(self.fallback), f"not one of {', '.join(EXPERT_FALLBACKS)}",
                             "use quant.moe.fallback=all_tokens")

    def is_default(self) -> bool:
        return self == MoEConfig()

    @staticmethod
    def label_text(q: dict) -> str:
        """What a report row's label adds for a config's quant.moe off its defaults ("" at them), so two runs that
        differ only there never share a row's name: "all experts", "expert min share 0"."""
        moe, default = q.get("moe") or {}, dataclasses.asdict(MoEConfig())
        parts = ["all experts" if moe.get("calibrate_all_experts") else ""]
        if moe.get("min_share", default["min_share"]) != default["min_share"]:
            parts.append(f"expert min share {moe['min_share']:g}")
        if moe.get("fallback", default["fallback"]) != default["fallback"]:
            parts.append(f"expert fallback {moe['fallback']}")
        return ", ".join(p for p in parts if p)


@dataclass
class QuantConfig:
    """The base of every method's config (torchao style: a typed config per method is the method's whole API). A
    method's dataclass subclasses this (or WeightQuantConfig), lives with its method and registers with it
    (quant.registry.method calls `quant_config(name)`); conf/quant/<option>.yaml selects it (Hydra ConfigStore `quant_schema/<name>`), so only
    the method's own fields exist, are validated, and enter the run's identity (harness.records.quant_identity)."""

    method: str = "fp16"  # a name in QUANT_CONFIGS (and quant.METHODS)
    # fields added after records of the method existed: left out of its identity while they hold their default (the
    # dataclass's), so those records keep their run_id (LATE_FIELDS, per method)
    late_fields: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        pass

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        """The row label's detail after "<METHOD> w<bits>" and a sort key within the method (harness.labels), from the
        config as a dict (a record's): a method with variants overrides it."""
        return "", ()

    @classmethod
    def label_name(cls, q: dict) -> Optional[str]:
        """The method's name in a row label when the config decides it (a recipe: its steps'); None: the name its
        registration gives (harness.labels.ROWS)."""
        return None


@dataclass
class LayerOverride:
    """Per-layer choice for the Linears whose qualified name (e.g. model.layers.0.mlp.down_proj) matches `pattern`:
    a glob (fnmatch), or a regular expression after `re:` (llm-compressor's targets/ignore convention), matched
    against the whole name. The first matching entry decides; fields left null keep the method's value."""

    pattern: str = MISSING
    w_bit: Optional[int] = None
    group_size: Optional[int] = None
    skip: bool = False  # keep the layer unquantized (its FP16 weight, outside export packing and the bytes)

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    def validate(self, where: str) -> None:
        _require(bool(self.pattern), f"{where}.pattern", "must be a glob or re:<regex> over qualified Linear names")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise ConfigError(f"{where}.pattern: {self.pattern!r} is not a regular expression ({e})") from None
        _require(self.skip or self.w_bit is not None or self.group_size is not None, where,
                 "sets none of w_bit, group_size, skip: it would change nothing")
        _require(self.w_bit is None or 2 <= self.w_bit <= 8, f"{where}.w_bit", f"must be in 2..8, got {self.w_bit}")
        _require(self.group_size is None or self.group_size == -1 or self.group_size >= 8, f"{where}.group_size",
                 f"must be -1 (per channel) or >= 8, got {self.group_size}")


def group_text(q: dict) -> str:
    """"g64", "per-channel", "g64 sym": a weight config's grouping in the report's words."""
    g = q.get("group_size", -1)
    s = "per-channel" if g in (-1, None) else f"g{g}"
    return s if q.get("zero_point", True) else f"{s} sym"


@dataclass
class WeightQuantConfig(QuantConfig):
    """What every weight-only integer method shares: bits, grouping, zero point, and per-layer overrides (quant.surgery
    turns them into one spec per Linear: quant.surgery.plan_layers)."""

    w_bit: int = 4
    group_size: int = 64  # -1 = one group per output channel
    zero_point: bool = True  # asymmetric with an integer zero point (AWQ/LMDeploy default)
    # what to do when group_size does not divide a layer's in_features: error | per_channel
    group_fallback: str = "error"
    layer_overrides: list[LayerOverride] = field(default_factory=list)
    # the grid the weights are rounded to: int (the integer grid of quant/primitives.py) | nvfp4 | mxfp4 (e2m1 values
    # under the format's block scales, quant/formats/fp4.py; the block is the group: 16 / 32, symmetric)
    format: str = "int"
    # `format` came after records existed: left out of the identity at int, so they keep their run_id
    late_fields: ClassVar[tuple[str, ...]] = ("layer_overrides", "format")
    # the formats this method's rounding reads from the LayerSpec (quant.surgery); a method that rounds on its own
    # integer grid (AWQ's pseudo-quantize) keeps int only, so an FP4 config never runs as integer under an FP4 label
    weight_formats: ClassVar[tuple[str, ...]] = ("int",)

    def validate(self) -> None:
        _require(2 <= self.w_bit <= 8, "quant.w_bit", f"must be in 2..8, got {self.w_bit}")
        _require(self.group_size == -1 or self.group_size >= 8, "quant.group_size", f"must be -1 (per channel) or >= 8, got {self.group_size}")
        _require(self.group_fallback in ("error", "per_channel"), "quant.group_fallback", f"{self.group_fallback!r} is not one of error, per_channel")
        for i, o in enumerate(self.layer_overrides):
            o.validate(f"quant.layer_overrides[{i}]")
        self.validate_format()

    def validate_format(self) -> None:
        """FP4 has one shape: 4-bit e2m1 codes, the format's block as the group, no zero point; every other value is
        refused (not silently replaced), so one result has one run_id."""
        fmt = self.format
        if fmt not in WEIGHT_FORMATS:
            raise user_error("quant.format", repr(fmt), f"not one of {', '.join(WEIGHT_FORMATS)}",
                             "use quant.format=int, or a preset such as quant=rtn_nvfp4")
        if fmt == "int":
            return
        if fmt not in self.weight_formats:
            raise user_error("quant.format", fmt, f"{self.method} rounds to {', '.join(self.weight_formats)} only",
                             f"round with RTN or GPTQ (quant=rtn_{fmt}, quant=gptq_{fmt})")
        block = WEIGHT_FORMATS[fmt]
        if self.w_bit != 4:
            raise user_error("quant.w_bit", self.w_bit, f"quant.format={fmt} stores 4-bit e2m1 codes",
                             "set quant.w_bit=4")
        if self.group_size != block:
            raise user_error("quant.group_size", self.group_size, f"quant.format={fmt} takes blocks of {block} "
                             f"(its scale per block is the group)", f"set quant.group_size={block} (the "
                             f"conf/quant/*_{fmt}.yaml presets do)")
        if self.zero_point:
            raise user_error("quant.zero_point", self.zero_point, f"quant.format={fmt} is symmetric (e2m1 values "
                             "under a block scale, no zero point)", "set quant.zero_point=false")
        if self.group_fallback != "error":
            raise user_error("quant.group_fallback", self.group_fallback, f"quant.format={fmt} has no per-channel "
                             "form", "leave it at error, and skip a layer whose in_features the block does not "
                             "divide (quant.layer_overrides with skip: true)")
        for i, o in enumerate(self.layer_overrides):
            if o.w_bit is not None or o.group_size is not None:
                raise user_error(f"quant.layer_overrides[{i}]", o.pattern, f"w_bit / group_size do not apply with "
                                 f"quant.format={fmt} (one shape per format)", "give it skip: true only")

    @classmethod
    def label_detail(cls, q: dict) -> tuple[str, tuple]:
        fmt = q.get("format", "int")
        base = group_text(q) if fmt == "int" else fmt.upper()  # "NVFP4": its block and symmetry are the format's
        return base + (" +overrides" if q.get("layer_overrides") else ""), ()


# quant.format -> its block along in_features (None: the integer grid, grouped by quant.group_size); the FP4
# numerics are quant/formats/fp4.py's (FP4_FORMATS holds the same blocks)
WEIGHT_FORMATS: dict[str, Optional[int]] = {"int": None, "nvfp4": 16, "mxfp4": 32}


# method name -> its config dataclass; filled by each method's registration (quant.registry.method, via quant_config)
QUANT_CONFIGS: Registry[type] = Registry("quantization method config (quant.method)")


def quant_config(name: str):
    """Register a method's config dataclass under `name` (its `method` must default to `name`); a method's
    registration (quant.registry.method) calls it for its config."""
    def deco(cls: type) -> type:
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, QuantConfig)):
            raise TypeError(f"@quant_config({name!r}): {cls.__name__} must be a dataclass subclassing QuantConfig")
        method = next(f for f in dataclasses.fields(cls) if f.name == "method")
        if method.default != name:
            raise TypeError(f"@quant_config({name!r}): {cls.__name__}.method must default to {name!r}")
        return QUANT_CONFIGS.register(name)(cls)

    return deco


# No quantization, the FP16 reference (run in model.dtype; the method is quant.registry.fp16): its config is the base
# itself, with no field beyond the method's name. It lives here because RunConfig's default is the unquantized model,
# and every method's config, a subclass, must be able to take the `quant` field's place in Hydra's merge.
FP16Config = quant_config("fp16")(QuantConfig)


@dataclass
class KVConfig:
    name: str = "fp16"
    bits: int = 16  # 16 = unquantized; 8 / 4 = LMDeploy quant_policy 8 / 4
    # int (the integer policies, by bits) | fp8_e4m3 | fp8_e5m2 (bits 8: LMDeploy quant_policy 16 / 17)
    format: str = "int"

    def validate(self) -> None:
        _require(self.bits in (16, 8, 4), "kv.bits", f"must be one of 16, 8, 4, got {self.bits}")
        _require(self.format in ("int", "fp8_e4m3", "fp8_e5m2"), "kv.format",
                 f"{self.format!r} is not one of int, fp8_e4m3, fp8_e5m2")
        _require(self.format == "int" or self.bits == 8, "kv.format", f"{self.format} needs kv.bits=8, got {self.bits}")


@dataclass
class BackendConfig:
    """Which engine runs the model: hf (transformers, CPU or GPU) or lmdeploy (GPU; PyTorch engine or TurboMind)."""

    name: str = "hf"
    engine: str = "auto"  # lmdeploy only: auto (TurboMind if it imports, else PyTorch) | pytorch | turbomind
    cache_max_entry_count: float = 0.4  # share of free GPU memory for the KV cache (LMDeploy's default in the seed)
    session_len: Optional[int] = None
    max_batch_size: int = 128
    tp: int = 1
    # LMDeploy's PyTorch engine: its own W4A16 kernel (engine) or one of the harness's (backends/lmdeploy_w4a16.py)
    w4a16_kernel: str = "engine"

    def validate(self) -> None:
        _require(self.name in ("hf", "lmdeploy"), "backend.name", f"{self.name!r} is not one of hf, lmdeploy")
        _require(self.w4a16_kernel in ("engine", "gemlite", "tinygemm", "hybrid"), "backend.w4a16_kernel",
                 f"{self.w4a16_kernel!r} is not one of engine, gemlite, tinygemm, hybrid")
        _require(self.engine in ("auto", "pytorch", "turbomind"), "backend.engine", f"{self.engine!r} is not one of auto, pytorch, turbomind")
        _require(0.0 < self.cache_max_entry_count <= 1.0, "backend.cache_max_entry_count", "must be in (0, 1]")
        _require(self.tp >= 1, "backend.tp", "must be >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=FP16Config)  # a method's config (QUANT_CONFIGS)
    kv: KVConfig = field(default_factory=KVConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    seed: int = 0
    # where records go; not part of the run's identity
    results_dir: str = "results"
    force: bool = False  # recompute even if a record with the same run_id exists
    progress: bool = True
    # with model.device=cuda: weights rest in host memory and each decoder block computes on the GPU in turn
    # (quant/onload.py); the arithmetic is the same either way, so it is not part of the run's identity
    offload: bool = True

    def validate(self) -> None:
        schema = quant_schema_for(self.quant.method)
        if type(self.quant) is not schema:  # e.g. quant=rtn_w4 quant.method=awq: rtn's fields, awq's name
            raise user_error("quant.method", self.quant.method, f"the quant option chose {type(self.quant).__name__}, "
                             f"not {schema.__name__}", f"choose a quant option of {self.quant.method} instead of "
                             f"overriding quant.method")
        for part in (self.model, self.data, self.eval, self.quant, self.kv, self.backend):
            part.validate()


# fields that do not change a run's result, so they are left out of its identity hash
NON_IDENTITY_FIELDS = ("results_dir", "force", "progress", "offload")
# fields added after records existed, left out of a run's identity while they hold their default, so those records
# keep their run_id (data.add_bos=auto gives the embedded SmolLM2 no BOS, exactly as before the field existed;
# kv.format=int is the integer KV quantization every earlier record used; eval.throughput.kernel=auto and
# backend.w4a16_kernel=engine are what ran before they could be chosen; model.stream=false loads the model whole, as
# every run did before streaming); a method's own late fields are its config's `late_fields`. A field inside a
# subsection is named by its dotted path within the section.
LATE_FIELDS = {("data", "add_bos"): "auto", ("kv", "format"): "int", ("eval", "throughput.kernel"): "auto",
               ("eval", "throughput.cuda_graph"): True, ("backend", "w4a16_kernel"): "engine",
               ("eval", "kernel_quality"): {"enabled": False, "kernel": "auto"}, ("model", "stream"): False}


def without_late_defaults(section: str, d: dict) -> dict:
    """One config section (as a dict) without its LATE_FIELDS that hold their default: what a run's identity sees."""
    out = dict(d)
    for (sec, path), default in LATE_FIELDS.items():
        if sec != section:
            continue
        *parents, leaf = path.split(".")
        node = out
        for p in parents:  # copy the way down, so the caller's dict is left as it was
            if not isinstance(node.get(p), dict):
                break
            node[p] = dict(node[p])
            node = node[p]
        else:
            if leaf in node and node[leaf] == default:
                del node[leaf]
    return out

# The compatibility view of the methods that had records before per-method configs (issue 16): then one flat
# QuantConfig carried every AWQ field for every method, and its whole dict entered the run_id. fp16, rtn and awq
# therefore hash their own fields laid over these old defaults (harness.records.quant_identity), so every earlier
# record keeps its run_id; any other method hashes its own fields only. Never edit this dict; a new field of these
# methods goes into its config's `late_fields` instead.
LEGACY_QUANT_METHODS = ("fp16", "rtn", "awq")
LEGACY_QUANT_VIEW = {
    "method": "fp16", "w_bit": 4, "group_size": 64, "zero_point": True, "group_fallback": "error",
    "search_scale": True, "smooth_ratio": 0.5, "n_grid": 20, "duo_scaling": False, "scale_grid": "full",
    "search_samples": 16, "search_tokens": 0, "clip": True, "clip_n_grid": 20, "clip_max_shrink": 0.5,
    "clip_tokens": 512, "calib": {"dataset": "shakespeare_calib", "n_samples": 128, "seqlen": 512, "seed": 0},
}


def field_default(schema: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(schema) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def quant_identity_dict(q: dict, schema: type | None = None) -> dict:
    """What of a quant config (as a dict) determines the result: the method's fields, less its late fields at their
    default; for fp16/rtn/awq laid over LEGACY_QUANT_VIEW. `schema` (the method's config class) defaults to the
    registered one; for a record whose method is not registered here, only WeightQuantConfig's late fields are
    known (enough for the report's row identity)."""
    q = copy.deepcopy(dict(q))
    m = q.get("method", "fp16")
    if schema is None:
        schema = QUANT_CONFIGS.get(m) if m in QUANT_CONFIGS else WeightQuantConfig
    names = {f.name for f in dataclasses.fields(schema)}
    for k in schema.late_fields:
        default = field_default(schema, k)
        if dataclasses.is_dataclass(default):  # a late section (quant.moe) compares as the dict a config gives
            default = dataclasses.asdict(default)
        if k in q and q[k] == default:
            del q[k]
    if m in LEGACY_QUANT_METHODS:
        # a record written before the split also carries the other methods' fields; they never changed its result
        return {**copy.deepcopy(LEGACY_QUANT_VIEW), **{k: v for k, v in q.items() if k in names or schema is WeightQuantConfig}}
    return q


def legacy_quant_fields(q: dict) -> dict:
    """A record's quant dict with only its method's fields: records written before the split carry every AWQ field
    under every method (LEGACY_QUANT_VIEW); those fields never changed an fp16/rtn run, so they are dropped."""
    m = q.get("method", "fp16")
    if m not in LEGACY_QUANT_METHODS or m not in QUANT_CONFIGS:
        return q
    names = {f.name for f in dataclasses.fields(QUANT_CONFIGS.get(m))}
    return {k: v for k, v in q.items() if k in names or k not in LEGACY_QUANT_VIEW}


def register_schemas() -> None:
    """Register the typed schemas that conf/ extends (Hydra's ConfigStore): RunConfig as `run_schema`, and each
    registered method's config as `quant_schema/<method>`, which its conf/quant/*.yaml options select
    (`defaults: [/quant_schema@_here_: <method>]`). Methods outside harness register when `quant` is imported."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("qh.of_path"):
        OmegaConf.register_new_resolver("qh.of_path", of_path)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name in QUANT_CONFIGS:
        cs.store(group="quant_schema", name=name, node=QUANT_CONFIGS.get(name))


def _schema_fields(schema: type) -> dict[str, Any]:
    """Field name -> its type (resolved: this module uses `from __future__ import annotations`)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _node_schema(node: Any, declared: type) -> type:
    """The dataclass a config node follows: its own structured type (Hydra merged a method's config into the
    `quant` field), else, for a plain dict under a QuantConfig field, the config registered for its `method`."""
    from omegaconf import OmegaConf

    own = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(own) and issubclass(own, declared):
        return own
    if isinstance(declared, type) and issubclass(declared, QuantConfig):
        return quant_schema_for(node.get("method", "fp16"))
    return declared


def quant_schema_for(method: Any) -> type:
    """The config class registered for `method`; a one-line ConfigError naming the registered ones otherwise."""
    if method not in QUANT_CONFIGS:
        raise user_error("quant.method", method, f"no config is registered for it (registered: "
                         f"{', '.join(QUANT_CONFIGS.names())})", "choose one of those with quant=<option>, or "
                         "import the package that registers it before composing (quant registers its methods)")
    return QUANT_CONFIGS.get(method)


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[tuple[str, Any, list[str]]]:
    """(dotted key, value, the group's known fields) for every key of a composed config that `schema` has no field
    for. Hydra's `+group.key=value` adds keys even to a structured config, and OmegaConf.to_object drops them
    silently: without this check `+quant.wbit=3` would run w4 under the same run_id."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return []
    fields = _schema_fields(schema)
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in fields:
            found.append((path, node[key], list(fields)))
        elif dataclasses.is_dataclass(fields[key]):
            found += unknown_keys(node[key], _node_schema(node[key], fields[key]), f"{path}.")
    return found


def _other_methods_with(name: str) -> list[str]:
    return [m for m in QUANT_CONFIGS if name in {f.name for f in dataclasses.fields(QUANT_CONFIGS.get(m))}]


def check_known_keys(node: Any, schema: type) -> None:
    """Raise a one-line ConfigError naming the first unknown key, its group's known fields and the fix."""
    bad = unknown_keys(node, schema)
    if not bad:
        return
    path, value, known = bad[0]
    group, _, name = path.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    where = group or "the root config"
    if group == "quant":  # the method's own fields: name the method
        where = f"quant (method {node.quant.get('method', 'fp16')})"
    fix = f"use {group + '.' if group else ''}{close[0]}={value} (no +)" if close else "remove it"
    if group == "quant" and not close:  # a field of another method (w_bit under fp16, n_grid under rtn)?
        other = {m: difflib.get_close_matches(name, [f.name for f in dataclasses.fields(QUANT_CONFIGS.get(m))], n=1)
                 for m in QUANT_CONFIGS}
        other = {m: c[0] for m, c in other.items() if c}
        if other:
            field_name = next(iter(other.values()))
            fix = (f"{field_name} is a field of {', '.join(m for m, c in other.items() if c == field_name)}: choose "
                   f"one of their quant options first (quant=<option> quant.{field_name}={value})")
    raise user_error(path, value, f"not a field of {where}; known: {', '.join(known)}", fix)


def _structured_run_config(cfg: Any):
    """RunConfig's structured node with `quant` typed by the method `cfg` names (a plain dict config, e.g. a record's:
    its quant keys are merged into that method's config, not the base's)."""
    from omegaconf import OmegaConf

    method = OmegaConf.select(cfg, "quant.method", default="fp16")
    return OmegaConf.structured(RunConfig(quant=quant_schema_for(method)()))


# `${name:...}`: an OmegaConf resolver call (oc.env reads an environment variable, oc.decode parses a string that may
# carry one, and any other resolver may read anything); a plain node reference `${quant.w_bit}` has no colon
RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
# the harness's own resolvers, which read nothing but their arguments and the config (conf/model/*.yaml: qh.of_path)
HARNESS_RESOLVERS = {"qh.of_path"}


def _resolver_calls(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, raw value) of every string in a plain container (not yet resolved) that calls a resolver."""
    if isinstance(node, dict):
        return [hit for k, v in node.items() for hit in _resolver_calls(v, f"{prefix}{k}.")]
    if isinstance(node, (list, tuple)):
        return [hit for i, v in enumerate(node) for hit in _resolver_calls(v, f"{prefix[:-1]}[{i}].")]
    return [(prefix[:-1], node)] if isinstance(node, str) and set(RESOLVER_CALL.findall(node)) - HARNESS_RESOLVERS else []


def refuse_resolvers(cfg: Any) -> None:
    """A run's config never calls a resolver: `model.name=${oc.env:AWS_SECRET}` would print the variable's value in
    log lines and errors and record it in results/runs/ (and a record's config, read back by the report, would read
    this machine's environment). Checked on the unresolved config, before any value is read."""
    from omegaconf import DictConfig, OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    hits = _resolver_calls(raw)
    if hits:
        key, value = hits[0]
        name = next(n for n in RESOLVER_CALL.findall(value) if n not in HARNESS_RESOLVERS)
        raise user_error(key, value, f"an interpolation through the {name} resolver"
                         + (" (it reads the environment)" if name == "oc.env" else "")
                         + " is refused in a run's config: its value would be printed and recorded",
                         "write the value itself; a secret stays in the environment variable the harness reads "
                         "(e.g. QH_API_KEYS), never in an override")


def to_run_config(cfg: Any) -> RunConfig:
    """OmegaConf node (Hydra's, or a plain dict such as a record's config) -> validated RunConfig dataclass."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, RunConfig):
        obj = cfg
    else:
        refuse_resolvers(cfg)  # before anything below resolves a value (an unknown key's error prints it)
        if not (isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is RunConfig):  # plain dict: a record's
            cfg = OmegaConf.create(OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg)
            if "quant" in cfg:
                cfg.quant = legacy_quant_fields(OmegaConf.to_container(cfg.quant))
        check_known_keys(cfg, RunConfig)
        if OmegaConf.get_type(cfg) is not RunConfig:
            cfg = OmegaConf.merge(_structured_run_config(cfg), cfg)
        obj = OmegaConf.to_object(cfg)
    obj.validate()
    return obj
