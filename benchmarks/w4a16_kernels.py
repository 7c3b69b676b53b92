"""Per-call time of each W4A16 kernel on the Llama-2 decoder shapes, beside cuBLAS fp16 and LMDeploy's own AWQ
kernel, every row checked against its reference weights before it is timed.

For each model shape (7B: qkv 4096x12288, o 4096x4096, gate_up 4096x22016, down 11008x4096; 13B: 5120 / 13824) and
M in 1, 2, 4, 8, 16, 32 rows: the block's four linears are called 10 times inside one CUDA graph, the graph is replayed
`--replays` times, and the median replay / 10 x the number of blocks is the linears' time per decode step. Weights
are RTN codes of random fp16 matrices (a kernel's speed does not depend on which method chose its codes). The floor
beside each row is the bytes the four linears read (codes + scales + zeros, or fp16) over the GPU's HBM bandwidth.

Exactness, at M = 1 and the largest M, against a float32 product with the weights the kernel is meant to multiply by:
AWQ's (q - z) * s with fp16 scales for gemlite, LMDeploy and the dequantized reference; tinygemm's own bf16 float-
zero weights (quant/kernels/int4_linear.kernel_dequantize) for torch's int4 kernel, whose difference to AWQ's weights
is recorded separately. A kernel whose error exceeds the tolerance is reported and not timed.

    python -m benchmarks.w4a16_kernels --out results/gpu/w4a16_kernels          # on a GPU
    python -m benchmarks.w4a16_kernels --gemlite-autotune max                    # time gemlite's candidates, keep the best
    python -m benchmarks.w4a16_kernels --report results/gpu/w4a16_kernels        # the table again from the JSON
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

NAME = "w4a16_kernels"
SHAPES = {  # model -> (blocks, [(K, N) of qkv, o, gate_up, down])
    "llama2_7b": (32, [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]),
    "llama2_13b": (40, [(5120, 15360), (5120, 5120), (5120, 27648), (13824, 5120)]),
}
M_VALUES = (1, 2, 4, 8, 16, 32)
KERNELS = ("cublas_fp16", "gemlite", "tinygemm", "lmdeploy_awq")
CALLS_PER_GRAPH = 10
REL_TOL = 2e-2  # relative Frobenius error of the output against the float32 reference (fp16 accumulation order)


def rel_error(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp(min=1e-12))


def layer_bytes(k: int, n: int, kernel: str, group_size: int) -> int:
    from harness.storage_bytes import quantized_weight_bytes

    if kernel == "cublas_fp16":
        return 2 * k * n
    return quantized_weight_bytes(k * n, n * (k // group_size), 4, True)


def awq_weight(qt):
    """The AWQ checkpoint's weight [N, K] in float32: (q - z) * s with s rounded to fp16, as exported."""
    return (qt.q.float() - qt.zeros.repeat_interleave(qt.group_size, 1)) * \
        qt.scales.half().float().repeat_interleave(qt.group_size, 1)


def build(kernel: str, qt, w_fp16, device):
    """(callable x -> y, reference weight [N, K] float32 it should multiply by)."""
    import torch
    from torch.nn import functional as F

    if kernel == "cublas_fp16":
        return (lambda x: F.linear(x, w_fp16)), w_fp16.float()
    if kernel == "gemlite":
        from quant.kernels.gemlite_linear import GemliteW4A16Linear

        return GemliteW4A16Linear(qt, None, torch.float16, device), awq_weight(qt)
    if kernel == "tinygemm":
        from quant.kernels.int4_linear import Int4WeightOnlyLinear, kernel_dequantize

        return Int4WeightOnlyLinear(qt, None, "", torch.bfloat16, device), kernel_dequantize(qt).to(device)
    if kernel == "lmdeploy_awq":
        from lmdeploy.pytorch.kernels.cuda.awq_kernels import awq_linear

        from quant.export.awq import qtensor_to_awq

        t = {k: v.to(device) for k, v in qtensor_to_awq(qt).items()}
        return (lambda x: awq_linear(x, t["qweight"], t["scales"], t["qzeros"])), awq_weight(qt)
    raise ValueError(kernel)


