"""What W4A16 gains in a whole decode step on a GPU: the Llama-2-7B shape (random fp16 weights, generated on the GPU
from a seed) decoded greedily through the harness's static-KV-cache loop with one CUDA graph per step
(eval/static_decode.py), for FP16 (cuBLAS), W4A16 through each real kernel (quant/kernels/w4a16.py) at g128 and g64,
and SmoothQuant-style W8A8 (fp8 e4m3, torch._scaled_mm), at several batch sizes, each beside its roofline.

Per variant and batch: decode tok/s and ms per step (median of `--repeats` timed runs after a warm-up), the bandwidth
roofline (HBM bandwidth / bytes a step reads: every decoder weight as stored + the fp16 LM head + batch x mean context
x KV bytes per token; backends/roofline.py) and the fraction reached, prefill tok/s over `--prefill-len` tokens (at
batch 1 and at `--prefill-batch`), and peak GPU memory. W4A16 codes are RTN's of the random weights: a kernel's speed
does not depend on which method chose the codes (the quality through the same kernels: benchmarks/w4a16_quality.py).

    python -m benchmarks.decode_gpu --out results/gpu/decode_gpu
    python -m benchmarks.decode_gpu --variants fp16 w4a16_g128_gemlite --batches 1 32
    python -m benchmarks.decode_gpu --variants fp16 fp16:compiled w4a16_g128_gemlite:compiled --batches 1 8

A variant named with the suffix `:compiled` decodes through torch.compile (Inductor fuses the norms, RoPE and residual
adds between the projections) before the CUDA graph records the step: eager and compiled rows in one run, one machine.
`--compile` compiles every variant.
    python -m benchmarks.decode_gpu --report results/gpu/decode_gpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

NAME = "decode_gpu"
# variant -> (weights, group size, kernel)
VARIANTS = {
    "fp16": ("fp16", None, None),
    "w4a16_g128_gemlite": ("w4a16", 128, "gemlite"),
    "w4a16_g128_tinygemm": ("w4a16", 128, "tinygemm"),
    "w4a16_g64_gemlite": ("w4a16", 64, "gemlite"),
    "w4a16_g128_dequant": ("w4a16", 128, "dequant"),
    "w8a8_fp8": ("w8a8", None, "fp8_e4m3"),
}
DEFAULT_VARIANTS = ["fp16", "w4a16_g128_gemlite", "w4a16_g128_tinygemm", "w4a16_g64_gemlite", "w8a8_fp8"]
BATCHES = (1, 4, 8, 32)
COMPILED = ":compiled"  # variant suffix: the step through torch.compile


def parse_variant(name: str) -> tuple[str, bool]:
    """(variant, compiled) of a `--variants` entry: `fp16` or `fp16:compiled`; an unknown name is an error."""
    base, sep, mode = name.partition(":")
    if base not in VARIANTS or (sep and sep + mode != COMPILED):
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, each optionally "
                                         f"with {COMPILED}")
    return base, bool(sep)


def build_model(arch_name: str, seed: int, device, layers: int | None = None):
    """The architecture's fp16 model with random weights N(0, 0.02) (norms 1), generated on `device` from `seed`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.synthetic import load_arch

    arch = load_arch(arch_name)
    hf = dict(arch.hf_config)
    if layers:
        hf["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**hf)
    torch.manual_seed(seed)  # transformers' own initialisation (N(0, initializer_range), norms 1), on the device
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    return model.eval()


def decoder_linears(model) -> dict:
    from torch import nn

    out_emb = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not out_emb}


