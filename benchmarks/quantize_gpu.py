"""Quantizing a 7B on one GPU: the harness's AWQ (scale + clip search), RTN, GPTQ (static activation order), the
AWQ->GPTQ recipe and, with the GPU's memory capped below the model's size, AWQ and GPTQ again, against LMDeploy's
`lite auto_awq` (default: smoothing only; optionally `--search-scale`), on the same synthetic Llama-2-7B checkpoint
and the same calibration tokens, in one run.

The `_stream` variants never hold the model in host memory (quant/streaming.py): the model is built without weights,
each decoder block is read from the checkpoint's safetensors (memory-mapped) for its turn on the GPU, its codes are
packed and written straight to the AWQ GEMM export, and its weights released; `_stream_synthetic` generates each
block's random weights on the GPU from the seed instead of reading a file (for shapes larger than the disk).

Each variant runs in a process of its own (fresh peak-memory counters): wall seconds end to end (load, quantize,
export of the AWQ GEMM checkpoint), seconds per decoder block, peak GPU memory (torch's allocator) and peak host
memory (resident set). The harness keeps the weights in host memory and moves one decoder block at a time to the
GPU (quant/onload.py); LMDeploy does the same. Calibration: 128 x 512 random token ids below 32,000 (seed 0), fed to
both (LMDeploy's `get_calib_loaders` is replaced by a function returning them: it downloads datasets otherwise).
Random weights: time and memory only, never quality.

    python -m benchmarks.quantize_gpu --out $OUT --tokenizer .device/tokenizers/smollm2-135m-instruct
    python -m benchmarks.quantize_gpu --variants lmdeploy_search --out $OUT ...
    python -m benchmarks.quantize_gpu --variants harness_awq harness_awq_stream harness_gptq_stream --out $OUT
    python -m benchmarks.quantize_gpu --report results/gpu        # the table again from the saved JSON
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness.log import logger

NAME = "quantize_gpu"
# the harness's variants and the conf/quant option each runs (group size from --group-size)
HARNESS = {"harness_awq": "awq_w4", "harness_rtn": "rtn_w4", "harness_gptq": "gptq_w4",
           "harness_awq_gptq": "awq_gptq_w4", "harness_awq_capped": "awq_w4", "harness_gptq_capped": "gptq_w4",
           "harness_awq_stream": "awq_w4", "harness_gptq_stream": "gptq_w4", "harness_rtn_stream": "rtn_w4",
           "harness_awq_stream_synthetic": "awq_w4", "harness_gptq_stream_synthetic": "gptq_w4",
           "harness_rtn_stream_synthetic": "rtn_w4"}
# streamed variants: where each block's weights come from (quant.streaming): the checkpoint file, or the seed
STREAM = {"harness_awq_stream": "file", "harness_gptq_stream": "file", "harness_rtn_stream": "file",
          "harness_awq_stream_synthetic": "synthetic", "harness_gptq_stream_synthetic": "synthetic",
          "harness_rtn_stream_synthetic": "synthetic"}
VARIANTS = [*HARNESS, "lmdeploy_default", "lmdeploy_search"]
DEFAULT_VARIANTS = ["harness_awq", "harness_rtn", "harness_gptq", "harness_awq_capped", "lmdeploy_default"]
N_SAMPLES, SEQLEN, VOCAB = 128, 512, 32000
CAP_GIB = 10.0  # the capped run: the GPU memory the harness may use, below the 12.6 GiB of the 7B's fp16 weights
log = logger("quantize_gpu")


def calibration_tokens(n: int = N_SAMPLES, seqlen: int = SEQLEN, vocab: int = VOCAB, seed: int = 0):
    import torch

    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def cap_fraction(cap_bytes: int, total_bytes: int) -> float:
    """torch.cuda.set_per_process_memory_fraction's argument for a cap in bytes."""
    if not 0 < cap_bytes < total_bytes:
        raise ValueError(f"cap {cap_bytes} must be between 0 and the GPU's {total_bytes} bytes")
    return cap_bytes / total_bytes


def _peak(torch) -> dict:
    import resource

    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "gpu_peak_allocated_bytes": None}
    if torch.cuda.is_available():
        out.update(gpu_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved())
    return out


