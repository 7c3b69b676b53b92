"""What a run record says, in the report's terms: the row label of its config, its metrics by family (which way is
better, how each compares to FP16), its model and KV shape. Reads records only (harness/records.py); recomputes
nothing. Adding a metric family is one entry in METRICS; a method's label comes with the method (harness.labels).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from harness import storage_bytes
from harness.confidence import paired_ppl_diff_ci95
from harness.config import quant_identity_dict
from harness.labels import backend_text, kv_text, method_detail, method_name, method_rank
from harness.registry import Registry

# --------------------------------------------------------------------------------------------------------------------
# reading records


def dig(d: Any, *path, default=None):
    """d[path[0]][path[1]]..., or `default` where a key is missing (records of older versions lack fields)."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def finite(x) -> Optional[float]:
    """x as a float if it is a finite number, else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def is_synthetic(rec: dict) -> bool:
    return dig(rec, "config", "model", "weights") == "random"


def model_id(rec: dict) -> tuple[str, str]:
    return (dig(rec, "config", "model", "name", default="?"), dig(rec, "provenance", "model_sha", default="?"))


def model_text(name: str, sha: str | None) -> str:
    """A model's name as every table shows it: weights built here (harness.moe_upcycle, e.g. the upcycled mixture of
    experts) say so, so no reader takes them for a released checkpoint."""
    from harness.moe_upcycle import BUILT_LABEL, is_built

    return f"{name} ({BUILT_LABEL})" if is_built(sha) else name


def kv_bits(rec: dict) -> int:
    return int(dig(rec, "config", "kv", "bits", default=16))


def weight_bits(rec: dict) -> int:
    """Nominal bits per quantized weight; 16 for the unquantized reference."""
    q = dig(rec, "config", "quant", default={})
    if q.get("method", "fp16") == "fp16":
        return 16
    # a method without w_bit stores 8-bit weights (SmoothQuant W8A8: int8 or fp8)
    return int(q["w_bit"]) if q.get("w_bit") is not None else 8


def hardware_name(rec: dict) -> str:
    hw = dig(rec, "provenance", "hardware", default={}) or {}
    if hw.get("gpu"):
        return hw["gpu"]
    return f"{hw.get('cpu_model') or hw.get('processor') or 'CPU'} ({hw.get('cpu_count', '?')} cores)"


def throughput_device(rec: dict) -> str:
    """Where decode throughput was measured: the GPU's name, or the CPU and its thread count."""
    tp = dig(rec, "metrics", "throughput", default={}) or {}
    hw = dig(rec, "provenance", "hardware", default={}) or {}
    if str(tp.get("device", "")).startswith("cuda") and hw.get("gpu"):
        return hw["gpu"]
    threads = tp.get("threads") or hw.get("torch_threads")
    cpu = hw.get("cpu_model") or hw.get("processor") or "CPU"
    return f"{cpu}, {threads} threads" if threads else cpu


def kv_shape(rec: dict) -> Optional[dict]:
    """Layers, KV heads and head_dim of the model, as the record states them (eval/memory.py's
    metrics.memory.kv_cache.shape, or provenance.model); None when it does not say: never guessed."""
    shape = dig(rec, "metrics", "memory", "kv_cache", "shape")
    if isinstance(shape, dict) and all(shape.get(k) for k in ("layers", "kv_heads", "head_dim")):
        return {"num_hidden_layers": int(shape["layers"]), "num_key_value_heads": int(shape["kv_heads"]),
                "head_dim": int(shape["head_dim"])}
    src = dig(rec, "provenance", "model", default={}) or {}
    head_dim = src.get("head_dim")
    if head_dim is None and src.get("hidden_size") and src.get("num_attention_heads"):
        head_dim = src["hidden_size"] // src["num_attention_heads"]
    if src.get("num_hidden_layers") and src.get("num_key_value_heads") and head_dim:
        return {"num_hidden_layers": int(src["num_hidden_layers"]), "num_key_value_heads": int(src["num_key_value_heads"]),
                "head_dim": int(head_dim)}
    return None