def convert(model, weights: str, group_size, kernel) -> dict:
    """Swap every decoder Linear for the variant's module, layer by layer (the fp16 weight is freed as it goes)."""
    import torch

    from quant.kernels.w8a8_linear import W8A8Linear
    from quant.kernels.w4a16 import KERNELS, resolve
    from quant.primitives import quantize_tensor

    if weights == "fp16":
        return {"kernel": "cuBLAS fp16 (F.linear)"}
    modules = dict(model.named_modules())
    info = None
    for name, lin in decoder_linears(model).items():
        parent, _, child = name.rpartition(".")
        if weights == "w8a8":
            new = W8A8Linear(lin.weight, lin.bias, kernel)
            info = {"kernel": f"W8A8 {kernel} (torch._scaled_mm / _int_mm, per-channel weights, per-token activations)"}
        else:
            qt = quantize_tensor(lin.weight.float(), 4, group_size)
            if info is None:
                k, _ = resolve(kernel, lin.weight.device.type, torch.float16, {name: qt})
                info = {"kernel": k.description, "exact": k.exact}
            new = KERNELS.get(kernel).build(qt, lin.bias, torch.float16, lin.weight.device, name)
            del qt
        setattr(modules[parent], child, new)
        del lin
    torch.cuda.empty_cache()
    return info


def time_prefill(model, batch: int, length: int, vocab: int, repeats: int = 3) -> dict:
    """Prefill of `batch` prompts of `length` tokens through the static decoder (eager; the first token emitted)."""
    import torch

    from eval.static_decode import time_decode

    ids = torch.randint(0, vocab, (batch, length), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    m = time_decode(model, ids, 2, warmup=1, repeats=repeats)
    return {"batch": batch, "tokens": length, "prefill_s": m["prefill_s"], "prefill_tok_s": m["prefill_tok_s"]}


def run_variant(variant: str, args, env: dict) -> dict:
    import torch

    from backends import roofline as rl
    from backends.roofline import decode_model_bytes
    from eval.static_decode import fuse_projections, time_decode

    name = variant
    variant, compiled = parse_variant(variant)
    compiled = compiled or args.compile
    weights, group_size, kernel = VARIANTS[variant]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = build_model(args.arch, args.seed, torch.device("cuda"), args.layers)
    fused = fuse_projections(model) if args.fuse else 0  # q/k/v and gate/up as one product each
    info = convert(model, weights, group_size, kernel)
    build_s = time.perf_counter() - t
    cfg = model.config
    mb = decode_model_bytes(model)  # the projections and LM head as stored, fp16 KV per token
    bw = env["roofline_bw_bytes_s"]
    context = rl.mean_decode_context(args.prompt_len, args.gen_len)
    rows = []
    for b in args.batches:
        prompt = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(b))
        torch.cuda.reset_peak_memory_stats()
        m = time_decode(model, prompt, args.gen_len, warmup=1, repeats=args.repeats, compile_step=compiled,
                        profile=args.profile_steps if b == args.batches[0] else 0)
        roof = rl.decode_roofline_tok_s(mb, b, context, bw)
        rows.append({"batch": b, "decode_tok_s": m["decode_tok_s"], "decode_ms_per_step": m["decode_ms_per_step"],
                     "roofline_tok_s": roof, "roofline_fraction": m["decode_tok_s"] / roof,
                     "step_floor_ms": 1000 * rl.step_time_floor_s(mb, b, context, bw),
                     "peak_gpu_bytes": m.get("peak_memory_bytes"), "ids_head": m["ids"][0, :8].tolist(),
                     **({"profile": m["profile"]} if "profile" in m else {})})
        if "profile" in m:  # where the step's time goes: kernels by device time, and the gaps between them
            pr = m["profile"]
            print(f"  profile (batch {b}): {pr['kernel_ms_per_step']:.3f} ms of kernels in a {pr['wall_ms_per_step']:.3f} "
                  f"ms step, {pr['kernels_per_step']:.0f} kernels; top: " +
                  "; ".join(f"{t['name'][:40]} {t['ms_per_step']:.3f}" for t in pr["top"][:5]), flush=True)
        print(f"{name:31s} batch {b:3d}: {m['decode_tok_s']:9.1f} tok/s, {m['decode_ms_per_step']:.3f} ms/step "
              f"({100 * rows[-1]['roofline_fraction']:.0f}% of {roof:,.0f})", flush=True)
    prefill = [time_prefill(model, pb, args.prefill_len, cfg.vocab_size) for pb in dict.fromkeys((1, args.prefill_batch))]
    for p in prefill:
        p["floor_s"] = rl.prefill_floor_s(mb, p["batch"] * p["tokens"], env.get("peak_fp16_flops") or float("inf"), bw)
    out = {"variant": name, "weights": weights, "group_size": group_size, **info, "build_s": build_s,
           "fused_projections": fused, "compiled_step": compiled,
           "weight_read_bytes": mb.weight_read_bytes, "kv_bytes_per_token": mb.kv_bytes_per_token,
           "batches": rows, "prefill": prefill}
    del model
    torch.cuda.empty_cache()
    return out


