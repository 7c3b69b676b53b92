"""Data-parallel quantization (issue 18): the harness's AWQ (scale + clip search) on one GPU against the same run
split over N GPUs with torch.distributed (NCCL, one process per GPU, launched by torchrun), on the same synthetic
Llama-2-7B checkpoint and the same 128 x 512 calibration tokens as benchmarks/quantize_gpu.py.

Each rank calibrates on its contiguous shard of the sequences; every statistic AWQ reduces over the data (mean |x|,
the grid losses on the global search subset, the clip Gram matrices) is all-reduced (quant/calibration/reduce.py), so
every rank applies the same scales and clips. The N-GPU run's integer codes, scales and zeros are then compared with
the one-GPU run's, layer by layer: equal where the reduction order allows, else the share that differs is reported
(a float32 sum taken in another order can flip a clipping choice that ties to rounding). Random weights: time,
memory and agreement only, never quality.

    python -m benchmarks.quantize_dp --out $OUT --tokenizer .device/tokenizers/smollm2-135m-instruct   # on 2 GPUs
    python -m benchmarks.quantize_dp --report results/gpu/quantize_dp                               # table again
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness.log import logger

NAME = "quantize_dp"
log = logger("quantize_dp")
# NVLink multicast stays off in every process (../shared GPU notes); torchrun's workers inherit this environment
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def worker_command(n_gpus: int, model_dir: Path, out: Path, model: str, group_size: int, reference: Path | None,
                   samples: int = 128, seqlen: int = 512, python: str = sys.executable) -> list[str]:
    """One GPU: this module's worker in a plain process; N GPUs: the same worker under torchrun, one per GPU."""
    args = ["-m", "benchmarks.quantize_dp", "--worker", "--model-dir", str(model_dir), "--out", str(out),
            "--model", model, "--group-size", str(group_size), "--gpus", str(n_gpus), "--samples", str(samples),
            "--seqlen", str(seqlen)]
    if reference is not None:
        args += ["--reference", str(reference)]
    if n_gpus == 1:
        return [python, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}", *args]


def compare_qtensors(a: dict, b: dict) -> dict:
    """Agreement of two quantizations of one model ({name: {"q", "scales", "zeros"}}): the share of integer codes that
    differ, the largest code difference, the largest relative scale difference, and the layers that differ at all."""
    import torch

    if a.keys() != b.keys():
        raise ValueError(f"different layers: {sorted(a.keys() ^ b.keys())[:4]}")
    n = diff = 0
    max_code = 0
    max_scale_rel = 0.0
    layers_differing = []
    for name in sorted(a):
        qa, qb = a[name]["q"].to(torch.int16), b[name]["q"].to(torch.int16)
        d = int((qa != qb).sum())
        n += qa.numel()
        diff += d
        if d:
            layers_differing.append(name)
            max_code = max(max_code, int((qa - qb).abs().max()))
        sa, sb = a[name]["scales"].double(), b[name]["scales"].double()
        max_scale_rel = max(max_scale_rel, float(((sa - sb).abs() / sb.abs().clamp_min(1e-12)).max()))
    return {"codes": n, "codes_differing": diff, "share_differing": diff / n if n else 0.0, "max_code_diff": max_code,
            "max_scale_rel_diff": max_scale_rel, "layers": len(a), "layers_differing": len(layers_differing),
            "first_layers_differing": layers_differing[:5]}


