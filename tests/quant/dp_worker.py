"""AWQ and GPTQ on the first blocks of the embedded SmolLM2, on one process or data-parallel on several (#18), for
tests/quant/test_data_parallel.py; writes <out>/<case>.safetensors (every tensor), <out>/<case>.json (alphas) and
<out>/<case>.stats.safetensors: block 0's reduced statistics as AWQ applies them (mean |x| of each captured input,
every grid loss, the clip Gram matrices), before any rounding difference between the runs can compound:

    python -m tests.quant.dp_worker <out>
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.quant.dp_worker <out>
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

N_BLOCKS = 2
# every reduction AWQ makes: mean |x| (all cases), grid losses over the first search_samples sequences (3 of 4: both
# ranks hold some), over random tokens of all sequences (search_tokens), the clip Gram on a random token subset and
# on every token, max |x| (no search: LMDeploy's smoothing)
CASES = {
    "sequences": dict(search_samples=3, n_grid=4, clip_n_grid=4, clip_tokens=64),
    "tokens": dict(search_samples=1, search_tokens=64, scale_grid="coarse_fine", n_grid=8, clip_n_grid=4, clip_tokens=0),
    "smoothing": dict(search_scale=False, clip_n_grid=4, clip_tokens=0),
}


def _record_block_0(stats: dict):
    """Wrap AWQ's reductions' consumers to keep what block 0 gets (its first calls: 4 inputs, 4 groups, 5 clips);
    returns the function that unwraps them."""
    import quant.awq.method as m

    absmean, search_scale, search_clip = m._absmean, m.search_scale, m.search_clip
    count = {"x": 0, "s": 0, "c": 0}

    def keep(kind, limit, value):
        if count[kind] < limit:
            stats[f"{kind}{count[kind]}"] = value.detach().clone()
        count[kind] += 1

    def rec_absmean(x, reduce):
        r = absmean(x, reduce)
        keep("x", 4, r)
        return r

    def rec_search_scale(*a, **kw):
        r = search_scale(*a, **kw)
        keep("s", 4, torch.tensor(list(r[2].values()), dtype=torch.float64))
        return r

    def rec_search_clip(*a, **kw):
        keep("c", 5, kw["gram"])
        return search_clip(*a, **kw)

    m._absmean, m.search_scale, m.search_clip = rec_absmean, rec_search_scale, rec_search_clip

    def restore():
        m._absmean, m.search_scale, m.search_clip = absmean, search_scale, search_clip

    return restore


def main(out: Path) -> None:
    import torch.distributed as dist

    from harness.config import CalibConfig, ModelConfig
    from quant.awq.config import AWQConfig
    from harness.data import calibration_samples, load_text, tokenize_cached
    from harness.models import load_tokenizer, resolve_model
    from quant import METHODS, QuantContext

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    mc = ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct", dtype="float32")
    resolved = resolve_model(mc)
    ids = tokenize_cached(load_tokenizer(resolved, mc), load_text("shakespeare_calib"))
    samples = calibration_samples(ids, 4, 32, seed=0)
    for case, kw in CASES.items():
        stats: dict = {}
        restore = _record_block_0(stats)
        model = _first_blocks(resolved, mc)
        cfg = AWQConfig(w_bit=4, group_size=64, calib=CalibConfig(n_samples=4, seqlen=32), **kw)
        outcome = METHODS.get("awq")(model, cfg, QuantContext(calibration=lambda: samples, progress=False))
        if rank == 0:
            tensors = {f"params.{k}": v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
            _save_codes(outcome, tensors, out / f"{case}.safetensors")
            save_file(stats, str(out / f"{case}.stats.safetensors"))
            (out / f"{case}.json").write_text(json.dumps({"alpha_mean": outcome.summary["alpha_mean"]}))
        restore()
    _gptq(resolved, mc, samples, rank, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_blocks(resolved, mc):
    """The embedded model cut to its first N_BLOCKS decoder blocks."""
    from harness.models import load_model

    model = load_model(resolved, mc)
    model.model.layers = model.model.layers[:N_BLOCKS]
    model.config.num_hidden_layers = N_BLOCKS
    return model


def _save_codes(outcome, tensors: dict, path: Path) -> None:
    """`tensors` and every QTensor's codes, scales and zeros of `outcome`, in one safetensors file."""
    for n, q in outcome.qtensors.items():
        tensors[f"codes.{n}"], tensors[f"scales.{n}"], tensors[f"zeros.{n}"] = q.q, q.scales, q.zeros
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _gptq(resolved, mc, samples, rank: int, out: Path) -> None:
    """GPTQ on the same blocks: <out>/gptq.safetensors (codes, scales, zeros) and gptq.stats.safetensors (block 0's
    first two reduced Hessians: the q/k/v input's and o_proj's)."""
    import quant.gptq.method as gm
    from harness.config import CalibConfig
    from quant import METHODS, QuantContext
    from quant.gptq.config import GPTQConfig

    hs: dict = {}
    result = gm.HessianObserver.result

    def keep(self, reduce):
        h = result(self, reduce)
        if len(hs) < 2:
            hs[f"h{len(hs)}"] = h.detach().clone()
        return h

    gm.HessianObserver.result = keep
    try:
        model = _first_blocks(resolved, mc)
        cfg = GPTQConfig(w_bit=4, group_size=64, calib=CalibConfig(n_samples=4, seqlen=32))
        outcome = METHODS.get("gptq")(model, cfg, QuantContext(calibration=lambda: samples, progress=False))
    finally:
        gm.HessianObserver.result = result
    if rank == 0:
        _save_codes(outcome, {}, out / "gptq.safetensors")
        save_file(hs, str(out / "gptq.stats.safetensors"))
        (out / "gptq.json").write_text(json.dumps(outcome.summary["gptq_loss"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
