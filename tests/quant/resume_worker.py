"""A quantization for tests/quant/test_resume.py to kill and resume: AWQ on the first blocks of the embedded SmolLM2
through the quantized-weight cache under <out>/cache, every resulting tensor written to <out>/result.safetensors.

    python -m tests.quant.resume_worker <out> <propagate> [<hang at block>]

With a block index k, the worker prints `quantized block k` after AWQ has changed block k in place (blocks 0..k-1
checkpointed, block k not yet) and then hangs, for the test to SIGKILL it there."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

N_BLOCKS = 4


def main(out: Path, propagate: str, hang_at: int | None) -> None:
    from harness.config import CalibConfig, ModelConfig
    from quant.awq.config import AWQConfig
    from harness.data import calibration_samples, load_text, tokenize_cached
    from harness.models import load_model, load_tokenizer, resolve_model
    from quant import QuantContext, quantized_cache
    from quant.awq.method import AWQBlocks

    mc = ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct", dtype="bfloat16")
    resolved = resolve_model(mc)
    ids = tokenize_cached(load_tokenizer(resolved, mc), load_text("shakespeare_calib"))
    model = load_model(resolved, mc)
    model.model.layers = model.model.layers[:N_BLOCKS]
    model.config.num_hidden_layers = N_BLOCKS
    cfg = AWQConfig(w_bit=4, group_size=64, search_samples=2, n_grid=2, clip_n_grid=2, clip_tokens=0,
                      propagate=propagate, calib=CalibConfig(n_samples=4, seqlen=32))
    samples = calibration_samples(ids, 4, 32, seed=0)
    os.environ["QH_CACHE"] = str(out / "cache")  # the model and text are loaded: from here on, this run's own cache
    if hang_at is not None:
        real = AWQBlocks.quantize_block

        def quantize_block(self, block, index, *args):
            res = real(self, block, index, *args)
            if index == hang_at:
                print(f"quantized block {index}", flush=True)
                time.sleep(600)
            return res

        AWQBlocks.quantize_block = quantize_block
    outcome = quantized_cache.quantize_cached(model, cfg, "embedded-smollm2", "bfloat16",
                                              QuantContext(calibration=lambda: samples, progress=True), {})
    tensors = {f"params.{k}": v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    for n, q in outcome.qtensors.items():
        tensors[f"codes.{n}"], tensors[f"scales.{n}"], tensors[f"zeros.{n}"] = q.q, q.scales, q.zeros
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "result.safetensors"))
    print(f"resumed_from_block={outcome.summary['resumed_from_block']}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
