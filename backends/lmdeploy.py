"""RunConfig -> LMDeploy: engine choice, engine config, pipeline, `lmdeploy serve api_server` command line.

The translation (`engine_kwargs`, `api_server_command`) is pure and tested on the CPU; lmdeploy is imported only
where an engine is built. Field mapping (LMDeploy 0.18 names):

    backend.cache_max_entry_count -> cache_max_entry_count  (share of *free* GPU memory for the KV cache)
    backend.session_len / max_batch_size / tp -> session_len / max_batch_size / tp
    kv.bits 16 / 8 / 4            -> quant_policy 0 / 8 / 4  (per-token, per-head asymmetric int8 / int4 K and V)
    kv.format fp8_e4m3 / fp8_e5m2 -> quant_policy 16 / 17    (K and V cast to fp8, scalar scale 1.0; PyTorch engine only)
    an AWQ checkpoint             -> model_format='awq', dtype float16 (LMDeploy's AWQ kernels compute in fp16)
    model.dtype                   -> dtype

TurboMind is used when `lmdeploy.turbomind` imports with its native module (`engine: auto`); otherwise the PyTorch
engine. On the H100 test machine TurboMind cannot load (its extension links CUDA 12; the image has CUDA 13).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from backends import BACKENDS
from harness import exposure
from harness.config import ConfigError, RunConfig
from harness.registry import Registry

QUANT_POLICY = {16: 0, 8: 8, 4: 4}
FP8_QUANT_POLICY = {"fp8_e4m3": 16, "fp8_e5m2": 17}  # lmdeploy/messages.py QuantPolicy.FP8 / FP8_E5M2
ENGINE_DTYPE = {"bfloat16": "bfloat16", "float16": "float16", "float32": "auto"}  # fp32: LMDeploy runs fp16


def quant_policy(kv_bits: int, kv_format: str = "int") -> int:
    if kv_format != "int":
        if kv_format not in FP8_QUANT_POLICY or kv_bits != 8:
            raise ConfigError(f"kv.format: {kv_format} at kv.bits={kv_bits} has no LMDeploy quant_policy; allowed: "
                              f"{', '.join(FP8_QUANT_POLICY)} at kv.bits=8")
        return FP8_QUANT_POLICY[kv_format]
    try:
        return QUANT_POLICY[kv_bits]
    except KeyError:
        raise ConfigError(f"kv.bits: {kv_bits} has no LMDeploy quant_policy; allowed: 16, 8, 4") from None


CHECKPOINT_FORMATS = ("awq", "smooth_quant")  # what the harness writes (quant.export) for the engine in a run
COMPRESSED_TENSORS = "compressed-tensors"  # also served, from a checkpoint directory (model.path), in one scheme:
LOADED_FORMATS = CHECKPOINT_FORMATS + (COMPRESSED_TENSORS,)
# LMDeploy 0.18's PyTorch engine reads compressed-tensors W4A16 in one shape only, Kimi-K2's: pack-quantized int4,
# group 32, symmetric, one scheme for every Linear (lmdeploy/pytorch/config.py _parse_compressed_tensors_config);
# routed experts only, every dense Linear in `ignore` (nn/linear has no compressed-tensors branch and raises; its MoE
# kernel is the only W4A16 path for experts: nn/moe raises for awq); weight_scale bf16 and weight_shape int32
# (nn/moe/compressed_tensors.py _PART_DTYPES: the compressed-tensors package itself writes int64 shapes); and only in
# models that name each layer for the dispatch (get_quant_method raises on an empty prefix): models/qwen3_moe.py
# does, mixtral.py does not.
CT_SCHEME = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 32, "strategy": "group", "dynamic": False}
CT_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
CT_PART_DTYPES = {"weight_packed": "I32", "weight_scale": "BF16", "weight_shape": "I32"}  # safetensors dtype names
CT_HINT = ("the harness's compressed-tensors export follows the compressed-tensors package (fp16 scales, int64 "
           "shapes), which LMDeploy 0.18 does not read: serve a dense model's AWQ export instead (LMDeploy 0.18 has no "
           "AWQ kernel for routed experts), or evaluate with backend=hf")


def _ct_tensor_problems(model_dir) -> list[str]:
    """From the safetensors headers alone (no tensor read): dense Linears quantized, parts in other dtypes."""
    from safetensors import safe_open

    from harness.synthetic import ROUTED_EXPERT

    dense, dtypes = set(), {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                module, _, part = key.rpartition(".")
                if part not in CT_PART_DTYPES:
                    continue
                if part == "weight_packed" and ROUTED_EXPERT not in module:
                    dense.add(module)
                dtypes.setdefault(part, st.get_slice(key).get_dtype())
    out = []
    if dense:
        out.append(f"{len(dense)} dense Linears quantized (e.g. {min(dense)}): LMDeploy 0.18 quantizes routed experts "
                   f"only, every other Linear must be in `ignore`")
    out += [f"{part} stored {got} (needs {CT_PART_DTYPES[part]})" for part, got in sorted(dtypes.items())
            if got != CT_PART_DTYPES[part]]
    return out


def compressed_tensors_problems(config: dict, model_dir) -> list[str]:
    """Why LMDeploy 0.18's engine would not serve this compressed-tensors checkpoint (its config.json `config`, and
    the names and dtypes of the tensors in `model_dir`); empty: it would."""
    q = config.get("quantization_config") or {}
    out = []
    if q.get("format") != "pack-quantized" or q.get("quantization_status") != "compressed":
        out.append(f"format {q.get('format')!r} ({q.get('quantization_status')}), not packed int codes "
                   f"('pack-quantized', compressed)")
    groups = q.get("config_groups") or {}
    group = groups.get("group_0") or {}
    if set(groups) != {"group_0"} or group.get("targets") != ["Linear"]:
        out.append(f"{len(groups)} schemes ({', '.join(groups) or 'none'}), not one for every Linear")
    if group.get("input_activations") is not None or group.get("output_activations") is not None:
        out.append("activations are quantized (W4A16 only)")
    w = group.get("weights") or {}
    bad = [f"{k} {w.get(k)!r} (needs {v!r})" for k, v in CT_SCHEME.items() if w.get(k) != v]
    if bad:
        out.append("weights " + ", ".join(bad))
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in CT_ARCHITECTURES:
        out.append(f"architecture {arch} (LMDeploy 0.18 serves it for {', '.join(CT_ARCHITECTURES)} only: other "
                   f"models do not name their layers for the dispatch)")
    return out + _ct_tensor_problems(model_dir)


def checkpoint_format(model_dir) -> Optional[str]:
    """'awq' for an AutoAWQ-format checkpoint, 'smooth_quant' for LMDeploy's W8A8 layout, 'compressed-tensors' for
    the one compressed-tensors scheme LMDeploy's engine serves (quantization_config's quant_method), else None (plain
    HF). A quantized checkpoint the engine would not serve is refused here, before an engine starts."""
    p = Path(model_dir) / "config.json"
    if not p.exists():
        return None
    config = json.loads(p.read_text())
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method is None:
        return None
    if method not in LOADED_FORMATS:
        raise ConfigError(f"model.path: {model_dir} is quantized with {method!r}; this harness serves "
                          f"{', '.join(LOADED_FORMATS)} or unquantized")
    problems = compressed_tensors_problems(config, model_dir) if method == COMPRESSED_TENSORS else []
    if problems:
        raise ConfigError(f"model.path: {model_dir} is a compressed-tensors checkpoint LMDeploy 0.18's engine does "
                          f"not serve: {'; '.join(problems)}; {CT_HINT}")
    return method


def turbomind_unavailable_reason(importer: Callable[[str], object] = None) -> Optional[str]:
    """None when TurboMind can run here, else why not."""
    import importlib

    importer = importer or importlib.import_module
    try:
        tm = importer("lmdeploy.turbomind")
    except Exception as e:  # ImportError, OSError from a missing libcudart.so.12, ...
        return f"lmdeploy.turbomind does not import ({type(e).__name__}: {e})"
    is_available = getattr(tm, "is_available", None)
    if is_available is not None and not is_available():
        return f"lmdeploy.turbomind has no native module ({getattr(tm, '_import_error', 'not built')})"
    return None


def choose_engine(cfg: RunConfig, importer: Callable[[str], object] = None) -> tuple[str, Optional[str]]:
    """(engine, why TurboMind was not used or None)."""
    want = cfg.backend.engine
    if want == "pytorch":
        return "pytorch", "backend.engine=pytorch"
    reason = turbomind_unavailable_reason(importer)
    if reason is None:
        return "turbomind", None
    if want == "turbomind":
        raise ConfigError(f"backend.engine: turbomind was asked for but {reason}; use backend.engine=auto or pytorch")
    return "pytorch", reason


def engine_kwargs(cfg: RunConfig, model_dir, engine: str) -> dict:
    """Keyword arguments of PytorchEngineConfig / TurbomindEngineConfig for this run."""
    b = cfg.backend
    if engine not in ENGINES:
        raise ConfigError(f"backend.engine: {engine!r} is not one of {', '.join(ENGINES.names())}")
    if engine == "pytorch" and not b.cache_max_entry_count < 1.0:
        # PytorchEngineConfig asserts 0 < cache_max_entry_count < 1
        raise ConfigError("backend.cache_max_entry_count: LMDeploy's PyTorch engine needs a share below 1.0")
    if engine == "turbomind" and cfg.kv.format != "int":  # messages.py TurbomindEngineConfig asserts against FP8
        raise ConfigError(f"kv.format: {cfg.kv.format} runs on LMDeploy's PyTorch engine only; set backend.engine=pytorch")
    fmt = checkpoint_format(model_dir)
    kw = {
        "dtype": "float16" if fmt in CHECKPOINT_FORMATS else ENGINE_DTYPE[cfg.model.dtype],
        "tp": b.tp,
        "session_len": b.session_len,
        "max_batch_size": b.max_batch_size,
        "cache_max_entry_count": b.cache_max_entry_count,
        "quant_policy": quant_policy(cfg.kv.bits, cfg.kv.format),
    }
    if fmt == "awq":  # a smooth_quant checkpoint is recognised by its config.json alone (PyTorch engine)
        kw["model_format"] = fmt
    return kw


ENGINES: Registry[str] = Registry("LMDeploy engine (backend.engine)")
ENGINES.add("pytorch", "PytorchEngineConfig")
ENGINES.add("turbomind", "TurbomindEngineConfig")


# NVLink multicast stays off wherever several GPUs talk (NCCL, PyTorch symmetric memory, NVSHMEM): on shared hosts a
# program using it can take the GPUs out of service. Set in this process before the engine spawns its workers, and
# in the environment of every server started from here.
MULTI_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def engine_env(cfg: RunConfig, base: Optional[dict] = None) -> dict:
    """The environment an engine or server runs with: `base` (default os.environ) plus MULTI_GPU_ENV when tp > 1."""
    import os

    env = dict(os.environ if base is None else base)
    if cfg.backend.tp > 1:
        env.update(MULTI_GPU_ENV)
    return env


def build_engine_config(cfg: RunConfig, model_dir, importer: Callable[[str], object] = None):
    """(engine config object, engine name, fallback reason)."""
    import importlib

    engine, reason = choose_engine(cfg, importer)
    lmdeploy = (importer or importlib.import_module)("lmdeploy")
    return getattr(lmdeploy, ENGINES.get(engine))(**engine_kwargs(cfg, model_dir, engine)), engine, reason


def make_pipeline(cfg: RunConfig, model_dir, log_level: str = "WARNING"):
    """An lmdeploy.pipeline for this run. Call it under `if __name__ == '__main__':` (the engine spawns workers)."""
    import lmdeploy

    if cfg.backend.name != "lmdeploy":
        raise ConfigError(f"backend.name: {cfg.backend.name!r}; LMDeploy runs need backend=lmdeploy")
    engine_cfg, engine, reason = build_engine_config(cfg, model_dir)
    if cfg.backend.w4a16_kernel != "engine":
        if engine != "pytorch":
            raise ConfigError(f"backend.w4a16_kernel: {cfg.backend.w4a16_kernel} replaces the PyTorch engine's W4A16 "
                              f"linear; this run chose {engine} — set backend.engine=pytorch")
    from backends import lmdeploy_w4a16

    lmdeploy_w4a16.install(cfg.backend.w4a16_kernel)  # `engine` puts LMDeploy's own builder back
    import os

    os.environ.update({k: v for k, v in engine_env(cfg, {}).items()})  # inherited by the engine's workers
    if reason and engine == "pytorch":
        print(f"[lmdeploy] PyTorch engine ({reason})", file=sys.stderr, flush=True)
    pipe = lmdeploy.pipeline(str(model_dir), backend_config=engine_cfg, log_level=log_level,
                             trust_remote_code=cfg.model.trust_remote_code)
    return pipe, engine, reason


def api_server_command(cfg: RunConfig, model_dir, host: str = "127.0.0.1", port: int = 23333,
                       engine: str = "pytorch", python: str = sys.executable,
                       api_keys: Optional[Sequence[str]] = None) -> list[str]:
    """`lmdeploy serve api_server` for this run, through `python -m lmdeploy` (works where LMDeploy is only on
    PYTHONPATH, with no console script). `api_keys`: None = $QH_API_KEYS (harness.exposure); a non-loopback host
    without a key is refused. The command holds the keys: print or record it only through exposure.redact."""
    keys = exposure.check_server_keys(host, exposure.api_keys() if api_keys is None else api_keys)
    kw = engine_kwargs(cfg, model_dir, engine)
    cmd = [python, "-m", "lmdeploy", "serve", "api_server", str(model_dir),
           "--backend", engine, "--server-name", host, "--server-port", str(port),
           "--cache-max-entry-count", str(kw["cache_max_entry_count"]),
           "--quant-policy", str(kw["quant_policy"]),
           "--max-batch-size", str(kw["max_batch_size"]),
           "--tp", str(kw["tp"]),
           "--dtype", kw["dtype"]]
    if kw["session_len"] is not None:
        cmd += ["--session-len", str(kw["session_len"])]
    if "model_format" in kw:
        cmd += ["--model-format", kw["model_format"]]
    if cfg.model.trust_remote_code:
        cmd += ["--trust-remote-code"]
    if keys:
        cmd += ["--api-keys", *keys]
    return cmd


def resolve_model_dir(cfg: RunConfig, synthetic_root=None, tokenizer_dir=None) -> Path:
    """The directory LMDeploy loads: a synthetic checkpoint written on demand, or what harness.models resolves
    (embedded model, local directory, hub id)."""
    from harness import synthetic

    if synthetic.arch_name(cfg.model.path) is not None:
        return synthetic.materialize(cfg, Path(synthetic_root) if synthetic_root else synthetic.default_root(),
                                     Path(tokenizer_dir) if tokenizer_dir else None)
    from harness.models import resolve_model

    return Path(resolve_model(cfg.model).directory)


# ----------------------------------------------------------------------------------------------- engine readings


def _first(obj, paths: list[str]):
    for path in paths:
        cur = obj
        try:
            for part in path.split("."):
                cur = getattr(cur, part)
        except AttributeError:
            continue
        if cur is not None:
            return cur
    return None


def kv_cache_stats(pipe) -> dict:
    """KV blocks the engine allocated and the tokens they hold (PyTorch engine: cache_config after init)."""
    cc = _first(pipe, ["async_engine.engine.cache_config", "async_engine.engine.executor.cache_config"])
    if cc is None:
        return {}
    blocks, block = getattr(cc, "num_gpu_blocks", None), getattr(cc, "block_size", None)
    out = {"num_gpu_blocks": blocks, "block_size": block,
           "reserved_blocks": getattr(cc, "num_reserved_gpu_blocks", 0)}
    if blocks and block:
        out["capacity_tokens"] = int(blocks * block)
    return out


def engine_model(pipe):
    """The torch module the PyTorch engine runs (uni executor), or None where it lives in another process."""
    m = _first(pipe, ["async_engine.engine.executor.model_agent.patched_model"])
    if m is not None and hasattr(m, "get_model"):
        m = m.get_model()
    return m


def module_bytes(module) -> dict:
    """Bytes of the distinct GPU tensors a module holds: parameters (the weights) and buffers apart."""
    if module is None or not hasattr(module, "parameters"):
        return {}
    seen, out = set(), {"parameters": 0, "buffers": 0}
    for kind, tensors in (("parameters", module.parameters()), ("buffers", module.buffers())):
        for t in tensors:
            if not t.is_cuda or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            out[kind] += t.untyped_storage().nbytes()
    return out


# ----------------------------------------------------------------------------------------------- backend=lmdeploy


def ppl_from_window_means(ce: list[float]) -> float:
    """Windows of equal length: the token mean is the mean of the window means (what `Pipeline.get_ppl` returns)."""
    import math

    return math.exp(sum(ce) / len(ce))


def engine_logits(pipe, input_ids: list[list[int]]) -> list:
    """Every position's logits [len, vocab] of each sequence, from the engine (`Pipeline.get_logits` where the
    installed LMDeploy has it; 0.18 has only the async engine's `async_get_logits`, which its own get_ppl used)."""
    get = getattr(pipe, "get_logits", None)
    if get is not None:
        return list(get(input_ids))
    return list(pipe._run(coro=pipe.async_engine.async_get_logits(input_ids=input_ids)).result())


