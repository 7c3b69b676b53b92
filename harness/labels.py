"""A quantization config in the field's words: "FP16", "RTN w4 g64", "AWQ w4 g64 (search+clip) + KV int8". A method's
name and rank in the report come from its registration (quant.registry.method fills ROWS), the detail after it from
its config class's `label_detail` (harness.config.QuantConfig); the report's rows, the web page's variants and the
benchmarks' rows all name a config through `config_label`. Works on plain dicts (a record's config), so readers of old
records and live configs share it."""
from __future__ import annotations

import dataclasses

from harness.config import QUANT_CONFIGS, MoEConfig, WeightQuantConfig
from harness.registry import Registry


@dataclasses.dataclass(frozen=True)
class MethodRow:
    name: str  # the method in the report's words ("AWQ+GPTQ")
    order: int  # rows: lower first (FP16 0, then baselines, then methods); equal orders by the method's name


ROWS: Registry[MethodRow] = Registry("report row (by quant.method)")  # filled by each method's registration
UNREGISTERED_ORDER = 100  # a method no registration describes: its name in capitals, among the later rows


def method_rank(method: str) -> tuple[int, str]:
    """A method's place among the report's rows."""
    return (ROWS.get(method).order if method in ROWS else UNREGISTERED_ORDER), method


def method_name(q: dict) -> str:
    m = q.get("method", "fp16")
    own = QUANT_CONFIGS.get(m).label_name(q) if m in QUANT_CONFIGS else None  # e.g. a recipe: its steps' names
    if own is not None:
        return own
    return ROWS.get(m).name if m in ROWS else m.upper()


def method_detail(q: dict) -> tuple[str, tuple]:
    m = q.get("method", "fp16")
    text, key = (QUANT_CONFIGS.get(m) if m in QUANT_CONFIGS else WeightQuantConfig).label_detail(q)
    moe = MoEConfig.label_text(q)  # routed-expert calibration off its defaults (quant.moe)
    return (f"{text} [{moe}]" if text else f"[{moe}]") if moe else text, key


def kv_text(kv_bits: int, kv_format: str = "int") -> str:
    if kv_bits == 16:
        return ""
    return f" + KV int{kv_bits}" if kv_format == "int" else f" + KV {kv_format.replace('_', ' ')}"


def backend_text(backend: str) -> str:
    return "" if backend in ("hf", None) else f" [{backend}]"


def config_label(quant, kv_bits: int = 16, backend: str = "hf", kv_format: str = "int") -> str:
    """`quant`: a QuantConfig or its dict. The text of a report row for that config (a KV cache of `kv_bits` in
    `kv_format`: int, fp8_e4m3, fp8_e5m2)."""
    q = dataclasses.asdict(quant) if dataclasses.is_dataclass(quant) else dict(quant)
    # a float format's name carries its bits ("RTN NVFP4"); an integer grid says them ("RTN w4 g64")
    fp_format = q.get("format", "int") not in (None, "int")
    bits = "" if q.get("method", "fp16") == "fp16" or q.get("w_bit") is None or fp_format else f" w{q.get('w_bit')}"
    detail = method_detail(q)[0]
    return f"{method_name(q)}{bits}{(' ' + detail) if detail else ''}{kv_text(kv_bits, kv_format)}{backend_text(backend)}"