# what a kernel does, from its name (cuBLAS / CUTLASS / gemlite / tinygemm / Triton from Inductor), first match wins:
# the profile's kernels summed per kind, so a missed roofline target says which kind of work holds the step
KERNEL_KINDS = (("int4 matmul (gemlite / tinygemm)", ("gemv_int", "gemm_int", "gemm_splitk_int", "gemm_splitk_persistent",
                                                     "int4", "tinygemm", "gemlite")),
                ("fp8 / int8 matmul", ("scaled_mm", "_int_mm", "fp8", "i8")),
                ("fp16 matmul (cuBLAS / CUTLASS)", ("gemm", "gemv", "cutlass", "xmma", "sm90_", "cublas", "matmul",
                                                    "addmm", "aten::mm", "aten::linear")),
                ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
                ("copies", ("copy", "memcpy", "cat", "index_put", "scatter")),
                ("norms, RoPE, residual, activations", ("elementwise", "reduce", "vectorized", "triton_", "rms",
                                                        "mul", "add", "silu", "pow", "mean", "rsqrt", "neg")))


def kernel_kind(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in n for k in keys)), "other")


def profile_lines(res: dict) -> list[str]:
    """Where each profiled variant's step goes: wall time per step, the kernels' device time (the rest is launch gaps
    and host work), the bandwidth floor, and the top kernels' time by kind (the kernels past the top as one line)."""
    lines = []
    for v in res["variants"]:
        row = next((r for r in v["batches"] if r.get("profile")), None)
        if row is None:
            continue
        pr = row["profile"]
        kinds: dict[str, float] = {}
        for k in pr["top"]:
            kinds[kernel_kind(k["name"])] = kinds.get(kernel_kind(k["name"]), 0.0) + k["ms_per_step"]
        rest = pr["kernel_ms_per_step"] - sum(kinds.values())
        if rest > 1e-4:
            kinds["other kernels (past the top)"] = rest
        gap = pr["wall_ms_per_step"] - pr["kernel_ms_per_step"]
        lines.append(f"| {v['variant']} | {row['batch']} | {row['decode_ms_per_step']:.2f} | {row['step_floor_ms']:.2f} | "
                     f"{pr['kernel_ms_per_step']:.2f} ({pr['kernels_per_step']:.0f} kernels) | {gap:+.2f} | " +
                     "; ".join(f"{k} {ms:.2f}" for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])) +
                     f"{' (kernels timed on the eager step: a graph hides its kernels from the profiler)' if pr.get('kernels_from_eager_step') else ''} |")
    if not lines:
        return []
    return ["", "Where the step goes (torch.profiler over the first batch's steps after the timed runs; ms per step):",
            "", "| variant | batch | step ms (timed) | bandwidth floor ms | kernels ms | gap (profiled wall − kernels) | "
            "kernel time by kind |", "|---|---|---|---|---|---|---|", *lines]