def engine_q_chunks(pipe):
    """eval.fidelity.compare_logits's source of the compared model's logits: one engine call per batch of windows,
    positions 0..T-2 of each (the last position predicts past the window)."""
    import torch

    def q_chunks(ids):
        logits = engine_logits(pipe, ids.tolist())
        T = ids.shape[1]
        yield slice(0, T - 1), torch.stack([torch.as_tensor(x)[: T - 1] for x in logits])

    return q_chunks


class LMDeployBackend:
    """Perplexity and fidelity through LMDeploy's real kernels: the run's weights exported (FP16 as loaded;
    quantized weights as an AWQ GEMM checkpoint, quant/export/awq.py), loaded by the engine from the run's config,
    scored with `Pipeline.get_ppl` on the same windows the hf backend scores; fidelity compares the engine's logits
    (`get_logits`) with the FP16 reference the hf backend uses (eval/fidelity.py, computed before the engine starts)."""

    SUPPORTED_EVALUATORS = ("perplexity", "fidelity")

    def preflight(self, cfg: RunConfig, cuda_available: Optional[bool] = None, find_spec=None) -> None:
        import importlib.util

        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise ConfigError("backend.name: 'lmdeploy' runs LMDeploy's engine, which needs a CUDA GPU, and this "
                              "machine has none; use backend=hf here (transformers on the CPU), or run on a GPU machine")
        if (find_spec or importlib.util.find_spec)("lmdeploy") is None:
            raise ConfigError("backend.name: 'lmdeploy' needs the lmdeploy package: pip install -e .[lmdeploy]")
        if cfg.quant.method != "fp16":  # the engine reads a checkpoint: the method must have a format it loads
            from quant.export import format_for

            format_for(cfg.quant, CHECKPOINT_FORMATS)
        extra = [n for n in ("word_perplexity", "tasks", "throughput")
                 if getattr(getattr(cfg.eval, n, None), "enabled", False)]
        if extra:
            raise ConfigError(f"eval: backend=lmdeploy evaluates {', '.join(self.SUPPORTED_EVALUATORS)} only; "
                              f"{', '.join(f'eval.{n}.enabled' for n in extra)} must be false (use eval=ppl)")

    def evaluate(self, ctx, log) -> dict:
        import tempfile
        import time

        import torch

        cfg = ctx.cfg
        timings = {}
        refs = None
        if cfg.eval.fidelity.enabled:  # the FP16 reference (cached, or computed now by transformers on this GPU)
            from eval.fidelity import references

            t = time.perf_counter()
            refs = references(ctx)
            timings["eval.fidelity_reference"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory(prefix="lmdeploy-run-") as tmp:
            t = time.perf_counter()
            # the engine takes its share of *free* GPU memory; and the export reads the weights beside their codes,
            # which rest in host memory after a block-by-block quantization (quant/onload.py)
            from quant.onload import qtensors_to_host

            ctx.model.to("cpu")
            qtensors_to_host(ctx.qtensors)  # codes on the GPU too (offload=false): beside the weights
            torch.cuda.empty_cache()
            if ctx.qtensors:  # the method's checkpoint format (quant.export.FORMATS)
                from quant.export import format_for

                fmt = format_for(cfg.quant, CHECKPOINT_FORMATS)
                model_dir = fmt.export(ctx.model, ctx.qtensors, Path(tmp) / fmt.name, tokenizer=ctx.tokenizer)
            else:
                model_dir = resolve_model_dir(cfg)
            timings["export"] = time.perf_counter() - t
            t = time.perf_counter()
            pipe, engine, reason = make_pipeline(cfg, model_dir)
            timings["engine_start"] = time.perf_counter() - t
            result = {}
            try:
                if cfg.eval.perplexity.enabled:
                    t = time.perf_counter()
                    for split, w in ctx.windows.items():
                        ce = [float(x) for x in pipe.get_ppl(w.tolist())]
                        result[split] = {"token_ppl": ppl_from_window_means(ce), "window_nll_mean": ce,
                                         "windows": int(w.shape[0]), "seqlen": int(w.shape[1])}
                        log(f"perplexity ({engine} engine): {split} {result[split]['token_ppl']:.4g}")
                    timings["eval.perplexity"] = time.perf_counter() - t
                    ctx.results["perplexity"] = result
                if refs is not None:
                    from eval.fidelity import compare_logits

                    t = time.perf_counter()
                    fid = {}
                    for split, (w, hidden, key, hit) in refs["splits"].items():
                        res = compare_logits(engine_q_chunks(pipe), w, hidden, refs["head"],
                                             cfg.eval.perplexity.batch_size, "cuda", ctx.progress, f"fidelity {split}")
                        fid[split] = {**res, "reference": {"key": key, "cached": hit,
                                                           "split_sha": ctx.split_sha.get(split)}}
                        log(f"fidelity ({engine} engine): {split} KL {res['kl_mean']:.4g}, "
                            f"top-1 {res['top1_agreement']:.4f}")
                    timings["eval.fidelity"] = time.perf_counter() - t
                    ctx.results["fidelity"] = fid
                ctx.results["backend"] = {"engine": engine, "engine_fallback_reason": reason,
                                          "engine_kwargs": {k: str(v) for k, v in engine_kwargs(cfg, model_dir, engine).items()}}
            finally:
                pipe.close()
        return timings


BACKENDS.add("lmdeploy", LMDeployBackend())
