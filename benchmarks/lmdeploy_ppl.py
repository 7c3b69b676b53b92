"""Does the harness's simulation predict the deployed model? Token perplexity of one exported AWQ checkpoint, scored
twice on the same windows: dequantized on the CPU through the harness (eval.perplexity.window_nll) and through
LMDeploy's real W4A16 kernels (`Pipeline.get_ppl`, which returns each window's mean next-token cross-entropy).

Three steps, because the checkpoint is made where the calibration data is and scored where the GPU is:

    python -m benchmarks.lmdeploy_ppl export --dir .device/ppl [overrides]   # CPU: quantize, export, simulated PPL
    python -m benchmarks.lmdeploy_ppl gpu --dir .device/ppl --out $OUT       # GPU: LMDeploy PPL of the same windows
    python -m benchmarks.lmdeploy_ppl compare --dir .device/ppl --gpu-json F --out results/gpu

`export` also cuts the checkpoint into parts small enough to travel to the GPU machine one command at a time
(`gpu` joins them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness.log import logger

NAME = "lmdeploy_ppl"
PART_BYTES = 55 << 20
DEFAULT_OVERRIDES = ["model=smollm2_135m", "quant=awq_w4", "backend=lmdeploy"]


log = logger("ppl")


def relative_gap(real: float, sim: float) -> float:
    return (real - sim) / sim


def split_file(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    with open(path, "rb") as f:
        i = 0
        while chunk := f.read(part_bytes):
            name = f"{path.name}.part{i}"
            (out_dir / name).write_bytes(chunk)
            names.append(name)
            i += 1
    return names


def join_parts(parts: list[Path], dst: Path) -> None:
    with open(dst, "wb") as out:
        for p in parts:
            out.write(Path(p).read_bytes())


def export(d: Path, overrides: list[str]) -> None:
    import torch

    from eval.perplexity import ppl_metrics, window_nll
    from experiments.pipeline import prepare
    from harness.data import calibration_provider
    from harness.models import load_model
    from harness.records import write_json_atomic
    from quant import METHODS, QuantContext
    from quant.export.awq import export_awq, load_awq_dequantized
    from harness.compose import compose
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

    cfg = compose(overrides)
    prep = prepare(cfg)
    model = load_model(prep.resolved, cfg.model)
    calib, _ = calibration_provider(cfg.quant.calib, prep.tokenizer, prep.bos_token_id)
    t = time.perf_counter()
    outcome = METHODS.get(cfg.quant.method)(model, cfg.quant, QuantContext(calibration=calib, progress=False))
    t_quant = time.perf_counter() - t
    ckpt = d / "ckpt"
    export_awq(model, outcome.qtensors, ckpt, tokenizer=prep.tokenizer)
    log(f"exported {ckpt} ({t_quant:.0f} s quantize)")
    del model
    sim = load_awq_dequantized(ckpt, torch.float32)
    windows, result = {}, {}
    for split, w in prep.windows.items():
        nll, secs = window_nll(sim, w, cfg.eval.perplexity.batch_size, progress=False)
        result[split] = {**ppl_metrics(nll, secs, w.shape[1]), "window_nll_mean": nll.double().mean(1).tolist()}
        windows[split] = w.tolist()
        log(f"{split}: simulated (fp32 dequantized) token PPL {result[split]['token_ppl']:.3f}")
    (d / "windows.json").write_text(json.dumps(windows))
    parts = split_file(ckpt / "model.safetensors", d / "parts")
    (ckpt / "model.safetensors").unlink()
    from dataclasses import asdict

    write_json_atomic(d / "simulated.json", {"overrides": overrides, "config": asdict(cfg), "quantize_s": t_quant,
                                             "quant_summary": outcome.summary, "perplexity": result, "parts": parts,
                                             "simulation": "harness window_nll on load_awq_dequantized(fp32), CPU"})


def gpu(d: Path, out: Path, parts_dir: Path | None) -> None:
    from harness.records import write_json_atomic
    from backends import lmdeploy as lb
    from backends.lmdeploy import ppl_from_window_means
    from harness.compose import compose
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

    sim = json.loads((d / "simulated.json").read_text())
    ckpt = d / "ckpt"
    parts_dir = parts_dir or d / "parts"
    join_parts([parts_dir / p for p in sim["parts"]], ckpt / "model.safetensors")
    cfg = compose(sim["overrides"])
    pipe, engine, reason = lb.make_pipeline(cfg, ckpt)
    windows = json.loads((d / "windows.json").read_text())
    result = {}
    for split, w in windows.items():
        t = time.perf_counter()
        ce = [float(x) for x in pipe.get_ppl(w)]
        result[split] = {"token_ppl": ppl_from_window_means(ce), "window_nll_mean": ce, "windows": len(w),
                         "seqlen": len(w[0]), "seconds": time.perf_counter() - t}
        log(f"{split}: LMDeploy ({engine}) token PPL {result[split]['token_ppl']:.3f}")
    from harness.environment import environment

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{NAME}_gpu.json", {"engine": engine, "engine_fallback_reason": reason,
                                                 "engine_kwargs": lb.engine_kwargs(cfg, ckpt, engine),
                                                 "perplexity": result, "environment": environment()})
    pipe.close()


def compare(d: Path, gpu_json: Path, out: Path, command: str) -> dict:
    from harness.records import write_json_atomic

    sim, real = json.loads((d / "simulated.json").read_text()), json.loads(Path(gpu_json).read_text())
    rows = {}
    for split, s in sim["perplexity"].items():
        r = real["perplexity"][split]
        gaps = [a - b for a, b in zip(r["window_nll_mean"], s["window_nll_mean"])]
        rows[split] = {"simulated_ppl": s["token_ppl"], "lmdeploy_ppl": r["token_ppl"],
                       "relative_gap": relative_gap(r["token_ppl"], s["token_ppl"]),
                       "window_nll_gap_max_abs": max(abs(g) for g in gaps), "windows": s["windows"], "seqlen": s["seqlen"]}
    env = real["environment"]
    rec = {"benchmark": NAME, "command": command, "rows": rows, "simulated": sim, "lmdeploy": real}
    write_json_atomic(out / f"{NAME}.json", rec)
    lines = [f"Exported AWQ checkpoint ({' '.join(sim['overrides'])}), token PPL on the same windows: harness simulation "
             f"(dequantized, fp32, CPU) vs LMDeploy {env.get('lmdeploy')} {real['engine']} engine real W4A16 kernels "
             f"(fp16, {env.get('gpu')}, driver {env.get('driver')}, torch {env.get('torch')}).\n",
             "| split | windows x seqlen | simulated PPL | LMDeploy PPL | relative gap | max per-window NLL gap |",
             "|---|---|---|---|---|---|"]
    for split, r in rows.items():
        lines.append(f"| {split} | {r['windows']} x {r['seqlen']} | {r['simulated_ppl']:.3f} | {r['lmdeploy_ppl']:.3f} | "
                     f"{100 * r['relative_gap']:+.2f}% | {r['window_nll_gap_max_abs']:.4f} |")
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rec


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="simulated vs LMDeploy token PPL of one exported AWQ checkpoint")
    ap.add_argument("step", choices=["export", "gpu", "compare"])
    ap.add_argument("--dir", default=".device/ppl")
    ap.add_argument("--parts", default=None, help="gpu: where the checkpoint parts are (default DIR/parts)")
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--gpu-json", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    d = Path(a.dir)
    if a.step == "export":
        export(d, [*DEFAULT_OVERRIDES, *a.overrides])
    elif a.step == "gpu":
        gpu(d, Path(a.out), Path(a.parts) if a.parts else None)
    else:
        compare(d, Path(a.gpu_json), Path(a.out), "python -m benchmarks.lmdeploy_ppl " + " ".join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
