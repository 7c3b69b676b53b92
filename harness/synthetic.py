"""Synthetic checkpoints: random weights at a real architecture's shape, for throughput and memory only.

Weights of Llama-2-7B or InternLM2 cannot be downloaded on these machines, but an engine's speed and memory depend
on the shapes and the storage format, not on the values. The shapes are data (harness/arch/<name>.json holds the
released config.json); its family in the architecture registry (harness.architectures) names every tensor. The writer
makes an fp16 Hugging Face checkpoint, or an AWQ checkpoint in AutoAWQ's GEMM format with random int4 codes, on
whatever device it is given (on the GPU machine a 7B checkpoint takes seconds to generate).

Every such checkpoint carries `synthetic.json`; every result made from one says `synthetic`, and quality metrics
(perplexity, fidelity, tasks) are refused for it: random weights have no quality to measure.

    python -m experiments.synthetic model=llama2_7b_synthetic quant=awq quant.group_size=128 --root /data/synth
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from harness import architectures, storage_bytes
from harness.architectures import FAMILIES, TensorSpec
from harness.config import ConfigError, RunConfig

ARCH_DIR = Path(__file__).resolve().parent / "arch"
PREFIX = "synthetic:"
MARKER = "synthetic.json"
COMPLETE = ".complete"
SHARD_BYTES = 2 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")
NOTE = "synthetic: random weights at a real architecture's shape; throughput and memory only, never quality"


ROUTED_EXPERT = ".experts."  # in a tensor's name: a routed expert's (a shared expert is ".shared_expert.")


def is_routed_expert(t: TensorSpec) -> bool:
    return t.kind == "linear" and ROUTED_EXPERT in t.name


class SyntheticWeightsError(ConfigError):
    """A quality metric was asked of random weights."""


# ----------------------------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    name: str
    layout: str
    hf_config: dict
    source: str
    remote_code: tuple[str, ...] = ()

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

    @property
    def num_kv_heads(self) -> int:
        c = self.hf_config
        return c.get("num_key_value_heads") or c["num_attention_heads"]

    @property
    def num_layers(self) -> int:
        return self.hf_config["num_hidden_layers"]

    def tensors(self) -> list[TensorSpec]:
        return FAMILIES.get(self.layout).tensors(self.hf_config)


def load_arch(name: str, **overrides) -> Arch:
    """harness/arch/<name>.json; `overrides` replace config fields (tests use small shapes)."""
    path = ARCH_DIR / f"{name}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in ARCH_DIR.glob("*.json")))
        raise KeyError(f"unknown synthetic architecture {name!r}; known: {known}")
    d = json.loads(path.read_text())
    cfg = {**d["hf_config"], **overrides}
    return Arch(d["name"], d["layout"], cfg, d["source"], tuple(d.get("remote_code", ())))


def arch_name(model_path: str) -> Optional[str]:
    """'synthetic:llama2-7b' -> 'llama2-7b'; anything else -> None."""
    return model_path[len(PREFIX):] if model_path.startswith(PREFIX) else None


# ----------------------------------------------------------------------------------------------- formats and bytes


@dataclass(frozen=True)
class WeightFormat:
    """fp16, or AWQ GEMM (AutoAWQ's WQLinear_GEMM: int4 codes packed 8 to an int32, asymmetric, per group)."""

    name: str = "fp16"  # fp16 | awq
    w_bit: int = 4
    group_size: int = 128

    @property
    def label(self) -> str:
        return "fp16" if self.name == "fp16" else f"awq-w{self.w_bit}g{self.group_size}"


def weight_format(cfg: RunConfig) -> WeightFormat:
    """quant.method fp16 -> fp16; any other method -> AWQ GEMM storage at quant.w_bit / quant.group_size (the codes
    are random, so which method would have chosen them does not matter)."""
    if cfg.quant.method == "fp16":
        return WeightFormat("fp16")
    if cfg.quant.w_bit != 4:
        raise ValueError(f"quant.w_bit: synthetic AWQ checkpoints are 4-bit (LMDeploy's AWQ kernels), got {cfg.quant.w_bit}")
    if cfg.quant.group_size == -1:
        raise ValueError("quant.group_size: AWQ GEMM storage needs a group size, got -1")
    return WeightFormat("awq", cfg.quant.w_bit, cfg.quant.group_size)


def awq_shapes(out_features: int, in_features: int, fmt: WeightFormat) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """AutoAWQ GEMM tensors of one linear layer: qweight [in, out/8] int32, qzeros [in/g, out/8] int32,
    scales [in/g, out] fp16 (the transpose of nn.Linear's weight)."""
    pack = 32 // fmt.w_bit
    if out_features % pack or in_features % fmt.group_size:
        raise ValueError(f"AWQ GEMM needs out_features % {pack} == 0 and in_features % group_size == 0, "
                         f"got out={out_features}, in={in_features}, group_size={fmt.group_size}")
    groups = in_features // fmt.group_size
    return {"qweight": ((in_features, out_features // pack), torch.int32),
            "qzeros": ((groups, out_features // pack), torch.int32),
            "scales": ((groups, out_features), torch.float16)}


def weight_bytes(arch: Arch, fmt: WeightFormat) -> dict:
    """Bytes of each kind of tensor as stored (the LM head and embeddings stay fp16, as AutoAWQ keeps them)."""
    out = {"linear": 0, "kept_linear": 0, "embedding": 0, "lm_head": 0, "norm": 0}
    routed = 0  # of "linear", an MoE's routed experts (a decode step reads those its tokens route to)
    for t in arch.tensors():  # kept_linear: a linear left in the model dtype (an MoE's router)
        if t.kind == "linear" and fmt.name == "awq":
            awq_shapes(*t.shape, fmt)  # checks the shape fits the format
            nbytes = storage_bytes.awq_linear_bytes(*t.shape, fmt.w_bit, fmt.group_size)
        else:
            nbytes = math.prod(t.shape) * storage_bytes.FP16_BYTES
        out[t.kind] += nbytes
        routed += nbytes if is_routed_expert(t) else 0
    out["total"] = sum(out.values())
    out["routed_expert"] = routed
    # what one decode step reads: every linear (an MoE's every expert: an upper bound at batch 1) and the LM head
    # (the tied embedding when there is no LM head), the norms; of the embedding only one row per sequence, left out
    head = out["lm_head"] if out["lm_head"] else out["embedding"]
    out["decode_read"] = out["linear"] + out["kept_linear"] + head + out["norm"]
    return out


def parameter_count(arch: Arch) -> dict:
    n = architectures.parameter_count(FAMILIES.get(arch.layout), arch.hf_config)
    n["routed_expert"] = sum(math.prod(t.shape) for t in arch.tensors() if is_routed_expert(t))
    return n


# ----------------------------------------------------------------------------------------------- writing


GENERATOR = "per-tensor-sha256-v1"  # how values follow from the seed (synthetic.json's "generator")


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: from (checkpoint seed, tensor name), and the name holds the block index
    (model.layers.<i>.mlp.up_proj), so any block's tensors can be made alone, in any order, equal to the file's."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def spec_tensors(t: TensorSpec, fmt: WeightFormat, device: str, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors of one TensorSpec, each drawn from its own generator (tensor_seed). Values chosen so that
    activations stay finite through every layer in fp16 (std 0.02, the usual init), which keeps the engine's sampling
    well defined; their meaning is nil. The same device gives the same values (CPU and CUDA generators differ)."""
    def gen(name):
        g = torch.Generator(device=device)
        g.manual_seed(tensor_seed(seed, name))
        return g

    if t.kind == "norm":
        yield t.name, torch.ones(t.shape, dtype=torch.float16, device=device)
    elif t.kind == "linear" and fmt.name == "awq":
        shapes = awq_shapes(*t.shape, fmt)
        for part in ("qweight", "qzeros"):
            # every 32-bit pattern is 8 valid int4 codes
            name = f"{t.name}.{part}"
            yield name, torch.randint(-2**31, 2**31 - 1, shapes[part][0], generator=gen(name), dtype=torch.int32,
                                      device=device)
        # codes and zeros uniform on 0..15: (q - z) has std ~6.5, so this scale gives weights of std ~0.02
        name = f"{t.name}.scales"
        yield name, torch.empty(shapes["scales"][0], dtype=torch.float16, device=device).uniform_(
            0.002, 0.004, generator=gen(name))
    else:
        name = t.name if t.name.endswith(".weight") else t.name + ".weight"
        yield name, torch.randn(t.shape, dtype=torch.float16, device=device, generator=gen(name)).mul_(0.02)


def _random_tensors(arch: Arch, fmt: WeightFormat, device: str, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    for t in arch.tensors():
        yield from spec_tensors(t, fmt, device, seed)


def block_specs(arch: Arch) -> tuple[list[TensorSpec], list[list[TensorSpec]]]:
    """The TensorSpecs outside the decoder blocks (embedding, final norm, LM head) and those of each block, in order."""
    prefix = FAMILIES.get(arch.layout).blocks + "."
    outside: list[TensorSpec] = []
    blocks: list[list[TensorSpec]] = [[] for _ in range(arch.num_layers)]
    for t in arch.tensors():
        if t.name.startswith(prefix):
            blocks[int(t.name[len(prefix):].split(".", 1)[0])].append(t)
        else:
            outside.append(t)
    return outside, blocks


def block_tensors(arch: Arch, index: int, *, device: str = "cpu", seed: int = 0,
                  fmt: WeightFormat = WeightFormat()) -> dict[str, torch.Tensor]:
    """Decoder block `index`'s tensors (full names), made alone from the seed: equal to those write_checkpoint puts
    in the file (same device), so a shape larger than the disk can be quantized without a file (quant.streaming)."""
    return {n: v for t in block_specs(arch)[1][index] for n, v in spec_tensors(t, fmt, device, seed)}


def outside_tensors(arch: Arch, *, device: str = "cpu", seed: int = 0,
                    fmt: WeightFormat = WeightFormat()) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder blocks (embedding, final norm, LM head), as block_tensors makes a block's."""
    return {n: v for t in block_specs(arch)[0] for n, v in spec_tensors(t, fmt, device, seed)}


def _hf_config(arch: Arch, fmt: WeightFormat) -> dict:
    c = dict(arch.hf_config)
    c["torch_dtype"] = "float16"
    if fmt.name == "awq":
        # AutoAWQ's quantization_config, which transformers and LMDeploy (model_format='awq') read
        c["quantization_config"] = {"quant_method": "awq", "bits": fmt.w_bit, "group_size": fmt.group_size,
                                    "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    return c


class CheckpointLayoutError(ConfigError):
    """The architecture's checkpoints name tensors otherwise than its transformers model does."""


def check_writable(arch: Arch) -> None:
    """Refuse, before anything is written, an architecture whose released checkpoints use other tensor names than the
    model (transformers renames them at load, e.g. Mixtral's block_sparse_moe.experts.N.w1): this writer names
    tensors as the model does, so transformers and LMDeploy would not read them (the experts would load random)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamed = [c for c in get_checkpoint_conversion_mapping(arch.hf_config.get("model_type")) or []
               if isinstance(c, WeightRenaming)]
    if renamed:
        raise CheckpointLayoutError(
            f"model.path: synthetic:{arch.name} cannot be written as a checkpoint file: its checkpoints name tensors "
            f"otherwise than the model ({', '.join(map(str, renamed[0].source_patterns))} renamed at load), and this "
            f"writer uses the model's names, which transformers and LMDeploy would not read. Generate its blocks from "
            f"the seed instead (model.stream=true, or the *_stream_synthetic benchmark variants)")


def write_checkpoint(arch: Arch, out_dir: Path, fmt: WeightFormat, *, device: str = "cpu", seed: int = 0,
                     tokenizer_dir: Optional[Path] = None) -> Path:
    """Write a safetensors checkpoint (sharded, with an index) plus config.json, tokenizer files and synthetic.json."""
    from safetensors.torch import save_file

    check_writable(arch)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in _random_tensors(arch, fmt, device, seed):
        nb = tensor.numel() * tensor.element_size()
        if size + nb > SHARD_BYTES and shards[-1]:
            _flush(shards, out_dir, save_file)
            shards.append({})
            size = 0
        shards[-1][name] = tensor.cpu()
        size += nb
    _flush(shards, out_dir, save_file)
    n = len(shards)
    weight_map, total = {}, 0
    for i in range(n):
        src = out_dir / f"tmp-{i:05d}.safetensors"
        dst = out_dir / (f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
        src.rename(dst)
        total += dst.stat().st_size
        for k in _safetensors_keys(dst):
            weight_map[k] = dst.name
    if n > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out_dir / "config.json").write_text(json.dumps(_hf_config(arch, fmt), indent=2))
    for f in arch.remote_code:
        shutil.copy(ARCH_DIR / f, out_dir / f)
    tok_vocab = copy_tokenizer(tokenizer_dir, out_dir) if tokenizer_dir else None
    c = arch.hf_config
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": c.get("bos_token_id"), "eos_token_id": c.get("eos_token_id"), "do_sample": False}))
    marker = {"synthetic": True, "note": NOTE, "arch": arch.name, "arch_source": arch.source, "format": fmt.label,
              "w_bit": fmt.w_bit if fmt.name == "awq" else 16, "group_size": fmt.group_size if fmt.name == "awq" else None,
              "seed": seed, "generator": GENERATOR, "generated_on": torch.device(device).type,
              "weight_bytes": weight_bytes(arch, fmt), "parameters": parameter_count(arch),
              "file_bytes": total, "tokenizer_source": str(tokenizer_dir) if tokenizer_dir else None,
              "tokenizer_vocab": tok_vocab, "write_s": round(time.perf_counter() - t0, 2)}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2))
    (out_dir / COMPLETE).write_text("ok\n")
    return out_dir


def _flush(shards, out_dir: Path, save_file) -> None:
    i = len(shards) - 1
    save_file(shards[i], str(out_dir / f"tmp-{i:05d}.safetensors"), metadata={"format": "pt"})
    shards[i] = {}


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def copy_tokenizer(src: Path, dst: Path) -> int:
    """Copy a tokenizer's files; return its vocabulary size (token ids it can produce)."""
    src = Path(src)
    copied = [f for f in TOKENIZER_FILES if (src / f).exists()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src} (looked for {', '.join(TOKENIZER_FILES)})")
    for f in copied:
        shutil.copy(src / f, dst / f)
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(dst)))


# ----------------------------------------------------------------------------------------------- from a RunConfig


def default_root() -> Path:
    """Where synthetic checkpoints go unless --synthetic-root says otherwise: inside the project's own cache, not a
    shared folder such as /tmp, where another user could plant a checkpoint (and code) that a run would load."""
    from harness.assets import cache_dir

    return cache_dir() / "synthetic"


def default_tokenizer_dir() -> Optional[Path]:
    """The embedded SmolLM2 tokenizer when its converted checkpoint is in the cache (never downloads)."""
    from harness.assets import cache_dir

    d = cache_dir() / "models" / "smollm2-135m-instruct-fp16"
    return d if (d / "tokenizer.json").exists() else None


def checkpoint_dirname(arch: Arch, fmt: WeightFormat, seed: int) -> str:
    return f"{arch.name}-{fmt.label}-seed{seed}"


def materialize(cfg: RunConfig, root: Path, tokenizer_dir: Optional[Path] = None, device: Optional[str] = None) -> Path:
    """The synthetic checkpoint a config names (model.path synthetic:<arch>, quant.* for the format), written under
    `root` unless a complete one is there already."""
    name = arch_name(cfg.model.path)
    if name is None or cfg.model.weights != "random":
        raise ValueError(f"model.path {cfg.model.path!r} with model.weights {cfg.model.weights!r} is not synthetic "
                         f"(needs path {PREFIX}<arch> and weights: random)")
    arch, fmt = load_arch(name), weight_format(cfg)
    check_writable(arch)  # a file of this architecture, written earlier or now, would not load as its weights
    out = Path(root) / checkpoint_dirname(arch, fmt, cfg.seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (out / COMPLETE).exists():  # (one written before GENERATOR holds other random values: same shapes, same use)
        if code_is_ours(arch, out):
            return out
        print(f"[synthetic] warning: {out} holds Python files other than the repository's own "
              f"({', '.join(arch.remote_code) or 'none'}); writing it again", file=sys.stderr, flush=True)
    tokenizer_dir = tokenizer_dir or default_tokenizer_dir()
    print(f"[synthetic] writing {out.name} on {device} ...", file=sys.stderr, flush=True)
    write_checkpoint(arch, out, fmt, device=device, seed=cfg.seed, tokenizer_dir=tokenizer_dir)
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def code_is_ours(arch: Arch, model_dir: Path) -> bool:
    """The checkpoint's Python files (what trust_remote_code would run) are exactly the repository's copies."""
    found = {p.name: p.read_bytes() for p in Path(model_dir).glob("*.py")}
    return found == {f: (ARCH_DIR / f).read_bytes() for f in arch.remote_code}


def read_marker(model_dir) -> Optional[dict]:
    p = Path(model_dir) / MARKER
    return json.loads(p.read_text()) if p.exists() else None


def is_synthetic(model_dir) -> bool:
    return read_marker(model_dir) is not None


def check_tokenizer_fits(model_dir) -> None:
    """Free text is only safe when every id the tokenizer makes has an embedding row."""
    m = read_marker(model_dir)
    if m is None or m.get("tokenizer_vocab") is None:
        return
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    if m["tokenizer_vocab"] > vocab:
        raise ValueError(f"{model_dir}: the tokenizer makes ids up to {m['tokenizer_vocab'] - 1} but the model has "
                         f"{vocab} embedding rows; use token ids below {vocab} (the benchmark does) or an "
                         f"architecture whose vocabulary fits the tokenizer (synthetic:smollm2-135m)")


# ----------------------------------------------------------------------------------------------- random token ids

RANDOM_IDS = "random-token-ids"  # what a random-weights run's windows are made of (the record's data_sha256)


def random_token_ids(n: int, seqlen: int, vocab_size: int, seed: int) -> torch.Tensor:
    """[n, seqlen] token ids drawn uniformly below `vocab_size` (seeded): what random weights are fed. Their values
    change no timing or memory, they need no tokenizer, and every id has an embedding row (the embedded SmolLM2
    tokenizer beside a Llama-2-shaped checkpoint makes ids past its 32,000 rows)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seqlen), generator=g)


def random_calibration(calib, vocab_size: int):
    """harness.data.calibration_provider's (get, state) for random weights: `calib.n_samples` x `calib.seqlen` random
    token ids (seed `calib.seed`), drawn once on the first call."""
    state = {}

    def get():
        if calib is None:
            raise ValueError("this quantization method's config has no calib section, yet it asked for calibration")
        if "samples" not in state:
            state["samples"] = random_token_ids(calib.n_samples, calib.seqlen, vocab_size, calib.seed)
        return state["samples"]

    return get, state


def random_calibration_identity(calib, vocab_size: int) -> dict:
    """What random calibration samples are made of, for cache keys (harness.data.calibration_identity's part)."""
    return {"text_sha256": RANDOM_IDS, "vocab_size": vocab_size, "n_samples": calib.n_samples,
            "seqlen": calib.seqlen, "seed": calib.seed}


def quality_metrics_enabled(cfg: RunConfig) -> list[str]:
    e = cfg.eval
    names = [("eval.perplexity", e.perplexity.enabled), ("eval.word_perplexity", e.word_perplexity.enabled),
             ("eval.fidelity", e.fidelity.enabled), ("eval.tasks", e.tasks.enabled)]
    return [n for n, on in names if on]


def without_quality_metrics(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """For random weights: a copy of `cfg` with every quality evaluator switched off, and their names (so a
    quantize-only run on a synthetic checkpoint goes on, saying what it left out); other configs unchanged."""
    on = quality_metrics_enabled(cfg) if cfg.model.weights == "random" else []
    if not on:
        return cfg, []
    import copy

    out = copy.deepcopy(cfg)
    for name in on:
        getattr(out.eval, name.split(".", 1)[1]).enabled = False
    return out, on


def refuse_quality_metrics(cfg: RunConfig) -> None:
    """Random weights have no quality: refuse any quality metric on them, before any work."""
    if cfg.model.weights != "random":
        return
    on = quality_metrics_enabled(cfg)
    if on:
        raise SyntheticWeightsError(
            f"model.weights: random ({cfg.model.path}) is synthetic and measures throughput and memory only; "
            f"disable {', '.join(n + '.enabled' for n in on)}")