def kv_bytes_per_token(shape: dict, bits: int) -> int:
    """KV-cache bytes per token (batch 1) of a model shape (kv_shape), as harness.storage_bytes counts them."""
    return storage_bytes.kv_bytes_per_token(shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"], bits)


def decode_by_batch(tp: Any) -> dict[int, float]:
    """Decode tokens/s by batch size from metrics.throughput, whatever nesting the evaluator chose:
    {"batch_8": {"decode_tok_s": x}}, {"8": {...}}, [{"batch_size": 8, "decode_tok_s": x}], {"decode_tok_s": {"8": x}}."""
    out: dict[int, float] = {}

    def batch_of(key) -> Optional[int]:
        m = re.fullmatch(r"(?:batch_?|b|bs)?(\d+)", str(key))
        return int(m.group(1)) if m else None

    def walk(node, batch):
        if isinstance(node, dict):
            b = node.get("batch_size", node.get("batch", batch))
            b = b if isinstance(b, int) else batch
            v = node.get("decode_tok_s")
            if finite(v) is not None and b is not None:
                out[b] = float(v)
            elif isinstance(v, dict):
                for k, x in v.items():
                    if batch_of(k) is not None and finite(x) is not None:
                        out[batch_of(k)] = float(x)
            for k, x in node.items():
                if isinstance(x, (dict, list)) and k != "decode_tok_s":
                    walk(x, batch_of(k) if batch_of(k) is not None else b)
        elif isinstance(node, list):
            for x in node:
                walk(x, batch)

    walk(tp, None)
    return out


# --------------------------------------------------------------------------------------------------------------------
# metric families: one entry per kind of column


@dataclass(frozen=True)
class Metric:
    name: str  # short id, also the prefix of its columns in the flat frame
    header: str  # column header; {key} is the split / task / batch
    extract: Callable[[dict], dict]  # record -> {key: value}
    better: Optional[str]  # "lower" | "higher" | None
    delta: Optional[str]  # vs FP16: "diff" | "ratio" | None
    digits: int  # decimals shown (of the value and of its difference to FP16)
    quality: bool = True  # meaningless on synthetic (random) weights
    scale: float = 1.0  # shown value = raw * scale (e.g. accuracy as %)
    # uncertainty, where the record has it (older records do not: they show no interval)
    ci95: Optional[Callable[[dict], dict]] = None  # record -> {key: (lo, hi)} of the value
    stderr: Optional[Callable[[dict], dict]] = None  # record -> {key: standard error of the value}
    paired: Optional[Callable[[dict, dict], dict]] = None  # (record, FP16 record) -> {key: (lo, hi)} of the difference
    # a measurement of the machine (speed): why its value is not the machine's own (record -> reason or None), and why
    # no ratio to FP16 may be formed ((record, FP16 record) -> reason or None); such cells show the value, no ratio
    own_problem: Optional[Callable[[dict], Optional[str]]] = None
    ratio_refusal: Optional[Callable[[dict, dict], Optional[str]]] = None


METRICS: Registry[Metric] = Registry("report metric")


def _per_split(section: str, leaf: str) -> Callable[[dict], dict]:
    def f(rec):
        return {k: finite(v.get(leaf)) for k, v in (dig(rec, "metrics", section, default={}) or {}).items()
                if isinstance(v, dict) and finite(v.get(leaf)) is not None}

    return f


# the accuracy a task row shows, first found: a task that scores by mutual information (lm-eval acc_mutual_info:
# log P(choice | context) - log P(choice), which removes each choice's own prior) is shown by it
TASK_ACC_KEYS = ("acc_mutual_info", "acc", "acc_norm")


def _task_acc_key(v: dict) -> Optional[str]:
    return next((k for k in TASK_ACC_KEYS if finite(v.get(k)) is not None), None)


def _tasks(rec):
    out = {}
    for task, v in (dig(rec, "metrics", "tasks", default={}) or {}).items():
        if isinstance(v, dict) and _task_acc_key(v):
            out[task] = finite(v[_task_acc_key(v)])
    return out


def _tasks_stderr(rec):
    out = {}
    for task, v in (dig(rec, "metrics", "tasks", default={}) or {}).items():
        if isinstance(v, dict) and _task_acc_key(v) and finite(v.get(f"{_task_acc_key(v)}_stderr")) is not None:
            out[task] = finite(v[f"{_task_acc_key(v)}_stderr"])
    return out


def _tasks_paired(rec, ref):
    """Paired 95% interval of acc(rec) - acc(ref) per task, over the items both scored (per-item scores kept by
    eval/tasks_eval.py); tasks without them in both records fall back to the two standard errors."""
    from harness.confidence import paired_mean_diff_ci95

    out = {}
    for task, v in (dig(rec, "metrics", "tasks", default={}) or {}).items():
        w = dig(ref, "metrics", "tasks", task)
        key = _task_acc_key(v) if isinstance(v, dict) else None
        if not key or not isinstance(w, dict) or _task_acc_key(w) != key:
            continue
        a, b = v.get(f"{key}_items"), w.get(f"{key}_items")
        if isinstance(a, str) and isinstance(b, str) and len(a) == len(b) and v.get("doc_ids") == w.get("doc_ids"):
            ci = paired_mean_diff_ci95([int(c) for c in a], [int(c) for c in b])
            if ci is not None:
                out[task] = ci
    return out


def _ppl_ci95(rec):
    out = {}
    for split, v in (dig(rec, "metrics", "perplexity", default={}) or {}).items():
        ci = v.get("token_ppl_ci95") if isinstance(v, dict) else None
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(x) is not None for x in ci):
            out[split] = (float(ci[0]), float(ci[1]))
    return out


