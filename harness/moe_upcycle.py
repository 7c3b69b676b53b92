"""A small real mixture of experts, built here offline: a dense Llama checkpoint "upcycled" into Mixtral's layout
(sparse upcycling, Komatsuzaki et al. 2023): every MLP becomes `n_experts` copies of itself, each perturbed by a
seeded Gaussian noise (`noise` times the matrix's own std), behind a seeded random router with top-k routing.

Top-k weights are renormalised (Mixtral), so with near-identical experts every token's MLP output stays close to the
dense model's: the quality is near the source model's, while the routing is a random projection of the hidden state,
uneven across experts (the post-attention hidden states have a mean direction, which favours some experts). Not a
released model: its identity is the source weights' plus every parameter of the build, and its labels say "built".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BUILDER_VERSION = 1  # bump when the construction changes: it is part of the identity
BUILT_SHA_PREFIX = "built-sha256:"  # a model_sha of weights built here (identity), not downloaded
BUILT_LABEL = "built here, not a released model"  # how every label of such a model says so
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")


@dataclass(frozen=True)
class UpcycleSpec:
    n_experts: int = 4
    top_k: int = 2
    noise: float = 0.01  # each expert's weights: W + noise * std(W) * N(0, 1), seeded per (layer, expert, matrix)
    router_std: float = 0.05  # router weights ~ N(0, router_std^2): logits of a few units on RMS-normed inputs
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"upcycle: top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if self.noise < 0 or self.router_std <= 0:
            raise ValueError(f"upcycle: noise={self.noise} must be >= 0 and router_std={self.router_std} > 0")


def identity(source_sha: str, spec: UpcycleSpec) -> str:
    """The built model's weights identity: the source's, the build's parameters and seed, the builder's version."""
    blob = json.dumps({"source": source_sha, "spec": asdict(spec), "builder": BUILDER_VERSION}, sort_keys=True)
    return BUILT_SHA_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_built(model_sha: str | None) -> bool:
    """Whether a record's model_sha names weights built here (identity) rather than a released checkpoint."""
    return isinstance(model_sha, str) and model_sha.startswith(BUILT_SHA_PREFIX)


def mixtral_config(dense: dict, spec: UpcycleSpec) -> dict:
    """The Mixtral config.json of a Llama config.json with its MLP made a mixture of `spec.n_experts` experts."""
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "vocab_size",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
    if dense.get("attention_bias") or dense.get("mlp_bias"):
        raise ValueError("upcycle: a Llama with biases has no Mixtral counterpart (Mixtral's Linears have none)")
    c = {k: dense[k] for k in keep if k in dense}
    c.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=spec.n_experts,
             num_experts_per_tok=spec.top_k, sliding_window=None, router_jitter_noise=0.0,
             output_router_logits=False, dtype=dense.get("dtype") or dense.get("torch_dtype") or "float16")
    return c


@torch.no_grad()
def upcycle_state(dense_sd: dict[str, torch.Tensor], n_layers: int, spec: UpcycleSpec,
                  hidden: int) -> dict[str, torch.Tensor]:
    """Mixtral tensors (transformers 5 names: mlp.gate.weight, mlp.experts.gate_up_proj / down_proj) from a Llama
    state dict. Noise and router are drawn from one generator seeded by spec.seed, in a fixed order."""
    g = torch.Generator().manual_seed(spec.seed)
    out = {k: v for k, v in dense_sd.items() if ".mlp." not in k}

    def noisy(w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        return w + spec.noise * w.std() * torch.randn(w.shape, generator=g)

    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (dense_sd[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        experts = [(noisy(gate), noisy(up), noisy(down)) for _ in range(spec.n_experts)]
        dtype = gate.dtype
        out[p + "experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b, _ in experts]).to(dtype)
        out[p + "experts.down_proj"] = torch.stack([c for _, _, c in experts]).to(dtype)
        out[p + "gate.weight"] = (spec.router_std * torch.randn(spec.n_experts, hidden, generator=g)).to(dtype)
    return out


def build(source_dir: Path, out_dir: Path, spec: UpcycleSpec, source_sha: str) -> Path:
    """Write the upcycled checkpoint (config.json, model.safetensors, the tokenizer's files, upcycle.json) to
    out_dir, atomically (built in a sibling directory, then renamed); an existing complete build is reused."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    spec.validate()
    if (out_dir / "upcycle.json").exists():
        return out_dir
    dense = json.loads((source_dir / "config.json").read_text())
    if dense.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"upcycle: source model_type {dense.get('model_type')!r}; a Llama-layout model is needed")
    cfg = mixtral_config(dense, spec)
    sd = load_file(str(source_dir / "model.safetensors"))
    state = upcycle_state(sd, cfg["num_hidden_layers"], spec, cfg["hidden_size"])
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg["dtype"]]
    model = MixtralForCausalLM(MixtralConfig(**cfg)).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"upcycle: tensors missing {missing[:4]} / unexpected {unexpected[:4]}")
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in TOKENIZER_FILES:
        if (source_dir / f).exists():
            shutil.copy2(source_dir / f, tmp / f)
    (tmp / "upcycle.json").write_text(json.dumps({"source": str(source_dir), "source_sha": source_sha,
                                                  "spec": asdict(spec), "builder": BUILDER_VERSION,
                                                  "identity": identity(source_sha, spec)}, indent=1))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished the same build first: its result is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
