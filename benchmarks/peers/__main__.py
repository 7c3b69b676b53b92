"""The peer benchmark: harness rows (conf/quant presets) and peer rows (auto-round, llm-compressor, each in its own
environment through a worker) at each setting, on one set of calibration tokens and evaluation windows, every row
scored by eval/perplexity.py on the weights it produced.

    python -m benchmarks.peers --quick                         # every row, tiny setting -> peers_quick.json
    python -m benchmarks.peers [--rows rtn_w4,llmc_gptq,...] [--settings w4g64,w3g64,nvfp4] [--device cuda]
        [--peer-python .venv-peers/bin/python] [--peer-path DIR] [--resume]

Writes results/benchmarks/peers/peers.json (quick: peers_quick.json) and the .md beside it after every cell, so a run
that dies keeps what it finished; --resume keeps the finished cells of a file made with the same protocol, model,
tokens, windows and machine (and refuses another's). Every peer is checked to import before any long work.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import add_threads_arg, apply_threads, write_result
from benchmarks.peers.readback import ReadBackError, load_into, read_result, read_state
from benchmarks.peers.rows import (DEFAULT_ROWS, PEERS, SETTINGS, PeerRow, Protocol, Setting, harness_overrides,
                                   peer_spec, worker_command, worker_env)
from benchmarks.peers.table import markdown

OUT_DIR = Path("results/benchmarks/peers")
RTN_ROW = "rtn_w4"  # the harness's RTN: each setting's gap is measured against its gap
HARNESS_AUTOROUND, PACKAGE_AUTOROUND = "autoround_w4", "autoround_pkg"  # compared in each setting's summary
PEER_PYTHON = ".venv-peers/bin/python"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8x128 calibration, 4 eval windows, 2 AutoRound steps")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated: conf/quant preset names and peers ({', '.join(PEERS)})")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-samples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--eval-windows", type=int)
    ap.add_argument("--iters", type=int, help="AutoRound steps per block, the harness's and the package's")
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="the interpreter of the peers' environment")
    ap.add_argument("--peer-path", action="append", default=[], help="extra PYTHONPATH for the peers (repeatable)")
    ap.add_argument("--peer-timeout", type=int, default=3 * 3600, help="seconds per peer run")
    ap.add_argument("--work-dir", default=None, help="the hand-over files (default: results/.tmp_peers)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--results-dir", default=None,
                    help="the harness rows' pipeline records go to <dir>/runs/ (default: results; quick: the work dir)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="rewrite the summary and the .md of --out; run nothing")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    if "/" in args.peer_python:  # workers run in their own directory: a relative interpreter path is the caller's
        args.peer_python = str(Path(args.peer_python).absolute())
    given = {k: v for k, v in {"n_samples": args.n_samples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
                               "iters": args.iters}.items() if v is not None}
    protocol = (Protocol.quick_run if args.quick else Protocol)(device=args.device, **given)
    rows, settings = args.rows.split(","), args.settings.split(",")
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        ap.error(f"--settings: unknown {bad} (known: {', '.join(SETTINGS)})")
    from harness.compose import options

    presets = options("quant")
    bad = [r for r in rows if r not in PEERS and r not in presets]
    if bad:
        ap.error(f"--rows: {bad} are neither peers ({', '.join(PEERS)}) nor conf/quant presets")
    out = Path(args.out) if args.out else OUT_DIR / ("peers_quick.json" if args.quick else "peers.json")
    return args, protocol, rows, [SETTINGS[s] for s in settings], out


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


# ----- preflight: the peers import, before any long work -----

def preflight(python: str, path: list[str], modules: set[tuple[str, str]]) -> tuple[bool, dict, dict]:
    """(stub datasets?, {tool: version}, {tool: reason it cannot run}) for the peers' interpreter."""
    def probe(code: str, stub: bool) -> subprocess.CompletedProcess | str:
        try:
            return subprocess.run([python, "-c", code], env=worker_env(path, stub), capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{python}: {type(e).__name__}: {e} (make the peers' environment: docs/benchmarks.md)"

    first = probe("import datasets", False)
    if isinstance(first, str):
        return False, {}, {tool: first for tool, _ in modules}
    stub = first.returncode != 0
    versions, problems = {}, {}
    for tool, module in sorted(modules):
        r = probe(f"import {module}, importlib.metadata as m; print(m.version({tool!r}))", stub)
        if isinstance(r, str):
            problems[tool] = r
        elif r.returncode:
            problems[tool] = f"import {module} failed: {tail(r.stderr)}"
        else:
            versions[tool] = r.stdout.strip().splitlines()[-1]
    return stub, versions, problems


def tail(text: str, n: int = 3, chars: int = 500) -> str:
    """A failed process's reason: its last exception line (`SomeError: ...`) where there is one, else its last lines
    (progress bars left out)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and "%|" not in ln]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    return (errors[-1] if errors else " | ".join(lines[-n:]))[-chars:]


# ----- the data every row shares -----

@dataclasses.dataclass
class Shared:
    base: torch.nn.Module  # FP16 model on the protocol's device; never modified
    windows: torch.Tensor
    samples: torch.Tensor  # [n_samples, seqlen] calibration token ids
    model_dir: str
    model_sha: str
    origin: str
    calibration_identity: dict | None = None  # harness.data.calibration_identity: what the pipeline's rows draw from


def load_shared(protocol: Protocol) -> Shared:
    from harness.config import CalibConfig, ModelConfig
    from harness.data import (bos_token_id, calibration_identity, calibration_samples, eval_windows, load_text,
                              tokenize_cached)
    from harness.models import load_model, load_tokenizer, resolve_model

    mc = ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct", dtype=protocol.dtype,
                     device=protocol.device)
    resolved = resolve_model(mc)
    tok = load_tokenizer(resolved, mc)
    bos = bos_token_id(tok)  # the harness's convention (SmolLM2: none), for windows and calibration alike
    windows = eval_windows(tokenize_cached(tok, load_text(protocol.eval_split)), 512, protocol.eval_windows,
                           protocol.eval_split, bos)
    samples = calibration_samples(tokenize_cached(tok, load_text("shakespeare_calib")), protocol.n_samples,
                                  protocol.seqlen, 0, bos)
    calib_id = calibration_identity(CalibConfig(n_samples=protocol.n_samples, seqlen=protocol.seqlen), tok, bos)
    return Shared(load_model(resolved, mc), windows, samples, resolved.directory, resolved.model_sha, resolved.origin,
                  calib_id)


def score(model, windows: torch.Tensor, fp16: dict | None = None) -> dict:
    """The harness's token PPL on the windows (eval/perplexity.py), with the paired difference to FP16's."""
    from eval.perplexity import ppl_metrics, window_nll
    from harness.confidence import paired_ppl_diff

    nll, secs = window_nll(model, windows, 8, progress=False)
    m = ppl_metrics(nll, secs, windows.shape[1])
    out = {k: m[k] for k in ("token_ppl", "token_ppl_ci95", "window_nll_mean")} | {"eval_s": secs}
    if fp16 is not None:
        d = paired_ppl_diff(m["window_nll_mean"], fp16["window_nll_mean"])
        out["delta_fp16"] = None if d is None else {"estimate": d.estimate, "ci95": list(d.ci95)}
    return out


# ----- one cell: a row at a setting -----

def harness_config(preset: str, setting: Setting, protocol: Protocol):
    """The preset's config at the setting (harness.compose, as every entry point), or the harness's own reason it
    does not apply there (a ConfigError: e.g. AWQ at nvfp4)."""
    import quant  # noqa: F401  (registers every method's config)
    from harness.compose import compose
    from harness.config import ConfigError

    try:
        q = compose(harness_overrides(preset, setting, protocol)).quant
        fields = {f.name for f in dataclasses.fields(q)}
        return compose(harness_overrides(preset, setting, protocol, fields)).quant, None
    except ConfigError as e:
        return None, str(e)


def run_harness(q, shared: Shared, protocol: Protocol, fp16: dict, results_dir: str) -> dict:
    """The preset through the pipeline, as the quality benchmarks run their rows (benchmarks.common.quality_row:
    a record under results_dir/runs/, recomputed now), on the same windows and calibration samples (the pipeline
    draws them with the same function, text, seed and sizes: the JSON's calibration identity)."""
    from benchmarks.common import quality_config, quality_row
    from harness.confidence import paired_ppl_diff
    from harness.records import load_record, record_path

    cfg = quality_config(protocol.eval_split, protocol.eval_windows, quant=q, dtype=protocol.dtype,
                         results_dir=results_dir)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=protocol.device))
    row = quality_row(cfg)
    m = load_record(record_path(cfg))["metrics"]["perplexity"][protocol.eval_split]
    if m["windows"] != shared.windows.shape[0] or m["seqlen"] != shared.windows.shape[1]:
        raise RuntimeError(f"the pipeline scored {m['windows']}x{m['seqlen']}, the benchmark's windows are "
                           f"{tuple(shared.windows.shape)}")
    d = paired_ppl_diff(m["window_nll_mean"], fp16["window_nll_mean"])
    return {"status": "ok", **row, "token_ppl_ci95": m["token_ppl_ci95"], "window_nll_mean": m["window_nll_mean"],
            "delta_fp16": None if d is None else {"estimate": d.estimate, "ci95": list(d.ci95)}}


def run_peer(row: PeerRow, setting: Setting, protocol: Protocol, shared: Shared, tokens: Path, tokens_sha: str,
             work: Path, args, stub: bool, fp16: dict) -> dict:
    import shutil

    out_dir = (work / f"{row.name}-{setting.name}").resolve()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    spec = peer_spec(row, setting, protocol, shared.model_dir, tokens, tokens_sha, out_dir)
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    log = out_dir / "worker.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            rc = subprocess.run(worker_command(args.peer_python, row, out_dir / "spec.json"), cwd=out_dir,
                                env=worker_env(args.peer_path, stub), stdout=f, stderr=subprocess.STDOUT,
                                timeout=args.peer_timeout).returncode
    except subprocess.TimeoutExpired:
        return failed(f"the worker ran past --peer-timeout {args.peer_timeout} s", spec)
    wall = time.perf_counter() - t0
    if rc:
        return failed(f"worker exit {rc}: {tail(log.read_text(errors='replace'))}", spec, wall)
    try:
        result = read_result(out_dir)
        state, notes = read_state(out_dir, result, shared.base, setting)
        model = copy.deepcopy(shared.base)
        load_into(model, state)
    except ReadBackError as e:
        return failed(str(e), spec, wall)
    return {"status": "ok", "quantize_s": result["quantize_s"], "worker_wall_s": wall, "readback": notes,
            "peer": {k: v for k, v in result.items() if k != "quantize_s"}, "spec": spec,
            **score(model, shared.windows, fp16)}


