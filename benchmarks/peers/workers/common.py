"""What every peer worker shares (run in the peers' own environment: this file imports only torch, transformers and
safetensors, never the harness).

A worker is `python <worker>.py spec.json`. The spec (written by benchmarks.peers.spec) names the model directory, the
calibration token ids (a .pt file and its sha256), the setting (bits, group size, format), the peer's own knobs and the
output directory. The worker writes there
  state.safetensors  every tensor of the model's own state dict (tied lm_head left out), the peer's fake-quantized
                     (quantize-dequantize) weights in the model's dtype;
  result.json        written last, only on success: versions, the peer's settings as it ran them, patches, seconds.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "auto-round", "llmcompressor", "compressed-tensors",
            "datasets")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_spec() -> dict:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} spec.json")
    return json.loads(Path(sys.argv[1]).read_text())


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    import datasets  # the real package, or the stub the benchmark puts on the path where it is not installed

    if getattr(datasets, "IS_STUB", False):
        out["datasets"] = "stub (not installed; calibration fed as token ids, no dataset code runs)"
    return out


def calibration_ids(spec: dict) -> torch.Tensor:
    """The benchmark's calibration token ids [n_samples, seqlen], checked against the sha256 the spec names."""
    path = Path(spec["tokens"])
    got = sha256_file(path)
    if got != spec["tokens_sha256"]:
        sys.exit(f"{path}: sha256 {got} is not the spec's {spec['tokens_sha256']}")
    ids = torch.load(path, weights_only=True)
    want = (spec["n_samples"], spec["seqlen"])
    if tuple(ids.shape) != want:
        sys.exit(f"{path}: shape {tuple(ids.shape)}, the spec says {want}")
    return ids


def load_model(spec: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=DTYPES[spec["dtype"]])
    model.to(spec["device"]).eval()
    return model, AutoTokenizer.from_pretrained(spec["model_dir"])


def own_state_keys(model) -> list[str]:
    """The model's state-dict keys before the peer adds its own (scales, zero points), tied lm_head left out."""
    keys = list(model.state_dict().keys())
    if getattr(model.config, "tie_word_embeddings", False):
        keys = [k for k in keys if k != "lm_head.weight"]
    return keys


def write_outputs(out_dir: Path, state: dict, result: dict) -> None:
    """state.safetensors, then result.json (its presence marks success)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "state.safetensors"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path))
    result = {**result, "state_sha256": sha256_file(path), "versions": versions(), "python": sys.version.split()[0],
              "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads()}
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out_dir / "result.json")


class Timer:
    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
