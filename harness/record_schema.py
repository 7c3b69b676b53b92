"""The run record's schema, typed and versioned: what harness.records writes (record_version RECORD_VERSION) and what
the report, the notebook and the tests read, through `read_records` / `parse_record` only.

A record is checked as a whole before any table sees it: a version this code knows (a newer one is not guessed at),
the envelope's types, every metric the report shows a finite number of its type (a PPL that is a string or NaN is
a bad record, never a silently missing cell), an estimate inside its own 95% interval, some metrics, and a run_id
that is the hash of the record's own config (harness.records.run_id). A bad record is returned with its path and
every reason, so the report can list it; it is never half-shown.

The metric sections the report reads are dataclasses here (PerplexitySplit, ...); fields a section may carry beyond
them (timings, protocol notes) are allowed and kept in `Record.data`, the record as written.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

RECORD_VERSION = 1  # what harness.records.make_record writes; bump it with every change a reader must know about
KNOWN_VERSIONS = (1,)
RUN_ID = re.compile(r"[0-9a-f]{16}")


# ---------------------------------------------------------------------------------------------- metric sections


@dataclass(frozen=True)
class PerplexitySplit:
    """eval/perplexity.py, one split: token PPL over non-overlapping windows, and its bootstrap interval."""

    token_ppl: float
    nll_mean: Optional[float] = None
    windows: Optional[int] = None
    seqlen: Optional[int] = None
    tokens_scored: Optional[int] = None
    token_ppl_ci95: Optional[tuple[float, float]] = None
    window_nll_mean: Optional[list[float]] = None

    def problems(self, where: str) -> list[str]:
        out = [] if self.token_ppl >= 1.0 else [f"{where}.token_ppl {self.token_ppl!r} is below 1, which no "
                                                  f"perplexity can be"]
        if self.token_ppl_ci95 is not None:
            lo, hi = self.token_ppl_ci95
            if not _inside(self.token_ppl, lo, hi):
                out.append(f"{where}.token_ppl {self.token_ppl!r} lies outside its own 95% interval [{lo!r}, {hi!r}]")
        return out


@dataclass(frozen=True)
class WordPerplexitySplit:
    """eval/word_perplexity.py, one split (lm-eval's rolling loglikelihood)."""

    word_perplexity: Optional[float] = None
    byte_perplexity: Optional[float] = None
    bits_per_byte: Optional[float] = None

    def problems(self, where: str) -> list[str]:
        return []


@dataclass(frozen=True)
class FidelitySplit:
    """eval/fidelity.py, one split: divergence from the FP16 model on the same windows."""

    kl_mean: Optional[float] = None
    kl_p99: Optional[float] = None
    top1_agreement: Optional[float] = None
    ppl_ratio: Optional[float] = None

    def problems(self, where: str) -> list[str]:
        out = [f"{where}.{k} {v!r} is negative, which no KL divergence can be"
               for k, v in (("kl_mean", self.kl_mean), ("kl_p99", self.kl_p99)) if v is not None and v < 0]
        if self.top1_agreement is not None and not 0.0 <= self.top1_agreement <= 1.0:
            out.append(f"{where}.top1_agreement {self.top1_agreement!r} is not a fraction in [0, 1]")
        return out


@dataclass(frozen=True)
class TaskScore:
    """eval/tasks_eval.py, one task: lm-eval's accuracies (fractions) and their standard errors."""

    acc: Optional[float] = None
    acc_norm: Optional[float] = None
    acc_mutual_info: Optional[float] = None
    acc_stderr: Optional[float] = None
    acc_norm_stderr: Optional[float] = None
    acc_mutual_info_stderr: Optional[float] = None
    n: Optional[int] = None

    def problems(self, where: str) -> list[str]:
        return [f"{where}.{k} {v!r} is not a fraction in [0, 1]"
                for k, v in (("acc", self.acc), ("acc_norm", self.acc_norm), ("acc_mutual_info", self.acc_mutual_info))
                if v is not None and not 0.0 <= v <= 1.0]


@dataclass(frozen=True)
class Bytes:
    """The byte counts the report shows from quant/ (metrics.quant) and eval/memory.py (metrics.memory)."""

    weight_bytes: Optional[float] = None
    kv_bytes_per_token: Optional[float] = None

    def problems(self, where: str) -> list[str]:
        return [f"{where}.{k} {v!r} is not positive" for k, v in (("weight_bytes", self.weight_bytes),
                                                                  ("kv_bytes_per_token", self.kv_bytes_per_token))
                if v is not None and v <= 0]


# "<blocks>.<layer>.<experts>.<expert>", as quant/moe/coverage.py's expert_summary names an expert (model.layers.29.
# mlp.experts.2): the first and the last integer component
EXPERT_NAME = re.compile(r"(?P<blocks>.+?)\.(?P<layer>\d+)\.(?P<experts>.+)\.(?P<expert>\d+)")


@dataclass(frozen=True)
class ExpertRef:
    """One routed expert of a mixture of experts: its block (layer), its index, its routed calibration tokens."""

    layer: int
    expert: int
    tokens: int


@dataclass(frozen=True)
class ExpertCalibration:
    """How a calibrated method saw the routed experts (metrics.quant.moe.calibration, quant/moe/coverage.py): routed
    token slots per block and expert (a token counts once for each of its top-k experts), the threshold below which
    an expert falls back, the experts below it and the fallback they got (quant.moe, harness.config.MoEConfig)."""

    expert_tokens: list[Optional[list[int]]]  # per block (None: no coverage recorded there), per expert
    expert_tokens_min: float
    expert_tokens_median: float
    threshold_tokens: list[Optional[float]]  # per block: min_share x an even share of its routed token slots
    experts_below_threshold: dict[str, int]  # qualified expert name (EXPERT_NAME) -> its routed token slots
    calibrate_all_experts: bool
    experts_fallen_back: int
    min_share: Optional[float] = None
    fallback: Optional[str] = None  # quant.moe.fallback's name; None when no expert fell back
    fallback_means: Optional[str] = None  # what that fallback calibrates an expert on, in words

    def below(self) -> list[ExpertRef]:
        """The experts below the threshold, by layer then expert (names that do not parse are left out: `problems`
        says so)."""
        refs = [ExpertRef(int(m["layer"]), int(m["expert"]), n) for name, n in self.experts_below_threshold.items()
                if (m := EXPERT_NAME.fullmatch(name))]
        return sorted(refs, key=lambda r: (r.layer, r.expert))

    def problems(self, where: str) -> list[str]:
        out = []
        if len(self.threshold_tokens) != len(self.expert_tokens):
            out.append(f"{where}: {len(self.threshold_tokens)} thresholds for {len(self.expert_tokens)} blocks")
        if self.expert_tokens_min > self.expert_tokens_median:
            out.append(f"{where}.expert_tokens_min {self.expert_tokens_min!r} exceeds the median "
                       f"{self.expert_tokens_median!r}")
        for name, n in self.experts_below_threshold.items():
            m = EXPERT_NAME.fullmatch(name)
            counts = self.expert_tokens[int(m["layer"])] if m and int(m["layer"]) < len(self.expert_tokens) else None
            if m is None:
                out.append(f"{where}.experts_below_threshold: {name!r} names no <blocks>.<layer>.<experts>.<expert>")
            elif counts is None or int(m["expert"]) >= len(counts) or counts[int(m["expert"])] != n:
                out.append(f"{where}.experts_below_threshold.{name} {n!r} is not that expert's count in expert_tokens")
        if self.experts_fallen_back < len(self.experts_below_threshold):
            out.append(f"{where}.experts_fallen_back {self.experts_fallen_back} is fewer than the "
                       f"{len(self.experts_below_threshold)} experts below the threshold (each one falls back)")
        if self.experts_fallen_back and self.fallback is None:
            out.append(f"{where}: {self.experts_fallen_back} experts fell back, but no fallback is named")
        return out


@dataclass(frozen=True)
class ExpertSummary:
    """What a quantization did to a mixture of experts (metrics.quant.moe, quant/moe/coverage.py expert_summary)."""

    experts: int
    top_k: int
    kept_in_model_dtype: list[str]  # Linears left unquantized, relative to the block: the router (mlp.gate), ...
    expert_linears: int
    expert_linears_quantized: int
    calibration: Optional[ExpertCalibration] = None  # None: the method calibrates nothing (RTN)

    @property
    def blocks(self) -> Optional[int]:
        return len(self.calibration.expert_tokens) if self.calibration is not None else None

    def problems(self, where: str) -> list[str]:
        out = [] if 1 <= self.top_k <= self.experts else [f"{where}.top_k {self.top_k} is not in 1..experts "
                                                           f"({self.experts})"]
        if not 0 <= self.expert_linears_quantized <= self.expert_linears:
            out.append(f"{where}.expert_linears_quantized {self.expert_linears_quantized} is not in 0..expert_linears "
                       f"({self.expert_linears})")
        for i, counts in enumerate(self.calibration.expert_tokens if self.calibration else []):
            if counts is not None and len(counts) != self.experts:
                out.append(f"{where}.calibration.expert_tokens[{i}] has {len(counts)} experts, not {self.experts}")
        return out


@dataclass(frozen=True)
class QuantSummary(Bytes):
    """What the report reads of the quantizer's summary (metrics.quant): its byte counts and, for a mixture of
    experts, what it did to the routed experts."""

    moe: Optional[ExpertSummary] = None


@dataclass(frozen=True)
class ThroughputRun:
    """What the report reads of eval/throughput.py's section beside the figures: where and under what load they were
    measured (a ratio to FP16 is formed only between runs of one machine under a load within its cores)."""

    device: Optional[str] = None
    threads: Optional[int] = None
    cpu_count: Optional[int] = None
    load_average_1m: Optional[list[Optional[float]]] = None  # before and after the measurement

    def problems(self, where: str) -> list[str]:
        out = [] if self.cpu_count is None or self.cpu_count >= 1 else [f"{where}.cpu_count {self.cpu_count!r} is not "
                                                                       f"positive"]
        return out + [f"{where}.load_average_1m {x!r} is negative" for x in self.load_average_1m or []
                      if x is not None and x < 0]


@dataclass(frozen=True)
class Provenance:
    """What the report and the pipeline read of a record's provenance (harness.records.provenance)."""

    git_sha: Optional[str] = None  # HEAD, "-dirty" when source files differed from it
    git_changed: Optional[list[str]] = None  # those files (the first harness.environment.MAX_CHANGED_FILES)
    git_changed_count: Optional[int] = None  # how many, where more than listed
    hardware: Optional[dict] = None  # host, CPU, GPU: harness.environment.machine_fingerprint reads it
    machine: Optional[str] = None
    created_unix: Optional[float] = None
    model_sha: Optional[str] = None  # the weights' identity (harness.models.ResolvedModel.model_sha)
    model_origin: Optional[str] = None  # where the weights come from, in words

    def problems(self, where: str) -> list[str]:
        return []


# metric section -> the type of each of its entries (split or task); the other sections (throughput, kv_cache, and
# what SUMMARIES leaves) are kept as they are written, in Record.data
SECTIONS: dict[str, type] = {"perplexity": PerplexitySplit, "word_perplexity": WordPerplexitySplit,
                             "fidelity": FidelitySplit, "tasks": TaskScore}
# metric section that is one object -> the type of the fields the report reads from it
SUMMARIES: dict[str, type] = {"quant": QuantSummary, "memory": Bytes, "throughput": ThroughputRun}


@dataclass(frozen=True)
class Record:
    """One run record, checked (parse_record)."""

    record_version: int
    run_id: str
    status: str
    config: dict
    metrics: dict  # the record's metrics as written; the sections in SECTIONS parsed below
    provenance: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    code_version: Optional[dict] = None
    perplexity: dict[str, PerplexitySplit] = field(default_factory=dict)
    word_perplexity: dict[str, WordPerplexitySplit] = field(default_factory=dict)
    fidelity: dict[str, FidelitySplit] = field(default_factory=dict)
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    quant: Optional[QuantSummary] = None  # metrics.quant, where the run quantized
    provenance_fields: Optional[Provenance] = None  # the provenance's fields the report reads
    data: dict = field(default_factory=dict, repr=False)  # the record as written (report/record_view.py reads it)
    path: Optional[str] = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass(frozen=True)
class BadRecord:
    """A file under runs/ the report leaves out, and every reason why."""

    path: str
    reasons: list[str]

    def line(self) -> str:
        return f"{self.path}: {'; '.join(self.reasons)}"


class RecordSchemaError(ValueError):
    def __init__(self, bad: BadRecord):
        super().__init__(bad.line())
        self.bad = bad


# ---------------------------------------------------------------------------------------------- checking


def _inside(x: float, lo: float, hi: float) -> bool:
    tol = 1e-9 * max(abs(lo), abs(hi), 1.0)  # the estimate and its interval are computed apart: rounding only
    return lo - tol <= x <= hi + tol


def _type_problems(value: Any, typ: Any, where: str) -> list[str]:
    """Why `value` is not of the annotation `typ` (float: a finite number, bool excluded; Optional, tuple, list and
    dict as in typing), or []."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return []
        return _type_problems(value, next(a for a in args if a is not type(None)), where)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{where} is {_kind(value)}, not a number"]
        return [] if math.isfinite(value) else [f"{where} is {value!r}, not a finite number"]
    if typ is int:
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{where} is {_kind(value)}, not an integer"]
    if typ in (str, bool, dict):
        return [] if isinstance(value, typ) else [f"{where} is {_kind(value)}, not a {typ.__name__}"]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return [f"{where} is {_kind(value)}, not a list of {len(args)}"]
        return [p for i, (v, a) in enumerate(zip(value, args)) for p in _type_problems(v, a, f"{where}[{i}]")]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where} is {_kind(value)}, not a list"]
        return next(([p] for i, v in enumerate(value) for p in _type_problems(v, args[0], f"{where}[{i}]")), [])
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where} is {_kind(value)}, not an object"]
        return [p for k, v in value.items() for p in _type_problems(v, args[1], f"{where}.{k}")]
    raise TypeError(f"record_schema: no check for {typ!r}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    return f"a {type(value).__name__}"


def _parse_entry(schema: type, d: Any, where: str) -> tuple[Any, list[str]]:
    """A section entry (e.g. one split's perplexity) as `schema`, or None and why not."""
    if not isinstance(d, dict):
        return None, [f"{where} is {_kind(d)}, not an object"]
    hints = typing.get_type_hints(schema)
    problems, values = [], {}
    for f in dataclasses.fields(schema):
        if f.name not in d:
            if f.default is dataclasses.MISSING:
                problems.append(f"{where} has no {f.name}")
            continue
        nested = _dataclass_of(hints[f.name])
        if nested is not None and d[f.name] is not None:  # a section within the section: parsed the same way
            values[f.name], why = _parse_entry(nested, d[f.name], f"{where}.{f.name}")
            problems += why
        else:
            problems += _type_problems(d[f.name], hints[f.name], f"{where}.{f.name}")
            values[f.name] = d[f.name]
    if problems:
        return None, problems
    entry = schema(**values)
    return entry, entry.problems(where)


def _dataclass_of(typ: Any) -> Optional[type]:
    """The dataclass an annotation names (X or Optional[X]), or None."""
    args = [a for a in typing.get_args(typ) if a is not type(None)] if typing.get_origin(typ) is Union else [typ]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def run_id_problem(config: dict, run_id: str) -> Optional[str]:
    """Why `run_id` is not the hash of `config` (harness.records.run_id of it), or None; also None when the config
    names a local text file that is not on this machine (its content is part of the hash). The methods' configs
    must be registered (import quant) for their records to be checked."""
    from harness.config import to_run_config
    from harness.records import run_id as hash_of
    from harness.text_files import is_file_source

    sources = list((config.get("data") or {}).get("splits") or []) + [((config.get("quant") or {}).get("calib") or {}).get("dataset")]
    if any(is_file_source(s) and not Path(s.split(":", 1)[1]).expanduser().is_file() for s in sources):
        return None
    try:
        want = hash_of(to_run_config(config))
    except Exception as e:  # noqa: BLE001  (ConfigError, or OmegaConf's own: whatever it is, the reason is shown)
        return f"its config does not load ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
    return None if want == run_id else f"run_id {run_id} is not the hash of its config ({want})"


def parse_record(d: Any, path: str | Path | None = None, check_run_id: bool = True) -> Record:
    """The record `d` (a JSON object as read) as a Record; RecordSchemaError naming `path` and every reason otherwise."""
    where = str(path) if path is not None else "<record>"
    if not isinstance(d, dict):
        raise RecordSchemaError(BadRecord(where, [f"a JSON {type(d).__name__}, not a record"]))
    reasons = []
    version = d.get("record_version")
    if isinstance(version, bool) or not isinstance(version, int):
        reasons.append(f"record_version is {_kind(version)}, not an integer")
    elif version > RECORD_VERSION:
        reasons.append(f"record_version {version} is newer than this code reads ({RECORD_VERSION}): update the harness")
    elif version not in KNOWN_VERSIONS:
        reasons.append(f"record_version {version} is unknown (known: {', '.join(map(str, KNOWN_VERSIONS))})")
    if reasons:  # a version this code does not know: nothing else in it is guessed at
        raise RecordSchemaError(BadRecord(where, reasons))
    for key, typ in (("run_id", str), ("status", str), ("config", dict), ("metrics", dict)):
        if key not in d:
            reasons.append(f"no {key}" if key != "metrics" else "no metrics")
        else:
            reasons += _type_problems(d[key], typ, key)
    for key in ("provenance", "timings_s", "code_version"):
        if d.get(key) is not None:
            reasons += _type_problems(d[key], dict, key)
    prov = None
    if isinstance(d.get("provenance"), dict):
        prov, why = _parse_entry(Provenance, d["provenance"], "provenance")
        reasons += why
    if isinstance(d.get("run_id"), str) and not RUN_ID.fullmatch(d["run_id"]):
        reasons.append(f"run_id {d['run_id'][:40]!r} is not 16 hex digits")
    metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
    if "metrics" in d and isinstance(d["metrics"], dict) and not d["metrics"] and d.get("status") == "complete":
        reasons.append("no metrics (a complete run records at least one)")
    sections = {}
    for name, schema in SECTIONS.items():
        entries = metrics.get(name)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            reasons.append(f"metrics.{name} is {_kind(entries)}, not an object")
            continue
        parsed = {}
        for key, v in entries.items():
            entry, why = _parse_entry(schema, v, f"metrics.{name}.{key}")
            reasons += why
            parsed[key] = entry
        sections[name] = parsed
    summaries = {}
    for name, schema in SUMMARIES.items():
        if metrics.get(name) is not None:
            summaries[name], why = _parse_entry(schema, metrics[name], f"metrics.{name}")
            reasons += why
    if not reasons and check_run_id and d["status"] == "complete":
        why = run_id_problem(d["config"], d["run_id"])
        if why:
            reasons.append(why)
    if reasons:
        raise RecordSchemaError(BadRecord(where, reasons))
    return Record(record_version=version, run_id=d["run_id"], status=d["status"], config=d["config"],
                  metrics=d["metrics"], provenance=d.get("provenance") or {}, timings_s=d.get("timings_s") or {},
                  code_version=d.get("code_version"), quant=summaries.get("quant"), provenance_fields=prov, data=d,
                  path=str(path) if path is not None else None, **sections)


def read_records(results_dir: str | Path, check_run_id: bool = True) -> tuple[list[Record], list[BadRecord]]:
    """Every record under <results_dir>/runs/, checked: (the good ones, the bad ones with path and reasons), both in
    file-name order. A file that is not whole JSON is a bad record too."""
    from harness.records import CorruptRecordError, load_record

    runs = Path(results_dir) / "runs"
    good, bad = [], []
    for p in sorted(runs.glob("*.json")) if runs.exists() else []:
        try:
            good.append(parse_record(load_record(p), p, check_run_id))
        except CorruptRecordError as e:
            bad.append(BadRecord(str(p), [str(e).split(": ", 1)[1] if str(e).startswith(f"{p}: ") else str(e)]))
        except RecordSchemaError as e:
            bad.append(e.bad)
    return good, bad