def failed(reason: str, spec: dict | None = None, wall: float | None = None) -> dict:
    print(f"  FAILED: {reason}", flush=True)
    return {"status": "failed", "reason": reason, "worker_wall_s": wall, "spec": spec}


# ----- the result file -----

def identity(protocol: Protocol, shared: Shared, tokens_sha: str, machine: str) -> dict:
    """What must match for cells of two invocations to share a table."""
    return {"protocol": protocol.as_dict(), "model_sha": shared.model_sha, "tokens_sha256": tokens_sha,
            "windows_sha256": tensor_sha256(shared.windows), "machine": machine}


def finish(result: dict) -> dict:
    """Each cell's gap over the harness RTN's gap at its setting; whether every cell ran."""
    fp = result["fp16"]["token_ppl"]
    rtn = result["rows"].get(RTN_ROW, {}).get("cells", {})
    for row in result["rows"].values():
        for s, c in row["cells"].items():
            r = rtn.get(s)
            if c["status"] == "ok" and r and r["status"] == "ok" and r["token_ppl"] > fp:
                c["gap_over_rtn_gap"] = (c["token_ppl"] - fp) / (r["token_ppl"] - fp)
    result["complete"] = all(s in row["cells"] for row in result["rows"].values() for s in result["settings_run"])
    result["summary"] = {s: summary(result["rows"], s) for s in result["settings_run"]}
    return result