def window_nlls(rec: dict, split: str) -> Optional[list]:
    """The per-window mean NLLs a record kept for a split (eval/perplexity.py), or None."""
    w = dig(rec, "metrics", "perplexity", split, "window_nll_mean")
    return w if isinstance(w, list) and len(w) >= 2 else None


def _ppl_paired(rec, ref):
    """Paired bootstrap interval of PPL(rec) - PPL(ref) per split, over the windows both scored."""
    out = {}
    for split in (dig(rec, "metrics", "perplexity", default={}) or {}):
        a, b = window_nlls(rec, split), window_nlls(ref, split)
        ci = paired_ppl_diff_ci95(a, b) if a and b else None
        if ci is not None:
            out[split] = ci
    return out


def weight_bytes(rec: dict) -> Optional[float]:
    """Stored weight bytes (the checkpoint: codes, scales and zeros, and every unquantized tensor at 2 bytes), from
    the memory evaluator (eval/memory.py, AWQ packed layout) or else the quantizer's summary; for an unquantized
    16-bit model, 2 bytes per parameter."""
    m = dig(rec, "metrics", "memory", default={}) or {}
    candidates = [m.get("weight_bytes"), dig(m, "weights", "awq_packed", "total_bytes"), dig(m, "weights", "w8a8", "total_bytes"),
                  dig(rec, "metrics", "quant", "weight_bytes")]
    if weight_bits(rec) == 16 and dig(rec, "config", "model", "dtype") in ("bfloat16", "float16"):
        n = finite(dig(rec, "provenance", "model", "n_params"))
        candidates += [dig(m, "weights", "fp16_bytes"), float(storage_bytes.FP16_BYTES * n) if n else None]
    return next((float(v) for v in candidates if finite(v) is not None), None)


def _kv_bpt(rec):
    m = dig(rec, "metrics", "memory", default={}) or {}
    v = next((finite(x) for x in (m.get("kv_bytes_per_token"), dig(m, "kv_cache", "bytes_per_token"))
              if finite(x) is not None), None)
    if v is None and kv_shape(rec):
        v = float(kv_bytes_per_token(kv_shape(rec), kv_bits(rec)))
    return {"": v} if v is not None else {}


