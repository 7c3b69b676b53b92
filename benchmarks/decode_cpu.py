"""W4A16 decode on this CPU with real int4 kernels against bf16, and the weight bytes each holds, side by side in one
process (variants interleaved within every repeat; medians).

    python -m benchmarks.decode_cpu                          # writes results/benchmarks/decode_cpu.json
    python -m benchmarks.decode_cpu --batch-sizes 1 --repeats 5

Variants (weights: RTN w4 g64 asymmetric; the method does not change the speed, only the codes):
- `bf16`: the embedded SmolLM2-135M as loaded;
- `int4`: every decoder Linear through the int4 CPU kernel (quant/int4_linear.swap_int4_linears), the tied
  embedding / lm_head in bf16: what the harness's `throughput` evaluator runs for a W4A16 config;
- `int4_lm_head` (what reaching the targets would take; not what the harness runs): `int4` plus the output
  projection through the same kernel (RTN w4 g64 of the tied weight, so lm_head gets its own int4 copy while the
  input embedding stays bf16 for the lookup). Its token PPL is measured beside it, since lm_head is then quantized;
- `int4_lm_head_int8`: `int4` plus lm_head as int8 weight-only, per output channel, symmetric, through
  aten._weight_int8pack_mm (the smaller-loss option for the output projection).
Timing is eval/throughput.greedy_run (the evaluator's code): a prefill over [batch, prompt_len] real tokens, then
gen_len - 1 single-token greedy steps; decode tok/s = batch * (gen_len - 1) / decode time.
Weight bytes are measured from the modules (quant.kernels.int4_linear.weight_bytes); `single_int4_table` is arithmetic: the
bytes if one int4 table served both the embedding lookup and lm_head (needs an int4 embedding gather, not built).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import add_threads_arg, apply_threads, environment, load_embedded, write_result

NAME = "decode_cpu"


class Int8WeightOnlyHead(torch.nn.Module):
    """y = x @ (q * s)^T with int8 codes per output channel (symmetric) through aten._weight_int8pack_mm (CPU)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("q", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                                               self.q, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def variant_bytes(model) -> dict:
    """quant.kernels.int4_linear.weight_bytes plus the int8 head's buffers (which it does not know)."""
    from quant.kernels.int4_linear import weight_bytes

    wb = weight_bytes(model)
    int8 = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, Int8WeightOnlyHead)
               for b in m.buffers())
    return {**wb, "int8_head_bytes": int8, "total_bytes": wb["total_bytes"] + int8}


def build_variants(base, w_bit: int = 4, group_size: int = 64) -> dict:
    from quant.rtn import RTNConfig
    from quant import METHODS, QuantContext
    from quant.kernels.int4_linear import Int4WeightOnlyLinear, swap_int4_linears
    from quant.primitives import quantize_tensor

    fq = copy.deepcopy(base)
    qtensors = METHODS.get("rtn")(fq, RTNConfig(w_bit=w_bit, group_size=group_size),
                                  QuantContext(None, False)).qtensors
    int4 = swap_int4_linears(fq, qtensors)  # in place: the fake-quantized copy becomes the kernel model
    int4_lm = copy.deepcopy(int4)
    head_w = base.get_output_embeddings().weight.detach().float()
    int4_lm.lm_head = Int4WeightOnlyLinear(quantize_tensor(head_w, w_bit, group_size, True), where="lm_head")
    int4_lm8 = copy.deepcopy(int4)
    int4_lm8.lm_head = Int8WeightOnlyHead(head_w)
    return {"bf16": base, "int4": int4, "int4_lm_head": int4_lm, "int4_lm_head_int8": int4_lm8}


