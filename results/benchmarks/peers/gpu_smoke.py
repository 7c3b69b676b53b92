"""The peers' path on the GPU machine without the embedded model (which travels separately): a tiny random Llama
with SmolLM2's tokenizer, random calibration ids, every peer row at w4 g64 and NVFP4 through the benchmark's own
preflight, worker hand-over, read-back checks and scoring (benchmarks/peers/__main__.py), on CUDA. It checks that the
wheels, the `datasets` stub and the workers run there; its PPLs mean nothing (random weights).

    python3 results/benchmarks/peers/gpu_smoke.py TOKENIZER_DIR OUT_JSON   # after on_gpu.sh's wheel installs
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from benchmarks.peers.__main__ import Shared, preflight, run_peer, score  # noqa: E402
from benchmarks.peers.rows import PEERS, SETTINGS, Protocol  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer")
    ap.add_argument("out")
    ap.add_argument("--peer-path", default="/tmp/peers")
    ap.add_argument("--settings", default="w4g64,nvfp4")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peer-python", default="python3")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path("/tmp/peers_smoke")
    shutil.rmtree(work, ignore_errors=True)
    model_dir = work / "model"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    for f in Path(args.tokenizer).iterdir():
        shutil.copy(f, model_dir)
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 49152, (16, 128), generator=g)
    shared = Shared(base, torch.randint(0, 49152, (4, 512), generator=g), samples, str(model_dir), "random", "tiny")
    protocol = Protocol(n_samples=16, seqlen=128, eval_windows=4, iters=4, awq_n_grid=4, device=args.device)  # peers fp32
    tokens = work / "ids.pt"
    torch.save(samples, tokens)
    import hashlib

    sha = hashlib.sha256(tokens.read_bytes()).hexdigest()
    stub, versions, problems = preflight(args.peer_python, [args.peer_path], {(p.tool, p.module) for p in PEERS.values()})
    out = {"stub_datasets": stub, "versions": versions, "problems": problems, "cells": {},
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    fp16 = score(base, shared.windows)
    ns = argparse.Namespace(peer_python=args.peer_python, peer_path=[args.peer_path], peer_timeout=300)
    for s in args.settings.split(","):
        for p in PEERS.values():
            t = time.perf_counter()
            c = run_peer(p, SETTINGS[s], protocol, shared, tokens, sha, work, ns, stub, fp16)
            out["cells"][f"{p.name}@{s}"] = {k: c.get(k) for k in ("status", "reason", "token_ppl", "quantize_s")}
            print(p.name, s, c["status"], c.get("reason", ""), f"{time.perf_counter() - t:.0f} s", flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
