"""What the CPU benchmarks share: the embedded model, the machine state beside each result, the --threads option,
and writing the result JSON."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness.environment import environment  # noqa: F401  (the benchmarks' machine state)


def load_embedded(dtype: str = "bfloat16"):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct."""
    from harness.config import ModelConfig
    from harness.models import load_model, load_tokenizer, resolve_model

    mc = ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct", dtype=dtype)
    resolved = resolve_model(mc)
    return load_model(resolved, mc), load_tokenizer(resolved, mc)


def add_threads_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, one per core); on a shared, oversubscribed machine 2 threads "
                         "wait on each other at every op, so the record states the threads used and the load average")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def write_result(path: Path, obj: dict) -> Path:
    from harness.records import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, obj)
    return path
