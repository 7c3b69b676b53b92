"""backend=hf: transformers in this process; the evaluators of eval/ run on the model as quantized."""
from __future__ import annotations

import time

from backends import BACKENDS
from eval import EVALUATORS, EvalContext, ordered_names


class HFBackend:
    def preflight(self, cfg) -> None:
        pass  # the device check lives with the model loader (harness.models)

    def evaluate(self, ctx: EvalContext, log) -> dict:
        timings = {}
        for name in ordered_names():
            t = time.perf_counter()
            result = EVALUATORS.get(name)(ctx)
            if result is not None:
                ctx.results[name] = result
                timings[f"eval.{name}"] = time.perf_counter() - t
                log(f"{name}: {brief(result)}")
        return timings


def brief(result: dict) -> str:
    """One line for the log: the first few numeric leaves of a result."""
    flat = []

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat.append(f"{prefix}={v:.4g}")

    walk("", result)
    return ", ".join(flat[:6]) + (" ..." if len(flat) > 6 else "")


BACKENDS.add("hf", HFBackend())
