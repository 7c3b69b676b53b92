"""Perplexity-evaluation throughput: the harness's paper-protocol token PPL (eval/perplexity.window_nll) against
lm-eval's `HFLM.loglikelihood_rolling` on the same model object, the same text and the same 512-token window, run
interleaved in one process (absolute times drift on this shared machine; the ratio of medians does not).

    python -m benchmarks.ppl_throughput                      # writes results/benchmarks/ppl_throughput.json
    python -m benchmarks.ppl_throughput --compiled --profile  # also the torch.compile variant and a time breakdown

- harness: `window_nll(model, windows[n, 512], batch_size=8)`, the code the `perplexity` evaluator runs;
- lm-eval: stock `HFLM(pretrained=<the same model>, batch_size=8, max_length=512)` (not the harness's adapter),
  `loglikelihood_rolling` on the decoded text of the same tokens (re-encoding may change the count by a few; the
  tokens lm-eval scored are recorded);
- `--compiled` (a proposal, not what the harness runs): the same `window_nll` with every decoder layer and the final
  norm `torch.compile`d (inductor fuses RMSNorm / rotary / SiLU); its compile time and its PPL are recorded, since
  fusion changes bf16 rounding;
- `--profile`: where the harness's time goes (torch.profiler self time, grouped: matmuls, attention, element-wise,
  lm_head log-softmax / cross-entropy), the measurement behind any proposed change to eval/perplexity.py.
Throughput unit for every variant: tokens forwarded per second (windows x 512).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import statistics
import time
from pathlib import Path


from benchmarks.common import add_threads_arg, apply_threads, environment, load_embedded, write_result

NAME = "ppl_throughput"
GROUPS = {  # profiler op name -> group
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_log_softmax": "log_softmax_cross_entropy", "aten::nll_loss_forward": "log_softmax_cross_entropy",
    "aten::cross_entropy_loss": "log_softmax_cross_entropy",
}


def harness_run(model, windows, batch_size):
    from eval.perplexity import window_nll

    nll, secs = window_nll(model, windows, batch_size, progress=False)
    return {"seconds": secs, "tokens": windows.numel(), "token_ppl": math.exp(nll.double().mean().item())}


def lm_eval_run(lm, doc: str):
    from lm_eval.api.instance import Instance

    n = len(lm.tok_encode(doc))
    t0 = time.perf_counter()
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)], disable_tqdm=True)
    secs = time.perf_counter() - t0
    windows = math.ceil(n / lm.max_length)
    return {"seconds": secs, "tokens": windows * lm.max_length, "tokens_scored": n, "rolling_token_ppl": math.exp(-ll / n)}


def profile_harness(model, windows, batch_size) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from eval.perplexity import window_nll

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        window_nll(model, windows, batch_size, progress=False)
    groups: dict[str, float] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total <= 0:
            continue
        g = GROUPS.get(e.key, "element-wise and other")
        groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / 1e6
    total = sum(groups.values())
    return {g: {"seconds": s, "share": s / total} for g, s in sorted(groups.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="milton")
    ap.add_argument("--windows", type=int, default=24)  # 24 x 512 = 12,288 tokens, as in /work/shared/CPU.md
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--profile", action="store_true")
    add_threads_arg(ap)
    ap.add_argument("--out", default="results/benchmarks")
    a = ap.parse_args(argv)
    apply_threads(a)

    from lm_eval.models.huggingface import HFLM

    from harness.data import load_text, tokenize_cached

    env0 = environment()
    model, tok = load_embedded("bfloat16")
    ids = tokenize_cached(tok, load_text(a.split))
    windows = ids[: a.windows * a.seqlen].view(a.windows, a.seqlen)
    doc = tok.decode(windows.flatten())
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tok), backend="causal", batch_size=a.batch_size,
              max_length=a.seqlen)
    variants = {"harness": lambda: harness_run(model, windows, a.batch_size), "lm_eval": lambda: lm_eval_run(lm, doc)}
    compiled_info = None
    if a.compiled:
        cmodel = copy.deepcopy(model)
        for layer in cmodel.get_decoder().layers:
            layer.compile()
        cmodel.get_decoder().norm.compile()
        t0 = time.perf_counter()
        harness_run(cmodel, windows, a.batch_size)  # compiles (and recompiles for a short last batch)
        compiled_info = {"compile_and_first_run_s": time.perf_counter() - t0}
        variants["harness_compiled"] = lambda: harness_run(cmodel, windows, a.batch_size)

    harness_run(model, windows[: a.batch_size], a.batch_size)  # warm-up: first-call allocations
    runs = {k: [] for k in variants}
    for _ in range(a.repeats):  # interleaved, so load changes hit every variant alike
        for k, fn in variants.items():
            runs[k].append(fn())
            print(f"[{NAME}] {k}: {runs[k][-1]['tokens'] / runs[k][-1]['seconds']:.0f} tok/s", flush=True)
    res = {}
    for k, rs in runs.items():
        med = statistics.median(r["seconds"] for r in rs)
        res[k] = {**{x: y for x, y in rs[0].items() if x != "seconds"}, "median_s": med,
                  "tokens_per_s": rs[0]["tokens"] / med, "runs_s": [r["seconds"] for r in rs]}
    out = {
        "what": "paper-protocol PPL throughput vs lm-eval HFLM.loglikelihood_rolling, same model, text, window",
        "split": a.split, "windows": a.windows, "seqlen": a.seqlen, "batch_size": a.batch_size,
        "repeats": a.repeats, "dtype": "bfloat16", "variants": res,
        "ratio_harness_vs_lm_eval": res["lm_eval"]["median_s"] / res["harness"]["median_s"]
        * res["harness"]["tokens"] / res["lm_eval"]["tokens"],
        "target_ratio": 1.4,
        "roofline_tok_s": 1500, "roofline_note": "405 GFLOP/s bf16 matmul / 270 MFLOP per token (/work/shared/CPU.md)",
    }
    if compiled_info:
        out["compiled"] = {**compiled_info, "ratio_vs_lm_eval": res["lm_eval"]["median_s"] / res["harness_compiled"]["median_s"],
                           "ratio_vs_harness": res["harness"]["median_s"] / res["harness_compiled"]["median_s"],
                           "token_ppl_eager": res["harness"]["token_ppl"],
                           "token_ppl_compiled": res["harness_compiled"]["token_ppl"]}
    if a.profile:
        out["harness_time_breakdown"] = profile_harness(model, windows[: a.batch_size], a.batch_size)
    out["environment"] = {"start": env0, "end": environment()}
    out["command"] = "python -m benchmarks.ppl_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result(Path(a.out) / (f"{NAME}_threads{a.threads}.json" if a.threads else f"{NAME}.json"), out)
    print(f"[{NAME}] harness / lm-eval = {out['ratio_harness_vs_lm_eval']:.2f}x (target >= 1.4x); wrote {path}")
    return out


if __name__ == "__main__":
    main()