def time_block(fns, xs, replays: int) -> float:
    """Median seconds of one pass over the block's linears, from a CUDA graph of CALLS_PER_GRAPH passes."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for f, x in zip(fns, xs):
                f(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS_PER_GRAPH):
            for f, x in zip(fns, xs):
                f(x)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000 / CALLS_PER_GRAPH)
    return statistics.median(times)


def run(models, kernels, m_values, group_size: int, replays: int, autotune: str, save=None) -> dict:
    import torch

    from backends.roofline import HBM_BANDWIDTH_BYTES_S, lookup
    from quant.primitives import quantize_tensor

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    bandwidth = lookup(HBM_BANDWIDTH_BYTES_S, gpu)
    out = {"gpu": gpu, "bandwidth_bytes_s": bandwidth, "group_size": group_size, "calls_per_graph": CALLS_PER_GRAPH,
           "replays": replays, "gemlite_autotune": autotune, "rows": [], "errors": {}, "skipped": {}}
    if "gemlite" in kernels:
        try:
            import gemlite

            from quant.kernels.gemlite_linear import load_autotune, save_autotune

            gemlite.set_autotune(autotune if autotune != "off" else False)
            out["gemlite_autotune_loaded"] = str(load_autotune() or "")
        except Exception as e:
            out["skipped"]["gemlite"] = f"{type(e).__name__}: {e}"
            kernels = [k for k in kernels if k != "gemlite"]
    gen = torch.Generator(device=device).manual_seed(0)
    for model in models:
        blocks, shapes = SHAPES[model]
        layers = []
        for k, n in shapes:
            w = (torch.randn(n, k, generator=gen, device=device) * 0.02).half()
            layers.append((k, n, w, quantize_tensor(w.float(), 4, group_size)))
        for kernel in kernels:
            try:
                built = [build(kernel, qt, w, device) for k, n, w, qt in layers]
            except Exception as e:  # a kernel that is not installed here (LMDeploy) or refuses the shape
                out["skipped"][f"{model}/{kernel}"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            errs = {}
            for m in (1, max(m_values)):
                for (k, n, w, qt), (fn, ref_w) in zip(layers, built):
                    x = torch.randn(m, k, generator=gen, device=device).half()
                    ref = x.float() @ ref_w.t()
                    errs[f"M{m}_{k}x{n}"] = rel_error(fn(x), ref)
            out["errors"][f"{model}/{kernel}"] = errs
            if kernel == "tinygemm":  # its weights against AWQ's: the bf16 scale and float zero's rounding
                out["tinygemm_weight_vs_awq"] = {
                    f"{k}x{n}": rel_error(ref_w, awq_weight(qt).to(device))
                    for (k, n, w, qt), (_, ref_w) in zip(layers, built)}
            if max(errs.values()) > REL_TOL:
                out["skipped"][f"{model}/{kernel}"] = f"relative error {max(errs.values()):.3g} > {REL_TOL}: not timed"
                continue
            floor_s = sum(layer_bytes(k, n, kernel, group_size) for k, n, *_ in layers) * blocks / bandwidth
            for m in m_values:
                xs = [torch.randn(m, k, generator=gen, device=device).half() for k, *_ in layers]
                t = time_block([fn for fn, _ in built], xs, replays) * blocks
                out["rows"].append({"model": model, "kernel": kernel, "M": m, "ms_per_step": 1000 * t,
                                    "floor_ms": 1000 * floor_s, "roofline_fraction": floor_s / t})
                print(f"{model:11s} {kernel:13s} M={m:3d} {1000 * t:8.3f} ms  (floor {1000 * floor_s:.3f}, "
                      f"{100 * floor_s / t:.0f}%)", flush=True)
            del built
            torch.cuda.empty_cache()
            if save:  # after every kernel: a run cut short keeps what it measured
                save(out)
    if "gemlite" in kernels:
        out["gemlite_autotune_saved"] = str(save_autotune())
    return out


def table(res: dict) -> str:
    lines = [f"W4A16 linears per decode step (ms; {res['gpu']}, g{res['group_size']}, CUDA graph of "
             f"{res['calls_per_graph']} calls, median of {res['replays']} replays; in brackets: the bandwidth floor's "
             f"share reached)", ""]
    for model in dict.fromkeys(r["model"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["model"] == model]
        ms = sorted({r["M"] for r in rows})
        fp16 = {r["M"]: r["ms_per_step"] for r in rows if r["kernel"] == "cublas_fp16"}
        lines += [f"**{model}**", "", "| kernel | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|" + "---|" * len(ms)]
        for kernel in dict.fromkeys(r["kernel"] for r in rows):
            cells = []
            for m in ms:
                r = next((r for r in rows if r["kernel"] == kernel and r["M"] == m), None)
                if r is None:
                    cells.append("–")
                    continue
                ratio = f", {fp16[m] / r['ms_per_step']:.2f}× fp16" if m in fp16 and kernel != "cublas_fp16" else ""
                cells.append(f"{r['ms_per_step']:.2f} ({100 * r['roofline_fraction']:.0f}%{ratio})")
            lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
        lines.append("")
    for k, why in res.get("skipped", {}).items():
        lines.append(f"- not timed: {k}: {why}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu") / NAME)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--m", nargs="+", type=int, default=list(M_VALUES))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--gemlite-autotune", default="fast", choices=["off", "default", "fast", "max"])
    ap.add_argument("--report", type=Path, help="print the table of a saved result folder and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(table(json.loads((args.report / f"{NAME}.json").read_text())))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: benchmarks.w4a16_kernels: no CUDA device — this benchmark times GPU kernels; run it on a GPU",
              file=sys.stderr)
        return 2
    from benchmarks.common import write_result
    from harness.environment import environment

    res = run(args.models, args.kernels, args.m, args.group_size, args.replays, args.gemlite_autotune,
              save=lambda r: write_result(args.out / f"{NAME}.json", r))
    res["environment"] = environment()
    res["command"] = "python -m benchmarks.w4a16_kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    write_result(args.out / f"{NAME}.json", res)
    md = table(res)
    (args.out / f"{NAME}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