def table(res: dict) -> str:
    vs = res["variants"]
    # each row against the harness's FP16 decoded the same way (compiled rows against compiled FP16)
    bases = {v["variant"]: {r["batch"]: r["decode_tok_s"] for r in v["batches"]} for v in vs
             if parse_variant(v["variant"])[0] == "fp16"}
    batches = sorted({r["batch"] for v in vs for r in v["batches"]})
    lines = [f"Decode, {res['arch']} shape (random fp16 weights; {res['gpu']}; prompt {res['prompt_len']}, "
             f"{res['gen_len']} new tokens, static KV cache + one CUDA graph per step): tok/s "
             f"(share of the bandwidth roofline; × the harness's FP16 in the same run)", "",
             "| variant | kernel | weights read/step GB | " + " | ".join(f"batch {b}" for b in batches) +
             f" | prefill {res['prefill_len']} tok/s (b=1 / b={res['prefill_batch']}) |",
             "|---|---|---|" + "---|" * len(batches) + "---|"]
    for v in vs:
        fp16 = "fp16" + COMPILED if v.get("compiled_step") else "fp16"
        base = bases.get(fp16, {}) if v["variant"] != fp16 else {}
        cells = []
        for b in batches:
            r = next((r for r in v["batches"] if r["batch"] == b), None)
            if r is None:
                cells.append("–")
                continue
            ratio = f", {r['decode_tok_s'] / base[b]:.2f}×" if b in base else ""
            cells.append(f"{r['decode_tok_s']:,.0f} ({100 * r['roofline_fraction']:.0f}%{ratio})")
        pre = " / ".join(f"{p['prefill_tok_s']:,.0f}" for p in v["prefill"])
        lines.append(f"| {v['variant']} | {v['kernel']} | {v['weight_read_bytes'] / 1e9:.2f} | " + " | ".join(cells) +
                     f" | {pre} |")
    lines += profile_lines(res)
    for k, why in res.get("failed", {}).items():
        lines.append(f"\n- {k} failed: {why}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu") / NAME)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    help=f"of {', '.join(VARIANTS)}; each may end in {COMPILED}")
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--arch", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick look)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="keep q/k/v and gate/up as separate products (transformers' layout)")
    ap.add_argument("--compile", action="store_true",
                    help="the decode step through torch.compile before the CUDA graph records it (fuses the small "
                         "ops between the projections)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="at the first batch size, this many more steps under torch.profiler: each kernel's device "
                         "time per step and the gap to the step's wall time (where a missed target's time goes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", type=Path)
    args = ap.parse_args(argv)
    for v in args.variants:  # a misspelt variant fails here, before a model is built
        try:
            parse_variant(v)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    if args.report:
        print(table(json.loads((args.report / f"{NAME}.json").read_text())))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: benchmarks.decode_gpu: no CUDA device — this benchmark decodes on a GPU; run it on one",
              file=sys.stderr)
        return 2
    from backends import roofline as rl
    from benchmarks.common import write_result
    from harness.environment import environment

    env = environment()
    gpu = torch.cuda.get_device_name()
    env["roofline_bw_bytes_s"] = rl.lookup(rl.HBM_BANDWIDTH_BYTES_S, gpu)
    env["peak_fp16_flops"] = rl.lookup(rl.PEAK_FP16_FLOPS, gpu)
    try:
        from quant.kernels.gemlite_linear import load_autotune

        env["gemlite_autotune_loaded"] = str(load_autotune() or "")
    except Exception as e:
        env["gemlite_autotune_loaded"] = f"not loaded: {e}"
    res = {"benchmark": NAME, "arch": args.arch, "layers": args.layers, "gpu": gpu, "prompt_len": args.prompt_len,
           "gen_len": args.gen_len, "prefill_len": args.prefill_len, "prefill_batch": args.prefill_batch,
           "repeats": args.repeats, "variants": [], "failed": {}, "environment": env,
           "command": "python -m benchmarks.decode_gpu " + " ".join(argv if argv is not None else sys.argv[1:])}
    for v in args.variants:
        try:
            res["variants"].append(run_variant(v, args, env))
        except Exception as e:  # one variant's failure is a row of the result, not the end of the run
            import traceback

            traceback.print_exc()
            res["failed"][v] = f"{type(e).__name__}: {str(e)[:300]}"
        write_result(args.out / f"{NAME}.json", res)  # after every variant: a run that dies keeps what it finished
    md = table(res)
    (args.out / f"{NAME}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