def summary(rows: dict, setting: str) -> dict:
    """The targets' comparisons at a setting (../shared TARGETS.md): the harness's best row against every peer's
    best, and the harness's AutoRound against the auto-round package (PPL and time)."""
    ok = {name: row["cells"][setting] for name, row in rows.items()
          if row["cells"].get(setting, {}).get("status") == "ok"}
    best = {}
    for side in ("harness", "peer"):
        names = [n for n in ok if (rows[n]["tool"] == "harness") == (side == "harness")]
        if names:
            n = min(names, key=lambda k: ok[k]["token_ppl"])
            best[side] = {"row": n, "token_ppl": ok[n]["token_ppl"], "gap_over_rtn_gap": ok[n].get("gap_over_rtn_gap")}
    out = {"best_harness": best.get("harness"), "best_peer": best.get("peer"),
           "harness_best_below_every_peer": (best["harness"]["token_ppl"] < best["peer"]["token_ppl"]
                                             if len(best) == 2 else None)}
    ours, theirs = ok.get(HARNESS_AUTOROUND), ok.get(PACKAGE_AUTOROUND)
    if ours and theirs:
        out["autoround_vs_package"] = {"ppl": [ours["token_ppl"], theirs["token_ppl"]],
                                       "quantize_s": [ours["quantize_s"], theirs["quantize_s"]],
                                       "ppl_le": ours["token_ppl"] <= theirs["token_ppl"],
                                       "time_le": ours["quantize_s"] <= theirs["quantize_s"]}
    return out


