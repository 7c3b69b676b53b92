"""load -> calibrate -> quantize -> evaluate (by backend.name: backends/) -> record, from one RunConfig: the stages of
experiments/stages.py, composed and timed.

`run(cfg)` is the Python API (the Hydra entry point `experiments.run` only builds the config and calls it; the
quality benchmarks call it for each of their rows):

    from harness.config import to_run_config
    from omegaconf import OmegaConf
    record = run(to_run_config(OmegaConf.create({...})))

Every check that can fail on bad input runs before the model is loaded or any long loop starts (stages.prepare).
With model.stream=true (and eval=none: streaming evaluates nothing) the blocks are streamed from the checkpoint
(stages.open_streamed) and the record holds the quantization's summary: placement, host memory, timings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness.config import RunConfig
from harness.records import run_id  # noqa: F401  (the run's identity, beside run())
from harness.synthetic import without_quality_metrics
from eval.code_version import code_version_of, stale_reason  # noqa: F401  (shared with the report)
# the stages run() composes, and (re-exported for the callers of this Python API) USER_ERRORS, record_exists,
# write_record
from experiments.stages import (USER_ERRORS, Evaluation, Prepared, calibrate, evaluate, load, log,  # noqa: F401
                                open_streamed, prepare, quantize, record, record_exists, reusable_record,
                                write_record)
from quant.onload import Placement, peak_memory


@dataclass
class Computed:
    """A run computed now: its record (written), and the quantized model and inputs it was evaluated with, for a
    caller that measures more on them (a benchmark's diagnostic)."""

    record: dict
    model: torch.nn.Module
    prep: Prepared


def run(cfg: RunConfig) -> dict:
    """The run's record: an existing one that still stands for `cfg` (stages.reusable_record), else computed stage by
    stage and written."""
    cfg, off = without_quality_metrics(cfg)
    if off:
        log(f"model.weights: random ({cfg.model.path}): quality has no meaning on random weights; switched off "
            f"{', '.join(off)} (quantization, timings and memory only)")
    rec = reusable_record(cfg)
    return rec if rec is not None else compute(cfg).record


def compute(cfg: RunConfig) -> Computed:
    """Every stage, timed, and the record written (never reused: run() decides that)."""
    t_start = time.perf_counter()
    timings = {}
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    prep = prepare(cfg)
    timings["prepare"] = time.perf_counter() - t
    version = code_version_of(cfg)  # the sources as the work starts (after prepare named any unknown method)

    place = Placement.of(cfg.model.device, cfg.offload)
    t = time.perf_counter()
    if cfg.model.stream:  # the parts outside the blocks only; each block is read for its turn
        model, place = open_streamed(cfg, prep)
    else:
        model = load(cfg, prep, place)
    timings["load_model"] = time.perf_counter() - t

    calibration = calibrate(cfg, prep)
    if place.compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(place.compute)
    t = time.perf_counter()
    outcome = quantize(cfg, model, prep, calibration, place)
    timings["quantize"] = time.perf_counter() - t
    timings.update({f"quantize.{k}": v for k, v in outcome.timings_s.items() if isinstance(v, (int, float))})
    outcome.summary["peak_memory_quantize"] = peak_memory(place.compute)

    if cfg.model.stream:  # no block weights are left to evaluate (prepare refused any evaluator)
        evaluation = Evaluation({"quant": outcome.summary}, {})
    else:
        evaluation = evaluate(cfg, model, prep, outcome, place)
    timings.update(evaluation.timings_s)
    timings["total"] = time.perf_counter() - t_start
    return Computed(record(cfg, prep, model, evaluation.metrics, timings, version), model, prep)
