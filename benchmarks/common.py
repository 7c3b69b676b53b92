"""What the CPU benchmarks share: the embedded model, the machine state beside each result, the --threads option,
writing the result JSON, and the quality setting as a pipeline config (quality_config), whose rows are pipeline
records (quality_row: experiments.pipeline, the stages every front door calls)."""
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


def add_record_args(ap: argparse.ArgumentParser) -> None:
    """Where the rows' pipeline records go, and whether a matching one is reused."""
    ap.add_argument("--results-dir", default="results", help="the rows' pipeline records go to <dir>/runs/")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a row's record (and its cached quantized weights) when the same code made it; its "
                         "quantize_s is then the record's own, not measured in this run (default: recompute every row)")


def quality_config(eval_split: str, n_windows: int, quant=None, seqlen: int = 512, dtype: str = "bfloat16",
                   results_dir: str = "results", reuse: bool = False):
    """The quality benchmarks' shared setting (../shared TARGETS.md: embedded SmolLM2, Milton 40 x 512, bf16) as a
    pipeline config, validated as every run is (RunConfig.validate): `quant` (a method's config; None: FP16) scored on
    `n_windows` windows of `seqlen` tokens of `eval_split`. reuse=False: force=true, so every row is measured now."""
    import dataclasses

    import quant as _methods  # noqa: F401  (registers every method's config, which conf/quant/ selects)
    from harness.compose import compose
    from harness.config import to_run_config

    cfg = compose(["model=smollm2_135m", f"model.dtype={dtype}", f"data.splits=[{eval_split}]",
                   f"eval.perplexity.seqlen={seqlen}", f"eval.perplexity.max_windows={n_windows}",
                   f"results_dir={results_dir}", f"force={not reuse}"])
    return to_run_config(cfg if quant is None else dataclasses.replace(cfg, quant=quant))


def quality_row(cfg, computed=None) -> dict:
    """`cfg` run by the pipeline (experiments.pipeline.run: its record under results_dir/runs/, which the report and
    the paper table read) and the benchmark's row read from that record: token PPL on the first split, the
    evaluation's and (quantized rows) the quantization's seconds end to end, calibration included, and each stage's.
    `computed`: a pipeline.Computed the caller already made (it needed the model afterwards)."""
    import time

    from experiments import pipeline

    started = time.time()
    rec = computed.record if computed is not None else pipeline.run(cfg)
    t, q = rec["timings_s"], rec["metrics"]["quant"]
    row = {"run_id": rec["run_id"], "token_ppl": rec["metrics"]["perplexity"][cfg.data.splits[0]]["token_ppl"],
           "eval_s": t["eval.perplexity"]}
    if cfg.quant.method != "fp16":
        row.update(quantize_s=t["quantize"], stages_s={k[len("quantize."):]: v for k, v in t.items()
                                                       if k.startswith("quantize.")}, config=rec["config"]["quant"])
    if q.get("from_cache") or (computed is None and rec["provenance"]["created_unix"] < started):
        row["reused"] = True  # its times were measured when its record (or cached weights) were made, not now
    return row


def quality_setting(eval_split: str, n_windows: int, seqlen: int = 512, dtype: str = "bfloat16"):
    """The quality setting (quality_config) for a benchmark that quantizes by hand: the FP16 model, its tokenized
    calibration text, and `ppl(model) -> (token PPL, seconds)` on the evaluation windows, as the pipeline makes
    them (experiments.stages.prepare)."""
    from eval.perplexity import ppl_metrics, window_nll
    from experiments import stages
    from harness.data import load_text, tokenize_cached

    cfg = quality_config(eval_split, n_windows, seqlen=seqlen, dtype=dtype)
    prep = stages.prepare(cfg)
    base, windows = stages.load(cfg, prep), prep.windows[eval_split]
    calib_ids = tokenize_cached(prep.tokenizer, load_text("shakespeare_calib"))

    def ppl(model) -> tuple[float, float]:
        nll, secs = window_nll(model, windows, cfg.eval.perplexity.batch_size, progress=False)
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
