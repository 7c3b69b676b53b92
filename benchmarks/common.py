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


def add_quality_args(ap: argparse.ArgumentParser) -> None:
    """The quality setting's knobs: calibration sequences x tokens, the evaluation split and its windows."""
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-split", default="milton")
    ap.add_argument("--eval-windows", type=int, default=40)


def quality_setting(eval_split: str, n_windows: int, seqlen: int = 512, dtype: str = "bfloat16"):
    """The quality benchmarks' shared setting (../shared TARGETS.md: embedded SmolLM2, Milton 40 x 512): the FP16
    model, its tokenized calibration text, and `ppl(model) -> (token PPL, seconds)` on the evaluation windows."""
    from eval.perplexity import ppl_metrics, window_nll
    from harness.data import eval_windows, load_text, tokenize_cached

    base, tok = load_embedded(dtype)
    windows = eval_windows(tokenize_cached(tok, load_text(eval_split)), seqlen, n_windows)
    calib_ids = tokenize_cached(tok, load_text("shakespeare_calib"))

    def ppl(model) -> tuple[float, float]:
        nll, secs = window_nll(model, windows, 8, progress=False)
        return ppl_metrics(nll, secs, seqlen)["token_ppl"], secs

    ppl.windows = int(windows.shape[0])  # what the setting scores, for the result's description
    return base, calib_ids, ppl


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


def preset_fields(name: str, drop: tuple[str, ...] = ()) -> dict:
    """The fields a conf/quant/<name>.yaml preset sets, as a dict, minus Hydra's `defaults` list (which selects the
    schema and is not a field) and `drop`."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parent.parent / "conf" / "quant" / f"{name}.yaml"
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k not in ("defaults", *drop)}