def _median(xs: list[float]) -> float:
    """The upper median (a value that was measured), as every per-block figure here reports it."""
    return sorted(xs)[len(xs) // 2]


def progress_path(out: Path, variant: str) -> Path:
    """Where a variant's child appends one line per finished decoder block: what a killed run leaves behind."""
    return out / f"{NAME}_{variant}.blocks.jsonl"


def log_blocks(place, path: Path) -> None:
    """Wrap `place.block` (the placement's per-block context) so each finished block appends {"block", "seconds",
    "host_rss_bytes", "gpu_peak_bytes"} to `path` and prints it: a variant stopped by --timeout still says how far it
    got and at what pace."""
    import resource
    from contextlib import contextmanager

    import torch

    inner, count = place.block, [0]

    @contextmanager
    def block(b):
        t = time.perf_counter()
        with inner(b) as x:
            yield x
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row = {"block": count[0], "seconds": time.perf_counter() - t,
               "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
        count[0] += 1
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"block {row['block']}: {row['seconds']:.2f} s", flush=True)

    object.__setattr__(place, "block", block)  # this instance only (placements are frozen dataclasses)


def partial(path: Path, n_blocks: int | None) -> dict:
    """What a variant that did not finish did: blocks done, their median seconds, and the whole run's quantize time
    at that pace (an extrapolation, labelled as such)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    med = _median([r["seconds"] for r in rows])
    return {"blocks_done": len(rows), "n_blocks": n_blocks, "block_seconds_median": med,
            "quantize_seconds_extrapolated": med * n_blocks if n_blocks else None,
            "host_peak_rss_bytes": max(r["host_rss_bytes"] for r in rows),
            "gpu_peak_allocated_bytes": max((r["gpu_peak_bytes"] or 0) for r in rows) or None}


def stopped(variant: str, error: str, timeout_s: float, done: dict, model: list[str], fp16_bytes: int,
            calib: tuple[int, int]) -> dict:
    """The JSON of a variant whose child did not finish: how far it got (`partial`) and what the child would have said
    of the run (machine, model, its fp16 size, calibration), so that a table of stopped rows alone still names them."""
    from harness.environment import environment

    return {"variant": variant, "error": error, "timeout_s": timeout_s, "partial": done, "model": model,
            "model_fp16_bytes": fp16_bytes, "calibration": {"sequences": calib[0], "seqlen": calib[1]},
            "environment": environment()}


def run_harness(variant: str, model_dir: Path, work: Path, model: list[str], device: str,
                cap_bytes: int = int(CAP_GIB * 2**30), calib: tuple[int, int] = (N_SAMPLES, SEQLEN),
                blocks_log: Path | None = None) -> dict:
    import torch

    from harness.compose import compose
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)
    from harness.models import ResolvedModel, load_model
    from quant import METHODS, QuantContext
    from quant.export.awq import export_awq
    from quant.onload import Placement

    capped = variant.endswith("_capped")
    if capped:  # (on a GPU)
        torch.cuda.set_per_process_memory_fraction(cap_fraction(cap_bytes, torch.cuda.get_device_properties(0).total_memory))
    cfg = compose([model[0], f"quant={HARNESS[variant]}", *model[1:]])
    samples = calibration_tokens(*calib)
    t0 = time.perf_counter()
    if variant in STREAM:
        model, place, finish = _open_streamed(STREAM[variant], cfg, model_dir, work, device)
    else:
        model = load_model(ResolvedModel(str(model_dir), None, "synthetic", "synthetic"), cfg.model, device="cpu")
        place = Placement.of(device, True)
        finish = lambda m, q: export_awq(m, q, work / "awq", check_weights=False)  # noqa: E731
    t_load = time.perf_counter() - t0
    if blocks_log is not None:
        log_blocks(place, blocks_log)
    ctx = QuantContext(calibration=lambda: samples, progress=False, placement=place)
    t = time.perf_counter()
    out = METHODS.get(cfg.quant.method)(model, cfg.quant, ctx)
    if device == "cuda":
        torch.cuda.synchronize()
    t_quant = time.perf_counter() - t
    t = time.perf_counter()
    finish(model, out.qtensors)
    t_export = time.perf_counter() - t
    blocks = out.summary.get("block_seconds") or []
    return {"seconds": {"load": t_load, "quantize": t_quant, "export": t_export, "total": time.perf_counter() - t0},
            "block_seconds_median": _median(blocks) if blocks else None, "n_blocks": len(blocks),
            "stage_seconds": {k: v for k, v in out.timings_s.items() if isinstance(v, (int, float))},
            "memory": _peak(torch), "gpu_cap_bytes": cap_bytes if capped else None,
            "quantize_host_memory": out.summary.get("host_memory"), "placement": out.summary.get("placement"),
            "model_fp16_bytes": out.summary.get("weight_bytes_fp16"),
            **({"moe": out.summary["moe"]} if out.summary.get("moe") else {}),  # experts' token counts, fallbacks
            "quant": {k: cfg.quant.__dict__[k] for k in ("method", "w_bit", "group_size")}}


def _open_streamed(source: str, cfg, model_dir: Path, work: Path, device: str):
    """(model skeleton, streaming placement, finish(model, qtensors)) for a streamed variant: blocks from the
    checkpoint file or generated from the seed, codes straight to an AWQ GEMM export under `work`."""
    from harness import synthetic
    from harness.models import DTYPES
    from quant.export.awq_shards import AWQShardWriter
    from quant.streaming import open_streamed

    sink = AWQShardWriter(work / "awq")
    where = ({"model_dir": model_dir} if source == "file" else
             {"synthetic_arch": synthetic.load_arch(synthetic.arch_name(cfg.model.path)), "seed": cfg.seed})
    model, place = open_streamed(device=device, dtype=DTYPES[cfg.model.dtype], sink=sink, **where)
    return model, place, lambda m, q: sink.finish(m, q)


def run_lmdeploy(variant: str, model_dir: Path, work: Path, model: list[str], device: str, cap_bytes: int = 0,
                 calib: tuple[int, int] = (N_SAMPLES, SEQLEN)) -> dict:
    import torch
    from lmdeploy.lite.apis import calibrate as lmd_calibrate
    from lmdeploy.lite.apis.auto_awq import auto_awq

    samples = calibration_tokens(*calib)
    lmd_calibrate.get_calib_loaders = lambda *a, **k: [samples[i : i + 1] for i in range(samples.shape[0])]
    search = variant == "lmdeploy_search"
    t0 = time.perf_counter()
    auto_awq(str(model_dir), work_dir=str(work / "awq"), calib_samples=calib[0], calib_seqlen=calib[1],
             batch_size=128 if search else 1, w_bits=4, w_group_size=128, search_scale=search, device="cuda",
             dtype="float16")
    return {"seconds": {"total": time.perf_counter() - t0}, "memory": _peak(torch),
            "quant": {"method": "lmdeploy auto_awq" + (" --search-scale" if search else ""), "w_bit": 4,
                      "group_size": 128}}


def child(variant: str, model_dir: Path, out: Path, model: list[str], device: str, cap_bytes: int,
          calib: tuple[int, int] = (N_SAMPLES, SEQLEN)) -> None:
    import tempfile

    from harness.environment import environment

    with tempfile.TemporaryDirectory(prefix=f"{variant}-") as work:
        if variant.startswith("lmdeploy"):
            res = run_lmdeploy(variant, model_dir, Path(work), model, device, cap_bytes, calib)
        else:
            res = run_harness(variant, model_dir, Path(work), model, device, cap_bytes, calib,
                              blocks_log=progress_path(out, variant))
            if res["block_seconds_median"] is None:  # a method that times no blocks itself (RTN): the wrapper's
                res["block_seconds_median"] = (partial(progress_path(out, variant), None) or {}).get("block_seconds_median")
    res.update(variant=variant, model=model, calibration={"sequences": calib[0], "seqlen": calib[1]},
               environment=environment())
    (out / f"{NAME}_{variant}.json").write_text(json.dumps(res, indent=1))


def table(results: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.1f}" if b else "–"  # noqa: E731
    ok = [r for r in results if "error" not in r]
    base = {r["variant"]: r["seconds"]["total"] for r in ok}
    lines = ["| variant | total s | load / quantize / export s | s per block (median) | peak GPU GiB | peak host GiB |"
             " host / fp16 weights | vs LMDeploy default |", "|---|---|---|---|---|---|---|---|"]
    fp16 = next((r["model_fp16_bytes"] for r in results if r.get("model_fp16_bytes")), None)
    ratio_of = lambda b: f"{b / fp16:.2f}x" if fp16 and b else "–"  # noqa: E731  (host peak / fp16 weights)
    for r in results:
        if "error" in r:
            pt = r.get("partial") or {}
            # stopped (--timeout, or an error after some blocks): how far it got, at what pace; the whole run's time
            # only extrapolated
            if pt:
                ext = pt.get("quantize_seconds_extrapolated")
                lines.append(f"| {r['variant']} | stopped ({r['error']}) after {pt['blocks_done']}/{pt['n_blocks']} "
                             f"blocks{f'; ~{ext:.0f} s for all at this pace (extrapolated)' if ext else ''} | – | "
                             f"{pt['block_seconds_median']:.2f} | {gib(pt.get('gpu_peak_allocated_bytes'))} | "
                             f"{gib(pt['host_peak_rss_bytes'])} | {ratio_of(pt['host_peak_rss_bytes'])} | – |")
            else:
                lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        s, m = r["seconds"], r["memory"]
        parts = " / ".join(f"{s[k]:.1f}" for k in ("load", "quantize", "export") if k in s) or "–"
        ratio = base.get("lmdeploy_default", 0) / s["total"] if base.get("lmdeploy_default") else None
        host = ratio_of(m["host_peak_rss_bytes"])
        lines.append(f"| {r['variant']}{' (GPU capped at ' + gib(r['gpu_cap_bytes']) + ' GiB)' if r.get('gpu_cap_bytes') else ''}"
                     f" | {s['total']:.1f} | {parts} | {r.get('block_seconds_median') or 0:.2f} | "
                     f"{gib(m['gpu_peak_allocated_bytes'])} | {gib(m['host_peak_rss_bytes'])} | "
                     f"{host} | "
                     f"{f'{ratio:.1f}x faster' if ratio else '–'} |")
    for r in ok:  # a mixture of experts: the routed tokens each expert was calibrated on
        c = (r.get("moe") or {}).get("calibration") or {}
        if c:
            lines.append(f"\n{r['variant']}: tokens per expert min {c.get('expert_tokens_min')}, median "
                         f"{c.get('expert_tokens_median')}; experts below the threshold "
                         f"{sum(len(v) for v in (c.get('experts_below_threshold') or {}).values())}, fallen back "
                         f"{c.get('experts_fallen_back')} ({c.get('fallback') or 'none needed'})")
    envs = [r["environment"] for r in results if r.get("environment")]  # a stopped row's too (the parent's)
    env = next((e for e in envs if e.get("lmdeploy")), next(iter(envs), {}))  # the LMDeploy version of a row that ran
    model = " ".join(next((r.get("model") for r in results if r.get("model")), []) or ["?"])
    cal = next((r["calibration"] for r in results if r.get("calibration")), {"sequences": N_SAMPLES, "seqlen": SEQLEN})
    lines.append(f"\n{env.get('gpu')}, driver {env.get('driver')}, torch {env.get('torch')}, LMDeploy "
                 f"{env.get('lmdeploy')}; {model} (synthetic fp16 weights), w4, {cal['sequences']} x {cal['seqlen']} "
                 f"random "
                 f"calibration tokens; each variant in its own process.")
    return "\n".join(lines)


def report(out: Path, variants: list[str]) -> str:
    results = []
    for v in variants:
        p = out / f"{NAME}_{v}.json"
        if p.exists():
            results.append(json.loads(p.read_text()))
    md = table(results)
    (out / f"{NAME}.md").write_text(md + "\n")
    (out / f"{NAME}.json").write_text(json.dumps(results, indent=1))
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantize_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=Path("results/gpu"))
    ap.add_argument("--synthetic-root", type=Path, default=Path("/tmp/synthetic"))
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer files for the synthetic checkpoint")
    ap.add_argument("--model", default="llama2_7b_synthetic", help="a synthetic conf/model option")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="where blocks compute (cpu: a dry run of the harness variants)")
    ap.add_argument("--cap-gib", type=float, default=CAP_GIB, help="GPU memory cap of the capped run, GiB")
    ap.add_argument("--timeout", type=float, default=420, help="seconds a variant may take")
    ap.add_argument("--n-samples", type=int, default=N_SAMPLES, help="calibration sequences (a dry run takes fewer)")
    ap.add_argument("--seqlen", type=int, default=SEQLEN, help="tokens per calibration sequence")
    ap.add_argument("--report", type=Path, help="only rebuild the table from saved JSON in this folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.report:
        print(report(a.report, VARIANTS))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    model = [f"model={a.model}", f"quant.group_size={a.group_size}"]
    if a.child:
        child(a.child, a.model_dir, a.out, model, a.device, int(a.cap_gib * 2**30), (a.n_samples, a.seqlen))
        return 0
    from harness import synthetic
    from harness.compose import compose
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

    t = time.perf_counter()
    fp16_cfg = compose([model[0], "quant=fp16"])
    model_dir = Path("none")  # only variants that generate their blocks: no file at all (a shape beyond the disk)
    if any(STREAM.get(v) != "synthetic" for v in a.variants):
        model_dir = synthetic.materialize(fp16_cfg, a.synthetic_root, a.tokenizer)
        log(f"synthetic checkpoint {model_dir} ready in {time.perf_counter() - t:.0f} s")
    arch = synthetic.load_arch(synthetic.arch_name(fp16_cfg.model.path))
    n_blocks = arch.num_layers
    fp16_bytes = synthetic.weight_bytes(arch, synthetic.weight_format(fp16_cfg))["total"]
    for v in a.variants:
        log(f"variant {v}")
        progress_path(a.out, v).unlink(missing_ok=True)  # this run's blocks only
        cmd = [sys.executable, "-m", "benchmarks.quantize_gpu", "--child", v, "--model-dir", str(model_dir),
               "--out", str(a.out), "--model", a.model, "--group-size", str(a.group_size), "--device", a.device,
               "--cap-gib", str(a.cap_gib), "--n-samples", str(a.n_samples), "--seqlen", str(a.seqlen)]
        try:
            rc = subprocess.run(cmd, timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            (a.out / f"{NAME}_{v}.json").write_text(json.dumps(stopped(
                v, f"child {rc}", a.timeout, partial(progress_path(a.out, v), n_blocks), model, fp16_bytes,
                (a.n_samples, a.seqlen))))
    print(report(a.out, a.variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