def save(result: dict, out: Path) -> None:
    write_result(out, finish(result))
    out.with_suffix(".md").write_text(markdown(result))


def main(argv=None) -> None:
    from harness.environment import machine_name
    from harness.records import provenance

    args, protocol, rows, settings, out = parse_args(argv)
    if args.table_only:
        save(json.loads(out.read_text()), out)
        print(out.with_suffix(".md").read_text())
        return
    apply_threads(args)
    peers = [PEERS[r] for r in rows if r in PEERS]
    stub, versions, problems = preflight(args.peer_python, args.peer_path, {(p.tool, p.module) for p in peers})
    for tool, why in problems.items():
        print(f"peer {tool} cannot run: {why}", flush=True)
    plan = {r: {s.name: harness_config(r, s, protocol) for s in settings} for r in rows if r not in PEERS}

    shared = load_shared(protocol)
    work = Path(args.work_dir or "results/.tmp_peers") / ("quick" if protocol.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    results_dir = args.results_dir or (str(work) if protocol.quick else "results")  # quick: not in results/runs
    tokens = (work / "calibration_ids.pt").resolve()
    torch.save(shared.samples.clone(), tokens)
    tokens_sha = hashlib.sha256(tokens.read_bytes()).hexdigest()
    machine = machine_name()
    ident = identity(protocol, shared, tensor_sha256(shared.samples), machine)

    fp16 = score(shared.base, shared.windows)
    print(f"fp16: PPL {fp16['token_ppl']:.2f}", flush=True)
    result = {"benchmark": "peers", "quick": protocol.quick, "identity": ident, "protocol": protocol.as_dict(),
              "model": {"sha": shared.model_sha, "origin": shared.origin, "directory_for_peers": shared.model_dir},
              "calibration": {"text": "shakespeare_calib", "sampling": "harness.data.calibration_samples, seed 0",
                              "identity": shared.calibration_identity,
                              "shape": list(shared.samples.shape), "ids_sha256": ident["tokens_sha256"],
                              "handed_to_peers_as": "torch.save of the [n_samples, seqlen] int64 tensor"},
              "eval": {"split": protocol.eval_split, "windows": int(shared.windows.shape[0]), "seqlen": 512,
                       "windows_sha256": ident["windows_sha256"], "scored_by": "eval.perplexity.window_nll"},
              "machine": machine, "settings": {s.name: dataclasses.asdict(s) for s in SETTINGS.values()},
              "settings_run": [s.name for s in settings],
              "peers": {"python": args.peer_python, "pythonpath": args.peer_path, "versions": versions,
                        "datasets_stub": stub, "unavailable": problems},
              "fp16": fp16, "rows": {}, "provenance": provenance()}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("identity") != ident:
            sys.exit(f"--resume: {out} was made with another protocol, model, tokens, windows or machine; move it "
                     f"away or run without --resume")
        result["rows"] = old["rows"]
        result["settings_run"] = list(dict.fromkeys(old["settings_run"] + result["settings_run"]))

    for s in settings:
        for r in rows:
            peer = PEERS.get(r)
            entry = result["rows"].setdefault(r, {"tool": peer.tool if peer else "harness",
                                                  "label": peer.label if peer else r, "cells": {}})
            if entry["cells"].get(s.name, {}).get("status") == "ok":
                continue
            print(f"{r} @ {s.name} ...", flush=True)
            t0 = time.perf_counter()
            if peer is None:
                q, why = plan[r][s.name]
                cell = ({"status": "not applicable", "reason": why} if q is None
                        else run_harness(q, shared, protocol, fp16, results_dir))
            elif peer.tool in problems:
                cell = failed(f"{peer.tool} does not import in {args.peer_python}: {problems[peer.tool]}")
            else:
                cell = run_peer(peer, s, protocol, shared, tokens, tokens_sha, work, args, stub, fp16)
            cell["machine"], cell["finished"] = machine, time.strftime("%Y-%m-%dT%H:%M:%S%z")
            entry["cells"][s.name] = cell
            if cell["status"] == "ok":
                print(f"  PPL {cell['token_ppl']:.2f}, quantize {cell['quantize_s']:.1f} s "
                      f"(cell {time.perf_counter() - t0:.0f} s)", flush=True)
            save(result, out)
    save(result, out)
    print(markdown(result))


if __name__ == "__main__":
    main()
