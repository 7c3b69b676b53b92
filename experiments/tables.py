"""Run records -> paper-style tables (rows = method and config, columns = models x metrics), rendered as markdown,
CSV and LaTeX (booktabs). Reads records only; nothing here recomputes a metric.

Records whose evaluation settings differ (data, split hashes, seqlen, windows, ...) never share a column: they go to
separate tables, and `split_message` says which fields differ. What a column shows is data: `METRICS` maps a metric
family to how it is read from a record, which way is better, and how it compares to FP16.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from harness.registry import Registry

# --------------------------------------------------------------------------------------------------------------------
# reading records


def _get(d: Any, *path, default=None):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _num(x) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def is_synthetic(rec: dict) -> bool:
    return _get(rec, "config", "model", "weights") == "random"


def model_id(rec: dict) -> tuple[str, str]:
    return (_get(rec, "config", "model", "name", default="?"), _get(rec, "provenance", "model_sha", default="?"))


def kv_bits(rec: dict) -> int:
    return int(_get(rec, "config", "kv", "bits", default=16))


def weight_bits(rec: dict) -> int:
    """Nominal bits per quantized weight; 16 for the unquantized reference."""
    q = _get(rec, "config", "quant", default={})
    return 16 if q.get("method", "fp16") == "fp16" else int(q.get("w_bit", 16))


def hardware_name(rec: dict) -> str:
    hw = _get(rec, "provenance", "hardware", default={}) or {}
    if hw.get("gpu"):
        return hw["gpu"]
    return f"{hw.get('cpu_model') or hw.get('processor') or 'CPU'} ({hw.get('cpu_count', '?')} cores)"


def kv_shape(rec: dict) -> Optional[dict]:
    """Layers, KV heads and head_dim of the model, from the record (memory metrics or provenance.model)."""
    for src in (_get(rec, "metrics", "memory", default={}), _get(rec, "provenance", "model", default={})):
        src = src or {}
        layers = src.get("num_hidden_layers") or src.get("num_layers")
        heads = src.get("num_key_value_heads") or src.get("num_kv_heads")
        head_dim = src.get("head_dim")
        if head_dim is None and src.get("hidden_size") and src.get("num_attention_heads"):
            head_dim = src["hidden_size"] // src["num_attention_heads"]
        if layers and heads and head_dim:
            return {"num_hidden_layers": int(layers), "num_key_value_heads": int(heads), "head_dim": int(head_dim)}
    return None


def kv_bytes_per_token(shape: dict, bits: int) -> int:
    """KV-cache bytes per token (batch 1): K and V of every layer and KV head; quantized K/V also store an fp16 scale
    and zero per token per head (LMDeploy quant_policy 8/4, see quant/kv_cache.py)."""
    per_head = shape["head_dim"] * bits // 8 + (4 if bits < 16 else 0)
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * per_head


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
            if _num(v) is not None and b is not None:
                out[b] = float(v)
            elif isinstance(v, dict):
                for k, x in v.items():
                    if batch_of(k) is not None and _num(x) is not None:
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


METRICS: Registry[Metric] = Registry("report metric")


def _per_split(section: str, leaf: str) -> Callable[[dict], dict]:
    def f(rec):
        return {k: _num(v.get(leaf)) for k, v in (_get(rec, "metrics", section, default={}) or {}).items()
                if isinstance(v, dict) and _num(v.get(leaf)) is not None}

    return f


def _tasks(rec):
    out = {}
    for task, v in (_get(rec, "metrics", "tasks", default={}) or {}).items():
        if isinstance(v, dict):
            acc = _num(v.get("acc")) if _num(v.get("acc")) is not None else _num(v.get("acc_norm"))
            if acc is not None:
                out[task] = acc
    return out


def weight_bytes(rec: dict) -> Optional[float]:
    """Stored weight bytes: the memory evaluator's figure, else the quantizer's; an unquantized 16-bit model stores
    2 bytes per parameter."""
    for v in (_get(rec, "metrics", "memory", "weight_bytes"), _get(rec, "metrics", "quant", "weight_bytes")):
        if _num(v) is not None:
            return float(v)
    if weight_bits(rec) == 16 and _get(rec, "config", "model", "dtype") in ("bfloat16", "float16"):
        n = _num(_get(rec, "provenance", "model", "n_params"))
        return 2.0 * n if n else None
    return None


def _kv_bpt(rec):
    v = _num(_get(rec, "metrics", "memory", "kv_bytes_per_token"))
    if v is None and kv_shape(rec):
        v = float(kv_bytes_per_token(kv_shape(rec), kv_bits(rec)))
    return {"": v} if v is not None else {}


def _decode(rec):
    dev = hardware_name(rec)
    return {(b, dev): v for b, v in sorted(decode_by_batch(_get(rec, "metrics", "throughput", default={})).items())}


for _m in [
    Metric("token_ppl", "PPL {key}", _per_split("perplexity", "token_ppl"), "lower", "diff", 2),
    Metric("word_ppl", "word PPL {key}", _per_split("word_perplexity", "word_perplexity"), "lower", "diff", 2),
    Metric("bits_per_byte", "bits/byte {key}", _per_split("word_perplexity", "bits_per_byte"), "lower", "diff", 3),
    Metric("acc", "acc {key} (%)", _tasks, "higher", "diff", 1, scale=100.0),
    Metric("kl_mean", "KL {key}", _per_split("fidelity", "kl_mean"), "lower", None, 4),
    Metric("kl_p99", "KL p99 {key}", _per_split("fidelity", "kl_p99"), "lower", None, 4),
    Metric("top1_agreement", "top-1 agree {key}", _per_split("fidelity", "top1_agreement"), "higher", None, 4),
    Metric("ppl_ratio", "PPL ratio {key}", _per_split("fidelity", "ppl_ratio"), "lower", None, 4),
    Metric("weight_bytes", "weights ({unit})", lambda r: {"": weight_bytes(r)} if weight_bytes(r) else {}, "lower", "ratio",
           1, quality=False),
    Metric("kv_bytes_per_token", "KV B/token", _kv_bpt, "lower", "ratio", 0, quality=False),
    Metric("decode_tok_s", "decode tok/s b{key}", _decode, "higher", "ratio", 1, quality=False),
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
    kv: str  # "" or " + KV int8"
    backend: str  # "" or " [lmdeploy]"
    rank: tuple  # sort key within a method

    @property
    def text(self) -> str:
        bits = "" if self.w_bit == 16 else f" w{self.w_bit}"
        return f"{self.method}{bits}{(' ' + self.detail) if self.detail else ''}{self.kv}{self.backend}"

    @property
    def series(self) -> str:
        """The label without the bit width: one line across bit widths in plots."""
        return f"{self.method}{(' ' + self.detail) if self.detail else ''}{self.kv}{self.backend}"


LABELS: Registry[Callable[[dict], tuple[str, tuple]]] = Registry("report row label (by quant.method)")
METHOD_ORDER = ["fp16", "rtn", "awq"]  # rows: FP16 first, then baselines, then methods; others alphabetically after


def _group(q: dict) -> str:
    g = q.get("group_size", -1)
    s = "per-channel" if g in (-1, None) else f"g{g}"
    return s if q.get("zero_point", True) else f"{s} sym"


@LABELS.register("fp16")
def _label_fp16(q):
    return "", ()


@LABELS.register("rtn")
def _label_rtn(q):
    return _group(q), ()


@LABELS.register("awq")
def _label_awq(q):
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
    return f"{_group(q)} ({variant})", (rank,)


def row_label(rec: dict) -> RowLabel:
    q = _get(rec, "config", "quant", default={}) or {}
    m = q.get("method", "fp16")
    detail, rank = LABELS.get(m)(q) if m in LABELS else (_group(q), ())
    kb = kv_bits(rec)
    backend = _get(rec, "config", "backend", "name", default="hf")
    return RowLabel(
        method="FP16" if m == "fp16" else m.upper(),
        w_bit=weight_bits(rec),
        detail=detail,
        kv="" if kb == 16 else f" + KV int{kb}",
        backend="" if backend == "hf" else f" [{backend}]",
        rank=(METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m, -weight_bits(rec),
              q.get("group_size", 0) if m != "fp16" else 0, rank, backend != "hf", -kb),
    )


def is_reference(rec: dict) -> bool:
    """The FP16 row that deltas refer to: unquantized weights and KV, the default backend."""
    lab = row_label(rec)
    return lab.method == "FP16" and not lab.kv and not lab.backend


def relevant_quant(rec: dict) -> dict:
    """The quant fields that can change this record's result (the method's summary names them): two FP16 runs that
    differ only in an unused quant.w_bit are the same run."""
    q = dict(_get(rec, "config", "quant", default={}) or {})
    summary = _get(rec, "metrics", "quant", default={}) or {}
    if q.get("method", "fp16") == "fp16":
        return {"method": "fp16"}
    keep = {k: v for k, v in q.items() if k in summary or k == "method"}
    if "calibration" in summary and "calib" in q:
        keep["calib"] = q["calib"]
    return keep


# --------------------------------------------------------------------------------------------------------------------
# eval settings: what must match for two numbers to share a column


# settings of each metric section that change its numbers; they matter only for records that hold that section
SECTION_SETTINGS = {"perplexity": ("seqlen", "max_windows"), "word_perplexity": ("max_length", "max_chars"),
                    "fidelity": ("max_windows",), "tasks": ("limit", "num_fewshot"),
                    "memory": ("context_len", "batch_size"), "throughput": ("prompt_len", "gen_len")}


def eval_settings(rec: dict) -> dict:
    """Flat field -> value of everything that decides whether two records' numbers are comparable (the model is a
    column, not a setting). A metric section's settings appear only when the record holds that section: a record
    without word perplexity shows '–' there and fits beside records that have it. Switches like `enabled` and batch
    sizes of the evaluation loops are left out."""
    c, e = rec.get("config", {}), _get(rec, "config", "eval", default={}) or {}
    shas = _get(rec, "provenance", "data_sha256", default={}) or {}
    s = {"data.name": _get(c, "data", "name"), "data.splits": tuple(_get(c, "data", "splits", default=()) or ()),
         "model.dtype": _get(c, "model", "dtype")}  # the dtype the model ran in changes every number
    s.update({f"data_sha256.{k}": v for k, v in sorted(shas.items())})
    metrics = rec.get("metrics", {}) or {}
    for section, fields in SECTION_SETTINGS.items():
        if section in metrics or section == "perplexity":
            for f in fields:
                s[f"eval.{section}.{f}"] = _get(e, section, f)
    return s


def _compatible(a: dict, b: dict) -> bool:
    return all(repr(a[k]) == repr(b[k]) for k in a.keys() & b.keys())


def merged_settings(records: list[dict]) -> dict:
    out: dict = {}
    for rec in records:
        out.update(eval_settings(rec))
    return out


def split_message(groups: list[list[dict]]) -> str:
    """Which settings differ between groups of records, in words."""
    settings = [merged_settings(g) for g in groups]
    keys = sorted({k for s in settings for k in s})
    diff = [k for k in keys if len({repr(s[k]) for s in settings if k in s}) > 1]
    lines = [f"records use {len(groups)} different evaluation settings, so they are reported in {len(groups)} separate "
             f"tables (numbers from different settings never share a column). Differing fields:"]
    for k in diff:
        vals = ", ".join(f"table {i + 1}: {settings[i][k]!r}" if k in settings[i] else f"table {i + 1}: (not measured)"
                         for i in range(len(groups)))
        lines.append(f"  {k}: {vals}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Column:
    metric: str
    key: Any  # split / task / (batch, device) / ""

    def header(self, unit: str = "", show_device: bool = False) -> str:
        m = METRICS.get(self.metric)
        key = self.key
        if self.metric == "decode_tok_s":
            b, dev = key
            return m.header.format(key=b) + (f" ({dev})" if show_device else "")
        return m.header.format(key=key, unit=unit).replace("  ", " ").strip()


@dataclass
class Row:
    label: RowLabel
    text: str  # label text, disambiguated if two configs would share it
    key: str = ""  # what makes this config distinct (unique within a table)
    records: dict = field(default_factory=dict)  # model id -> record

    @property
    def reference(self) -> bool:
        return any(is_reference(rec) for rec in self.records.values())


@dataclass
class Table:
    index: int
    settings: dict
    models: list  # model ids (name, sha), in first-seen order
    rows: list  # Row, FP16 first
    columns: list  # (model id, Column)
    values: dict  # (row text, model id, Column) -> raw value
    dropped: list = field(default_factory=list)  # messages about records left out
    weight_unit: tuple = ("MB", 1e6)

    # ---- lookups ----
    def value(self, row: Row, mid, col: Column) -> Optional[float]:
        return self.values.get((row.key, mid, col))

    def reference_row(self, mid) -> Optional[Row]:
        return next((r for r in self.rows if mid in r.records and is_reference(r.records[mid])), None)

    def display(self, col: Column, v: Optional[float]) -> Optional[float]:
        if v is None:
            return None
        if col.metric == "weight_bytes":
            return v / self.weight_unit[1]
        return v * METRICS.get(col.metric).scale

    def delta(self, row: Row, mid, col: Column) -> Optional[float]:
        m = METRICS.get(col.metric)
        ref = self.reference_row(mid)
        v = self.value(row, mid, col)
        if m.delta is None or ref is None or ref is row or v is None:
            return None
        r = self.value(ref, mid, col)
        if r is None:
            return None
        if m.delta == "ratio":
            return v / r if r else None
        return self.display(col, v) - self.display(col, r)

    def best(self, mid, col: Column) -> set:
        """Row keys holding the best value of a column among the non-reference rows (ties all marked); empty when
        fewer than two rows compete."""
        m = METRICS.get(col.metric)
        cands = [(r.key, self.value(r, mid, col)) for r in self.rows if not r.reference]
        cands = [(t, v) for t, v in cands if v is not None]
        if m.better is None or len(cands) < 2:
            return set()
        target = (min if m.better == "lower" else max)(v for _, v in cands)
        return {t for t, v in cands if math.isclose(v, target, rel_tol=1e-9, abs_tol=1e-12)}

    def model_name(self, mid) -> str:
        names = [m[0] for m in self.models]
        return mid[0] if names.count(mid[0]) == 1 else f"{mid[0]} ({mid[1]})"

    def any_record(self, mid=None) -> dict:
        for r in self.rows:
            for m, rec in r.records.items():
                if mid is None or m == mid:
                    return rec
        return {}


def _disambiguate(rows: list[Row]) -> None:
    """Two configs that would share a label (e.g. a seed sweep) get the differing config fields appended."""
    by_text: dict[str, list[Row]] = {}
    for r in rows:
        by_text.setdefault(r.text, []).append(r)
    for text, same in by_text.items():
        if len(same) < 2:
            continue
        flats = [_flatten(_distinct_fields(next(iter(r.records.values())))) for r in same]
        diff = [k for k in sorted({k for f in flats for k in f}) if len({repr(f.get(k)) for f in flats}) > 1]
        for r, f in zip(same, flats):
            r.text = f"{text} [{', '.join(f'{k}={f.get(k)}' for k in diff)}]"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _distinct_fields(rec: dict) -> dict:
    """The config fields that make two rows of one table different runs (model and eval settings are columns and
    tables)."""
    return {"quant": relevant_quant(rec), "kv": _get(rec, "config", "kv"), "backend": _get(rec, "config", "backend"),
            "seed": _get(rec, "config", "seed")}


def _row_identity(rec: dict) -> str:
    return repr(sorted(_flatten(_distinct_fields(rec)).items()))


def build_table(records: list[dict], index: int = 1) -> Table:
    """One table from records that share eval settings."""
    dropped = []
    models: list = []
    rows_by_id: dict[str, Row] = {}
    for rec in sorted(records, key=lambda r: _get(r, "provenance", "created_unix", default=0) or 0):
        mid = model_id(rec)
        if mid not in models:
            models.append(mid)
        ident = _row_identity(rec)
        row = rows_by_id.setdefault(ident, Row(label=row_label(rec), text=row_label(rec).text, key=ident))
        if mid in row.records:  # same config rerun under another run_id (e.g. an unused quant field changed)
            dropped.append(f"{rec.get('run_id')} repeats {row.records[mid].get('run_id')} ({row.text}, {mid[0]}); "
                           f"the newer record is shown")
        row.records[mid] = rec
    rows = sorted(rows_by_id.values(), key=lambda r: r.label.rank)
    _disambiguate(rows)

    cols: dict = {}  # (mid, Column) -> None, an ordered set
    values = {}
    for name in TABLE_ORDER:
        m = METRICS.get(name)
        for mid in models:
            for row in rows:
                rec = row.records.get(mid)
                if rec is None or (m.quality and is_synthetic(rec)):
                    continue
                for key, v in m.extract(rec).items():
                    if v is None:
                        continue
                    col = Column(name, key)
                    cols[(mid, col)] = None
                    values[(row.key, mid, col)] = v
    # models are column groups: order columns model-major, keeping metric order inside a model
    columns = sorted(cols, key=lambda mc: (models.index(mc[0]), TABLE_ORDER.index(mc[1].metric), _key_sort(mc[1].key)))
    wmax = max((v for (t, mid, c), v in values.items() if c.metric == "weight_bytes"), default=0)
    unit = ("GB", 1e9) if wmax >= 1e9 else ("MB", 1e6)
    return Table(index=index, settings=merged_settings(records), models=models, rows=rows, columns=columns,
                 values=values, dropped=dropped, weight_unit=unit)


def _key_sort(key):
    if isinstance(key, tuple):
        return tuple(_key_sort(k) for k in key)
    return (0, key, "") if isinstance(key, (int, float)) else (1, 0, str(key))


def group_records(records: list[dict]) -> list[list[dict]]:
    """Records grouped so that, within a group, every setting two records both have is equal (first fit, oldest
    first). Each group becomes one table."""
    groups: list[tuple[dict, list[dict]]] = []
    for rec in sorted(records, key=lambda r: _get(r, "provenance", "created_unix", default=0) or 0):
        s = eval_settings(rec)
        for merged, members in groups:
            if all(_compatible(s, eval_settings(m)) for m in members):
                merged.update(s)
                members.append(rec)
                break
        else:
            groups.append((dict(s), [rec]))
    return [members for _, members in groups]


def build_tables(records: list[dict]) -> list[Table]:
    complete = [r for r in records if r.get("status", "complete") == "complete"]
    return [build_table(g, i + 1) for i, g in enumerate(group_records(complete))]


# --------------------------------------------------------------------------------------------------------------------
# words around a table


def title(t: Table) -> str:
    s = t.settings
    models = ", ".join(t.model_name(m) for m in t.models)
    splits = ", ".join(s.get("data.splits") or ())
    return f"Table {t.index}: {models} on {s.get('data.name')} ({splits})"


def notes(t: Table) -> list[str]:
    s = t.settings
    present = {c.metric for _, c in t.columns}
    out = []
    mw = s.get("eval.perplexity.max_windows")
    out.append(f"Token PPL: paper protocol (GPTQ/AWQ): non-overlapping windows of {s.get('eval.perplexity.seqlen')} tokens, "
               f"remainder dropped, {'every window' if mw is None else f'first {mw} windows'} of each split.")
    shas = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in s.items() if k.startswith("data_sha256.") and v)
    if shas:
        out.append(f"Data sha256 (prefix): {shas}.")
    if "word_ppl" in present:
        out.append(f"Word PPL: lm-eval rolling loglikelihood, max_length {s.get('eval.word_perplexity.max_length')}, "
                   f"first {s.get('eval.word_perplexity.max_chars')} characters of each split.")
    if "kl_mean" in present:
        out.append(f"KL: mean per-token KL(FP16 ‖ quantized) over {s.get('eval.fidelity.max_windows')} windows per split.")
    if "acc" in present:
        limit = s.get("eval.tasks.limit")
        out.append(f"Accuracy: lm-eval, {s.get('eval.tasks.num_fewshot')}-shot, "
                   f"{'all examples' if limit is None else f'first {limit} examples'} of each task, in %.")
    if "weight_bytes" in present:
        out.append(f"Weights: stored bytes of all weights incl. group scales/zeros, in {t.weight_unit[0]} "
                   f"(10^{int(math.log10(t.weight_unit[1]))} bytes).")
    if "kv_bytes_per_token" in present:
        out.append("KV B/token: K+V cache bytes per token of context (all layers), incl. fp16 scale+zero of quantized KV.")
    if "decode_tok_s" in present:
        devs = sorted({c.key[1] for _, c in t.columns if c.metric == "decode_tok_s"})
        out.append(f"Decode tok/s at batch b (prompt {s.get('eval.throughput.prompt_len')}, "
                   f"{s.get('eval.throughput.gen_len')} new tokens) on {'; '.join(devs)}.")
    out.append("↓ lower is better, ↑ higher is better; bold = best among the quantized configs; (+x) = difference to "
               "FP16 of the same model, (0.42×) = ratio to FP16; – = not measured.")
    for mid in t.models:
        rec = t.any_record(mid)
        note = _get(rec, "provenance", "reference_note") or _get(rec, "config", "model", "reference_note")
        origin = _get(rec, "provenance", "model_origin")
        line = f"{t.model_name(mid)}: {origin or _get(rec, 'config', 'model', 'path')} (model sha {mid[1]})."
        if note:
            line += f" FP16 here means: {note}."
        if is_synthetic(rec):
            line += " SYNTHETIC random weights: quality columns are left out for this model."
        out.append(line)
    out.extend(t.dropped)
    return out


def _arrow(m: Metric) -> str:
    return {"lower": " ↓", "higher": " ↑"}.get(m.better or "", "")


def headers(t: Table) -> list[str]:
    devs = {c.key[1] for _, c in t.columns if c.metric == "decode_tok_s"}
    multi = len(t.models) > 1
    out = []
    for mid, c in t.columns:
        h = c.header(t.weight_unit[0], show_device=len(devs) > 1) + _arrow(METRICS.get(c.metric))
        out.append(f"{t.model_name(mid)}: {h}" if multi else h)
    return out


def cell(t: Table, row: Row, mid, col: Column, bold: Callable[[str], str]) -> str:
    m = METRICS.get(col.metric)
    v = t.value(row, mid, col)
    if v is None:
        return "–"
    s = f"{t.display(col, v):,.{m.digits}f}"
    if row.key in t.best(mid, col):
        s = bold(s)
    d = t.delta(row, mid, col)
    if d is not None and m.delta == "ratio" and abs(d - 1) >= 0.005:  # an unchanged quantity needs no "1.00×"
        s += f" ({d:.2f}×)"
    elif d is not None and m.delta == "diff":
        s += f" ({d:+.{m.digits}f})"
    return s


# --------------------------------------------------------------------------------------------------------------------
# renderers


def to_markdown(t: Table) -> str:
    hs = ["config"] + headers(t)
    lines = [f"### {title(t)}", "", "| " + " | ".join(hs) + " |", "|" + "|".join([":---"] + ["---:"] * (len(hs) - 1)) + "|"]
    for r in t.rows:
        cells = [cell(t, r, mid, c, lambda s: f"**{s}**") for mid, c in t.columns]
        lines.append("| " + " | ".join([r.text] + cells) + " |")
    lines.append("")
    lines.extend(f"- {n}" for n in notes(t))
    return "\n".join(lines) + "\n"


def to_csv_frame(t: Table):
    """Raw numbers (not rounded): one row per config, a value and a vs-FP16 column per (model, metric)."""
    import pandas as pd

    data = []
    for r in t.rows:
        d = {"config": r.text}
        for (mid, c), h in zip(t.columns, headers(t)):
            h = h.replace(" ↓", "").replace(" ↑", "")
            if len(t.models) == 1:
                h = f"{t.model_name(mid)}: {h}"
            d[h] = t.display(c, t.value(r, mid, c))
            if METRICS.get(c.metric).delta:
                d[f"{h} vs FP16 ({METRICS.get(c.metric).delta})"] = t.delta(r, mid, c)
        d["run_ids"] = " ".join(rec.get("run_id", "") for rec in r.records.values())
        data.append(d)
    return pd.DataFrame(data)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "↓": r"$\downarrow$", "↑": r"$\uparrow$",
        "×": r"$\times$", "‖": r"$\|$", "α": r"$\alpha$", "–": "--"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(t: Table) -> str:
    """booktabs table: a header row of models (one multicolumn each) over a row of metrics."""
    hs = [tex_escape(h.split(": ", 1)[1] if len(t.models) > 1 else h) for h in headers(t)]
    spans = []
    for mid in t.models:
        n = sum(1 for m, _ in t.columns if m == mid)
        if n:
            spans.append((t.model_name(mid), n))
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * len(t.columns) + "}", r"\toprule"]
    lines.append(" & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{tex_escape(name)}}}" for name, n in spans) + r" \\")
    start, rules = 2, []
    for _, n in spans:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    lines.append("config & " + " & ".join(hs) + r" \\")
    lines.append(r"\midrule")
    for r in t.rows:
        cells = []
        for mid, c in t.columns:
            s = cell(t, r, mid, c, lambda x: "\0B" + x + "\0E")
            s = tex_escape(s).replace("\0B", r"\textbf{").replace("\0E", "}")
            s = re.sub(r" \((.*)\)$", r" {\\scriptsize(\1)}", s)
            cells.append(s)
        lines.append(tex_escape(r.text) + " & " + " & ".join(cells) + r" \\")
        if r.reference:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{" + tex_escape(title(t).split(": ", 1)[1]) + ". " + " ".join(tex_escape(n) for n in notes(t)) + "}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# the flat frame (one row per record, every metric), for records.csv and the notebook


def records_frame(records: list[dict]):
    import pandas as pd

    rows = []
    for rec in records:
        lab = row_label(rec)
        d = {"run_id": rec.get("run_id"), "status": rec.get("status"), "model": model_id(rec)[0],
             "model_sha": model_id(rec)[1], "config": lab.text, "series": lab.series,
             "method": _get(rec, "config", "quant", "method"), "w_bit": weight_bits(rec),
             "group_size": _get(rec, "config", "quant", "group_size") if weight_bits(rec) != 16 else None,
             "kv_bits": kv_bits(rec), "backend": _get(rec, "config", "backend", "name"),
             "synthetic": is_synthetic(rec), "reference": is_reference(rec), "data": _get(rec, "config", "data", "name"),
             "seqlen": _get(rec, "config", "eval", "perplexity", "seqlen"),
             "max_windows": _get(rec, "config", "eval", "perplexity", "max_windows"),
             "hardware": hardware_name(rec), "created": _get(rec, "provenance", "created"),
             "quantize_s": _get(rec, "timings_s", "quantize"), "total_s": _get(rec, "timings_s", "total")}
        for name in METRICS.names():
            for key, v in METRICS.get(name).extract(rec).items():
                k = f"b{key[0]}" if isinstance(key, tuple) else key
                d[f"{name}.{k}" if k != "" else name] = v
        rows.append(d)
    df = pd.DataFrame(rows)
    if len(df):
        df["table"] = 0
        groups = group_records([r for r in records if r.get("status", "complete") == "complete"])
        where = {id(r): i + 1 for i, g in enumerate(groups) for r in g}
        df["table"] = [where.get(id(r)) for r in records]
        order = sorted(range(len(records)), key=lambda i: (df["table"][i] or 0, row_label(records[i]).rank))
        df = df.iloc[order].reset_index(drop=True)
    return df
