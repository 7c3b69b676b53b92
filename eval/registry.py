"""The evaluator registry. An evaluator is `fn(EvalContext) -> dict | None` (None: disabled by its config); its
result lands in the run record under `metrics.<name>`. Adding one is a new file with `@evaluator(name)` plus its
config fields in harness/config.py (EvalConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from harness.config import RunConfig
from harness.registry import Registry


@dataclass
class EvalContext:
    cfg: RunConfig
    model: torch.nn.Module  # the (fake-)quantized model under test, in cfg.model.dtype
    tokenizer: object
    windows: dict  # split -> [n_windows, seqlen] token ids (paper-protocol windows)
    texts: dict  # split -> raw text
    split_sha: dict  # split -> sha256 prefix of its text
    model_sha: str
    qtensors: dict = field(default_factory=dict)  # qualified Linear name -> QTensor (empty for fp16)
    kv_cache_factory: Optional[Callable[[], object]] = None
    load_reference_model: Optional[Callable[[], torch.nn.Module]] = None  # the unquantized model, loaded on demand
    progress: bool = True
    results: dict = field(default_factory=dict)  # metrics of evaluators that already ran (e.g. perplexity)


EVALUATORS: Registry[Callable[[EvalContext], Optional[dict]]] = Registry("evaluator")

# the order evaluators run in (and appear in records); an evaluator missing here runs after these
ORDER = ["perplexity", "kernel_quality", "word_perplexity", "fidelity", "tasks", "memory", "throughput"]


# the sources that determine each evaluator's numbers (its code version: harness.environment.code_version); an
# evaluator registered without an entry fails tests/quant/test_code_version.py
EVALUATOR_SOURCES = {
    "perplexity": ["eval/perplexity.py"],
    "word_perplexity": ["eval/word_perplexity.py", "eval/lm_eval_adapter.py"],
    "fidelity": ["eval/fidelity.py", "eval/perplexity.py"],
    "tasks": ["eval/tasks_eval.py", "eval/lm_eval_adapter.py", "eval/tasks"],
    "memory": ["eval/memory.py", "harness/storage_bytes.py"],
    "throughput": ["eval/throughput.py", "eval/static_decode.py", "quant/kernels"],
    "kernel_quality": ["eval/kernel_quality.py", "eval/perplexity.py", "eval/throughput.py", "quant/kernels"],
}


def evaluator_sources(name: str) -> list[str]:
    if name not in EVALUATOR_SOURCES:
        raise KeyError(f"evaluator {name!r} has no entry in eval.registry.EVALUATOR_SOURCES")
    return EVALUATOR_SOURCES[name]


def evaluator(name: str):
    return EVALUATORS.register(name)


def ordered_names() -> list[str]:
    known = [n for n in ORDER if n in EVALUATORS]
    return known + [n for n in EVALUATORS.names() if n not in ORDER]