def _save_codes(qtensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({f"{k}.{n}": getattr(q, k).contiguous().cpu() for n, q in qtensors.items()
               for k in ("q", "scales", "zeros") if getattr(q, k) is not None}, str(path))


def _load_codes(path: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for key, t in load_file(str(path)).items():
        kind, _, name = key.partition(".")
        out.setdefault(name, {})[kind] = t
    return out


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    import quant  # noqa: F401  (registers every method's config)
    from benchmarks.quantize_gpu import _peak, calibration_tokens
    from harness.compose import compose
    from harness.environment import environment
    from harness.models import ResolvedModel, load_model
    from quant import METHODS, QuantContext
    from quant.onload import Placement

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # gloo: a CPU dry run
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    cfg = compose([f"model={a.model}", "quant=awq_w4", f"quant.group_size={a.group_size}"])
    samples = calibration_tokens(a.samples, a.seqlen)
    t0 = time.perf_counter()
    model = load_model(ResolvedModel(str(a.model_dir), None, "synthetic", "synthetic"), cfg.model, device="cpu")
    t_load = time.perf_counter() - t0
    if world > 1:
        dist.barrier()  # quantization starts together on every rank
    t = time.perf_counter()
    out = METHODS.get("awq")(model, cfg.quant, QuantContext(calibration=lambda: samples, progress=False,
                                                             placement=Placement.of(device, True)))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_quant = time.perf_counter() - t
    peaks = [_peak(torch)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if rank == 0:
        res = {"gpus": world, "seconds": {"load": t_load, "quantize": t_quant},
               "block_seconds": out.summary.get("block_seconds"), "alpha_mean": out.summary.get("alpha_mean"),
               "stage_seconds": {k: v for k, v in out.timings_s.items() if isinstance(v, (int, float))},
               "memory_per_rank": peaks, "quant": {"method": "awq", "w_bit": cfg.quant.w_bit,
                                                   "group_size": cfg.quant.group_size},
               "calibration": {"sequences": int(samples.shape[0]), "seqlen": int(samples.shape[1]),
                               "per_rank": int(samples.shape[0]) // world},
               "environment": environment()}
        if a.reference is None:
            t = time.perf_counter()
            _save_codes(out.qtensors, a.out / "codes_1gpu.safetensors")
            res["seconds"]["save_codes"] = time.perf_counter() - t
        else:
            res["agreement_with_1gpu"] = compare_qtensors(_load_codes(a.reference),
                                                          {n: {"q": q.q, "scales": q.scales, "zeros": q.zeros}
                                                           for n, q in out.qtensors.items()})
        (a.out / f"{NAME}_{world}gpu.json").write_text(json.dumps(res, indent=1))
    if world > 1:
        dist.destroy_process_group()


def table(results: list[dict]) -> str:
    lines = ["| GPUs | sequences per GPU | quantize s | speed-up | s per block (median) | peak GPU GiB per GPU | "
             "host GiB per process | codes differing from 1 GPU |", "|---|---|---|---|---|---|---|---|"]
    base = next((r["seconds"]["quantize"] for r in results if r.get("gpus") == 1 and "seconds" in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r.get('gpus')} | – | {r['error']} | | | | | |")
            continue
        bs = sorted(r.get("block_seconds") or [0])
        gpu = max((p.get("gpu_peak_allocated_bytes") or 0) for p in r["memory_per_rank"]) / 2**30
        host = max(p["host_peak_rss_bytes"] for p in r["memory_per_rank"]) / 2**30
        ag = r.get("agreement_with_1gpu")
        agree = "(reference)" if ag is None else (f"{ag['codes_differing']:,} of {ag['codes']:,} "
                                                  f"({100 * ag['share_differing']:.3f}%), max ±{ag['max_code_diff']}")
        q = r["seconds"]["quantize"]
        lines.append(f"| {r['gpus']} | {r['calibration']['per_rank']} | {q:.1f} | "
                     f"{base / q if base else float('nan'):.2f}x | {bs[len(bs) // 2]:.2f} | {gpu:.2f} | {host:.1f} | {agree} |")
    env = next((r["environment"] for r in results if "environment" in r), {})
    cal = next((r["calibration"] for r in results if "calibration" in r), {})
    lines.append(f"\nAWQ w4 g{results[0].get('quant', {}).get('group_size', '?')} (scale + clip search), synthetic "
                 f"weights, {cal.get('sequences', '?')} x {cal.get('seqlen', '?')} calibration tokens; "
                 f"{env.get('gpu') or env.get('cpu_model', '?')}, driver {env.get('driver', '?')}, "
                 f"torch {env.get('torch', '?')}. Quantize seconds exclude loading the checkpoint into host memory.")
    return "\n".join(lines) + "\n"


def report(out: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob(f"{NAME}_*gpu.json"))]
    md = table(sorted(results, key=lambda r: r.get("gpus", 0)))
    (out / f"{NAME}.md").write_text(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantize_dp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu/quantize_dp"))
    ap.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel run")
    ap.add_argument("--synthetic-root", type=Path, default=Path("/tmp/synthetic"))
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--model", default="llama2_7b_synthetic")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences (fewer: a CPU dry run)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--report", type=Path, help="only rebuild the table from saved JSON in this folder")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.report:
        print(report(a.report))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a)
        return 0
    import quant  # noqa: F401
    from harness import synthetic
    from harness.compose import compose

    t = time.perf_counter()
    model_dir = synthetic.materialize(compose([f"model={a.model}", "quant=fp16"]), a.synthetic_root, a.tokenizer)
    log(f"synthetic checkpoint {model_dir} ready in {time.perf_counter() - t:.0f} s")
    env = {**os.environ, **NO_MULTICAST}
    ref = a.out / "codes_1gpu.safetensors"
    for n in (1, a.gpus):
        cmd = worker_command(n, model_dir, a.out, a.model, a.group_size, None if n == 1 else ref, a.samples, a.seqlen)
        log(f"{n} GPU(s): {' '.join(cmd[1:])}")
        try:
            rc = subprocess.run(cmd, env=env if n > 1 else {**env, "CUDA_VISIBLE_DEVICES": "0"},
                                timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            (a.out / f"{NAME}_{n}gpu.json").write_text(json.dumps({"gpus": n, "error": f"worker exit {rc}"}))
    ref.unlink(missing_ok=True)  # GiBs of codes: only the comparison is kept
    print(report(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