def throughput_load(rec: dict) -> tuple[Optional[float], Optional[int]]:
    """(the highest 1-min load average eval/throughput.py kept, before and after its measurement; the machine's
    cores), each None where the record kept none (records from before it did)."""
    tp = dig(rec, "metrics", "throughput", default={}) or {}
    loads, cpus = tp.get("load_average_1m"), tp.get("cpu_count")
    peak = max((finite(x) for x in loads if finite(x) is not None), default=None) if isinstance(loads, list) else None
    return peak, cpus if isinstance(cpus, int) and not isinstance(cpus, bool) and cpus > 0 else None


def load_problem(rec: dict) -> Optional[str]:
    """Why a record's decode figures may not be its machine's own speed, or None: its 1-min load average exceeded
    the core count before or after the measurement (more runnable threads than cores: other work competed; the
    measurement's own threads, at most one per core, do not exceed it), or it kept no load average."""
    peak, cpus = throughput_load(rec)
    if peak is None or cpus is None:
        return "no load average recorded"
    return f"load {peak:.1f} on {cpus} cores during the run" if peak > cpus else None


def machine_text(rec: dict) -> str:
    """The machine of a record, in words: its GPU or CPU and cores, and the host where it was recorded."""
    host = dig(rec, "provenance", "hardware", "hostname")
    return hardware_name(rec) + (f", host {host}" if host else "")


def decode_ratio_refusal(rec: dict, ref: dict) -> Optional[str]:
    """Every reason no decode ratio may be formed between `rec` and its FP16 record `ref`, or None: a ratio is two
    measurements of one machine under comparable load, so the two must share the machine's fingerprint (host, CPU,
    GPU: harness.environment.machine_differences) and neither run's load may exceed the core count (load_problem)."""
    from harness.environment import machine_differences

    hw = [dig(r, "provenance", "hardware", default={}) or {} for r in (rec, ref)]
    other = machine_differences(*hw) and f"FP16 measured on another machine ({machine_text(ref)}; this run: " \
                                         f"{machine_text(rec)})"
    own, theirs = load_problem(rec), load_problem(ref)
    why = [other, f"{own} (this run and FP16's)"] if own and own == theirs else \
        [other, own, theirs and f"FP16's run: {theirs}"]
    return "; ".join(w for w in why if w) or None


def code_change(rec: dict) -> Optional[str]:
    """Why `rec` was not made by the code that computes its config now ("made by other code (quant.awq changed)"),
    or None: eval.code_version.code_change, the check the pipeline reuses records by."""
    from eval.code_version import code_change as change_of
    from harness.config import to_run_config

    try:
        return change_of(rec, to_run_config(rec.get("config") or {}))
    except Exception as e:  # noqa: BLE001  (a config this code no longer loads or versions: say so, whatever the error)
        return f"made by other code (its config does not load now: {type(e).__name__})"


def _decode(rec):
    dev = throughput_device(rec)
    return {(b, dev): v for b, v in sorted(decode_by_batch(dig(rec, "metrics", "throughput", default={})).items())}


