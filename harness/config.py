"""Typed configs. Every Hydra group under conf/ merges into one of these dataclasses, so an unknown field
or a wrong type fails when the config is composed, and `validate()` checks values before any long work."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


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
    # what the unquantized model is, shown beside every result (e.g. the GGUF origin of the embedded model)
    reference_note: str = ""

    def validate(self) -> None:
        _require(self.weights in ("pretrained", "random"), "model.weights", f"{self.weights!r} is not one of pretrained, random")
        _require(self.dtype in ("bfloat16", "float16", "float32"), "model.dtype", f"{self.dtype!r} is not one of bfloat16, float16, float32")


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


@dataclass
class EvalConfig:
    name: str = MISSING
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    word_perplexity: WordPerplexityConfig = field(default_factory=WordPerplexityConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)

    def validate(self) -> None:
        self.perplexity.validate()
        _require(all(b >= 1 for b in self.throughput.batch_sizes), "eval.throughput.batch_sizes", "every batch size must be >= 1")
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


@dataclass
class QuantConfig:
    method: str = "fp16"  # a name in quant.METHODS
    w_bit: int = 4
    group_size: int = 64  # -1 = one group per output channel
    zero_point: bool = True  # asymmetric with an integer zero point (AWQ/LMDeploy default)
    # what to do when group_size does not divide a layer's in_features: error | per_channel
    group_fallback: str = "error"
    # AWQ (Lin et al. 2023): scale search over alpha in [0, 1) on n_grid points, else a fixed smoothing ratio
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
    calib: CalibConfig = field(default_factory=CalibConfig)

    def validate(self) -> None:
        if self.method == "fp16":
            return
        _require(2 <= self.w_bit <= 8, "quant.w_bit", f"must be in 2..8, got {self.w_bit}")
        _require(self.group_size == -1 or self.group_size >= 8, "quant.group_size", f"must be -1 (per channel) or >= 8, got {self.group_size}")
        _require(self.group_fallback in ("error", "per_channel"), "quant.group_fallback", f"{self.group_fallback!r} is not one of error, per_channel")
        _require(0.0 <= self.smooth_ratio <= 1.0, "quant.smooth_ratio", "must be in [0, 1]")
        _require(self.n_grid >= 1, "quant.n_grid", "must be >= 1")
        _require(self.scale_grid in ("full", "coarse_fine"), "quant.scale_grid", f"{self.scale_grid!r} is not one of full, coarse_fine")
        _require(self.search_samples >= 1, "quant.search_samples", "must be >= 1")
        _require(self.clip_tokens >= 0, "quant.clip_tokens", "must be >= 0 (0 = every calibration token)")
        _require(self.search_tokens >= 0, "quant.search_tokens", "must be >= 0 (0 = whole sequences)")
        _require(0.0 < self.clip_max_shrink < 1.0, "quant.clip_max_shrink", "must be in (0, 1)")
        self.calib.validate()


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

    def validate(self) -> None:
        _require(self.name in ("hf", "lmdeploy"), "backend.name", f"{self.name!r} is not one of hf, lmdeploy")
        _require(self.engine in ("auto", "pytorch", "turbomind"), "backend.engine", f"{self.engine!r} is not one of auto, pytorch, turbomind")
        _require(0.0 < self.cache_max_entry_count <= 1.0, "backend.cache_max_entry_count", "must be in (0, 1]")
        _require(self.tp >= 1, "backend.tp", "must be >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
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
        for part in (self.model, self.data, self.eval, self.quant, self.kv, self.backend):
            part.validate()


# fields that do not change a run's result, so they are left out of its identity hash
NON_IDENTITY_FIELDS = ("results_dir", "force", "progress", "offload")
# fields added after records existed, left out of a run's identity while they hold their default, so those records
# keep their run_id (data.add_bos=auto gives the embedded SmolLM2 no BOS, exactly as before the field existed;
# kv.format=int is the integer KV quantization every earlier record used)
LATE_FIELDS = {("data", "add_bos"): "auto", ("kv", "format"): "int"}


def register_schemas() -> None:
    """Register the typed schema that conf/config.yaml extends (Hydra's ConfigStore)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


def _schema_fields(schema: type) -> dict[str, Any]:
    """Field name -> its type (resolved: this module uses `from __future__ import annotations`)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


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
            found += unknown_keys(node[key], fields[key], f"{path}.")
    return found


def check_known_keys(node: Any, schema: type) -> None:
    """Raise a one-line ConfigError naming the first unknown key, its group's known fields and the fix."""
    bad = unknown_keys(node, schema)
    if not bad:
        return
    path, value, known = bad[0]
    group, _, name = path.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    fix = f"use {group + '.' if group else ''}{close[0]}={value} (no +)" if close else "remove it"
    raise user_error(path, value, f"not a field of {group or 'the root config'}; known: {', '.join(known)}", fix)


def to_run_config(cfg: Any) -> RunConfig:
    """OmegaConf node -> validated RunConfig dataclass."""
    from omegaconf import OmegaConf

    if not isinstance(cfg, RunConfig):
        check_known_keys(cfg, RunConfig)
    obj = OmegaConf.to_object(cfg) if not isinstance(cfg, RunConfig) else cfg
    if not isinstance(obj, RunConfig):  # plain dict config: go through the schema
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    obj.validate()
    return obj