def single_table_bytes(model_int4, base, group_size: int = 64) -> int:
    """int4 model's bytes with the bf16 tied embedding replaced by one int4 g64 table (codes + bf16 scale/zero)."""
    from quant.kernels.int4_linear import weight_bytes
    from harness.storage_bytes import quantized_weight_bytes

    emb = base.get_input_embeddings().weight
    v, h = emb.shape
    table = quantized_weight_bytes(v * h, v * (h // group_size), 4, layout="int4_kernel")
    return weight_bytes(model_int4)["total_bytes"] - emb.numel() * emb.element_size() + table


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading generated tokens equal in every row (greedy sequences part for good at the first difference)."""
    same = (a == b).all(0).long()
    return int(same.cumprod(0).sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-windows", type=int, default=8, help="512-token Milton windows for each variant's PPL (0: skip)")
    add_threads_arg(ap)
    ap.add_argument("--out", default="results/benchmarks")
    a = ap.parse_args(argv)
    apply_threads(a)

    from eval.perplexity import window_nll
    from eval.throughput import greedy_run, prompt_batch
    from harness.data import load_text, tokenize_cached

    env0 = environment()
    base, tok = load_embedded("bfloat16")
    t0 = time.perf_counter()
    variants = build_variants(base)
    build_s = time.perf_counter() - t0
    ids = tokenize_cached(tok, load_text("milton"))
    fp16_bytes = variant_bytes(base)["total_bytes"]
    out = {"what": "W4A16 decode tok/s with the int4 CPU kernel vs bf16; weight bytes vs FP16",
           "model": "SmolLM2-135M-Instruct (embedded), RTN w4 g64 asymmetric", "prompt_len": a.prompt_len,
           "gen_len": a.gen_len, "warmup": a.warmup, "repeats": a.repeats, "build_variants_s": build_s,
           "fp16_weight_bytes": fp16_bytes, "variants": {}, "batch": {}}
    for name, m in variants.items():
        wb = variant_bytes(m)
        out["variants"][name] = {"weight_bytes": wb, "weight_bytes_ratio_to_fp16": wb["total_bytes"] / fp16_bytes}
        if a.ppl_windows:
            nll, _ = window_nll(m, ids[: a.ppl_windows * 512].view(a.ppl_windows, 512), 8, progress=False)
            out["variants"][name]["token_ppl_milton"] = math.exp(nll.double().mean().item())
    single = single_table_bytes(variants["int4"], base)
    out["single_int4_table"] = {"total_bytes": single, "ratio_to_fp16": single / fp16_bytes,
                                "note": "arithmetic: int4 decoder + one int4 g64 table for embedding and lm_head"}
    emb = base.get_input_embeddings().weight
    single8 = variant_bytes(variants["int4"])["total_bytes"] - emb.numel() * emb.element_size() + emb.numel() + emb.shape[0] * 2
    out["single_int8_table"] = {"total_bytes": single8, "ratio_to_fp16": single8 / fp16_bytes,
                                "note": "arithmetic: int4 decoder + one int8 per-row table for embedding and lm_head"}

    for b in a.batch_sizes:
        prompt = prompt_batch(ids, b, a.prompt_len)
        for name, m in variants.items():
            for _ in range(a.warmup):
                greedy_run(m, prompt, a.gen_len)
        runs = {k: [] for k in variants}
        for _ in range(a.repeats):
            for name, m in variants.items():
                runs[name].append(greedy_run(m, prompt, a.gen_len))
        row = {}
        for name, rs in runs.items():
            pre = statistics.median(r["prefill_s"] for r in rs)
            dec = statistics.median(r["decode_s"] for r in rs)
            row[name] = {"prefill_tok_s": b * a.prompt_len / pre, "decode_tok_s": b * (a.gen_len - 1) / dec,
                         "decode_ms_per_step": 1000 * dec / (a.gen_len - 1), "runs_s": [[r["prefill_s"], r["decode_s"]] for r in rs],
                         "greedy_prefix_equal_to_bf16": _common_prefix(rs[0]["ids"], runs["bf16"][0]["ids"])}
        for name in variants:
            row[name]["decode_ratio_vs_bf16"] = row[name]["decode_tok_s"] / row["bf16"]["decode_tok_s"]
            row[name]["prefill_ratio_vs_bf16"] = row[name]["prefill_tok_s"] / row["bf16"]["prefill_tok_s"]
        out["batch"][str(b)] = row
        print(f"[{NAME}] batch {b}: " + ", ".join(f"{k} {v['decode_tok_s']:.1f} tok/s ({v['decode_ratio_vs_bf16']:.2f}x)"
                                                for k, v in row.items()), flush=True)
    b1 = out["batch"].get("1")
    out["targets"] = {
        "decode_ratio_batch1_target": 2.0, "weight_bytes_ratio_target": 0.30,
        "decode_ratio_batch1_int4": b1["int4"]["decode_ratio_vs_bf16"] if b1 else None,
        "decode_ratio_batch1_int4_lm_head": b1["int4_lm_head"]["decode_ratio_vs_bf16"] if b1 else None,
        "decode_ratio_batch1_int4_lm_head_int8": b1["int4_lm_head_int8"]["decode_ratio_vs_bf16"] if b1 else None,
        "weight_bytes_ratio_int4": out["variants"]["int4"]["weight_bytes_ratio_to_fp16"],
        "weight_bytes_ratio_single_int4_table": out["single_int4_table"]["ratio_to_fp16"],
        "weight_bytes_ratio_single_int8_table": out["single_int8_table"]["ratio_to_fp16"],
    }
    out["environment"] = {"start": env0, "end": environment()}
    out["command"] = "python -m benchmarks.decode_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result(Path(a.out) / (f"{NAME}_threads{a.threads}.json" if a.threads else f"{NAME}.json"), out)
    print(f"[{NAME}] {out['targets']}; wrote {path}")
    return out


if __name__ == "__main__":
    main()