for _m in [
    Metric("token_ppl", "PPL {key}", _per_split("perplexity", "token_ppl"), "lower", "diff", 2, ci95=_ppl_ci95,
           paired=_ppl_paired),
    Metric("word_ppl", "word PPL {key}", _per_split("word_perplexity", "word_perplexity"), "lower", "diff", 2),
    Metric("bits_per_byte", "bits/byte {key}", _per_split("word_perplexity", "bits_per_byte"), "lower", "diff", 3),
    Metric("acc", "acc {key} (%)", _tasks, "higher", "diff", 1, scale=100.0, stderr=_tasks_stderr,
           paired=_tasks_paired),
    Metric("kl_mean", "KL {key}", _per_split("fidelity", "kl_mean"), "lower", None, 4),
    Metric("kl_p99", "KL p99 {key}", _per_split("fidelity", "kl_p99"), "lower", None, 4),
    Metric("top1_agreement", "top-1 agree {key}", _per_split("fidelity", "top1_agreement"), "higher", None, 4),
    Metric("ppl_ratio", "PPL ratio {key}", _per_split("fidelity", "ppl_ratio"), "lower", None, 4),
    Metric("weight_bytes", "weights ({unit})", lambda r: {"": weight_bytes(r)} if weight_bytes(r) else {}, "lower", "ratio",
           1, quality=False),
    Metric("kv_bytes_per_token", "KV B/token", _kv_bpt, "lower", "ratio", 0, quality=False),
    Metric("decode_tok_s", "decode tok/s b{key}", _decode, "higher", "ratio", 1, quality=False,
           own_problem=load_problem, ratio_refusal=decode_ratio_refusal),
]:
    METRICS.add(_m.name, _m)

TABLE_ORDER = ["token_ppl", "word_ppl", "acc", "kl_mean", "weight_bytes", "kv_bytes_per_token", "decode_tok_s"]


# --------------------------------------------------------------------------------------------------------------------
# row labels: one function per quantization method


@dataclass(frozen=True)
class RowLabel:
    method: str  # "RTN", "AWQ", ...
    w_bit: int  # 16 for the reference
    detail: str  # group size and variant, e.g. "g64 (search+clip)"
    kv_bits: int  # 16: the model dtype
    kv_format: str  # int, fp8_e4m3, fp8_e5m2
    backend: str  # "" or " [lmdeploy]"
    rank: tuple  # sort key within a method

    @property
    def kv(self) -> str:
        """"" or " + KV int8", " + KV fp8 e4m3" (harness.labels.kv_text)."""
        return kv_text(self.kv_bits, self.kv_format)

    @property
    def text(self) -> str:
        bits = "" if self.w_bit == 16 else f" w{self.w_bit}"
        return f"{self.method}{bits}{(' ' + self.detail) if self.detail else ''}{self.kv}{self.backend}"

    @property
    def series(self) -> str:
        """The label without the bit width: one line across bit widths in plots."""
        return f"{self.method}{(' ' + self.detail) if self.detail else ''}{self.kv}{self.backend}"


def row_label(rec: dict) -> RowLabel:
    q = dig(rec, "config", "quant", default={}) or {}
    m = q.get("method", "fp16")
    detail, rank = method_detail(q)
    kb = kv_bits(rec)
    backend = dig(rec, "config", "backend", "name", default="hf")
    return RowLabel(
        method=method_name(q),
        w_bit=weight_bits(rec),
        detail=detail,
        kv_bits=kb,
        kv_format=dig(rec, "config", "kv", "format", default="int") or "int",
        backend=backend_text(backend),
        rank=(*method_rank(m), -weight_bits(rec),
              q.get("group_size", 0) if m != "fp16" else 0, rank, backend != "hf", -kb),
    )


def is_reference(rec: dict) -> bool:
    """The FP16 row that deltas refer to: unquantized weights and KV, the default backend."""
    lab = row_label(rec)
    return lab.method == "FP16" and not lab.kv and not lab.backend


def relevant_quant(rec: dict) -> dict:
    """The quant fields that can change this record's result. FP16 ignores them all, so two FP16 runs that differ
    only in an unused quant.w_bit are the same run; for a quantizing method every field counts (a sweep over, say,
    quant.n_grid must give separate rows, never one row that hides the other run)."""
    import quant  # noqa: F401  (registers every method's config: its late fields are its own)

    q = dict(dig(rec, "config", "quant", default={}) or {})
    # as the run_id sees it (harness.config.quant_identity_dict): a record written before per-method configs and one
    # written after, of the same config, are one run
    return {"method": "fp16"} if q.get("method", "fp16") == "fp16" else quant_identity_dict(q)
