"""Runners keyed by `backend.name`: what evaluates the quantized model once the pipeline has loaded and quantized it.

- `hf`: transformers in this process (CPU or GPU): every evaluator of eval/ on the (fake-)quantized model.
- `lmdeploy`: LMDeploy's engine on a GPU (backends/lmdeploy.py): the run's weights exported in the format the engine
  loads, scored with its real kernels.

A backend is `preflight(cfg)` (raises ConfigError naming the field, before any model loads) plus
`evaluate(ctx) -> metrics`. Adding one is a new module with `@BACKENDS.register(name)`.
"""
from __future__ import annotations

from typing import Callable, Protocol

from eval import EvalContext
from harness.registry import Registry


class Backend(Protocol):
    def preflight(self, cfg) -> None: ...

    def evaluate(self, ctx: EvalContext, log: Callable[[str], None]) -> dict: ...


BACKENDS: Registry[Backend] = Registry("backend (backend.name)")

from backends import hf as _hf  # noqa: E402,F401  (registers)
from backends import lmdeploy as _lmdeploy  # noqa: E402,F401  (registers)
