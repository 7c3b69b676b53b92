"""Decode rooflines: the fastest a memory-bound step can run is the bytes it must read over HBM bandwidth.

One decode step of a batch of B sequences reads every weight it multiplies once (all linear layers and the LM head;
one embedding row per sequence, negligible) and, for each sequence, the K and V of every token in its context. So

    bytes_per_step = weight_read_bytes + B * context_len * kv_bytes_per_token
    roofline_tok_s = B * hbm_bandwidth / bytes_per_step

Prefill is bound by arithmetic instead: 2 FLOPs per weight per token. Pure functions of numbers; no GPU needed.

Tensor parallelism (tp GPUs, LMDeploy's `tp`): every GPU runs every step on its shard, in parallel, so the floors
above hold per GPU, with one GPU's bandwidth (and FLOP rate) and the bytes that GPU reads (`per_gpu`): its 1/tp of
the sharded linears and of the KV heads, plus the weights every rank holds whole (in LMDeploy's PyTorch Llama the LM
head and the norms are replicated, as is the embedding table, which a step reads one row of). Without replicated
weights that is the whole model over tp x the bandwidth; the all-reduces between the GPUs are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness import storage_bytes

# Vendor datasheet figures (dense, no sparsity), looked up by a substring of torch.cuda.get_device_name().
# The first match wins, so more specific names come first.
HBM_BANDWIDTH_BYTES_S = {
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,  # H100 SXM5 80GB HBM3
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
}
PEAK_FP16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def lookup(table: dict, gpu_name: str) -> float | None:
    for key, value in table.items():
        if key in gpu_name:
            return value
    return None


@dataclass(frozen=True)
class ModelBytes:
    """What one decode step must read: weights (already in their storage format) and KV per token of context."""

    weight_read_bytes: int
    kv_bytes_per_token: int
    matmul_params: int  # weights that take part in a matrix product (for the prefill FLOP count)
    # of the above, what every tensor-parallel rank holds and reads whole (LM head, norms); 0: everything is sharded
    replicated_read_bytes: int = 0
    replicated_matmul_params: int = 0
    # a mixture of experts: of the above, the routed experts' bytes and weights (sharded like the linears), of which a
    # step reads only the experts its tokens route to; `experts` per layer, `experts_per_token` (top-k); 0: dense
    routed_expert_read_bytes: int = 0
    routed_expert_params: int = 0
    experts: int = 0
    experts_per_token: int = 0


def active_expert_fraction(experts: int, experts_per_token: int, tokens: float) -> float:
    """Expected share of a layer's routed experts that `tokens` tokens route to, each choosing `experts_per_token`
    distinct experts of `experts` uniformly and independently: 1 - (1 - k/E)^tokens (k/E for one token; towards 1 as
    the batch grows). Uniform routing is an assumption (a trained router is uneven, which reads fewer experts)."""
    if experts <= 0:
        return 1.0
    if not 0 < experts_per_token <= experts:
        raise ValueError(f"experts_per_token must be in 1..{experts}, got {experts_per_token}")
    return 1.0 - (1.0 - experts_per_token / experts) ** tokens


def weight_read_bytes(mb: ModelBytes, tokens: float) -> float:
    """Weight bytes one forward of `tokens` tokens reads: everything but the experts none of them routes to."""
    unread = mb.routed_expert_read_bytes * (1.0 - active_expert_fraction(mb.experts, mb.experts_per_token, tokens))
    return mb.weight_read_bytes - unread


def active_matmul_params(mb: ModelBytes) -> float:
    """Weights one token multiplies: the dense ones and its experts_per_token of each layer's routed experts."""
    if not mb.experts:
        return mb.matmul_params
    return mb.matmul_params - mb.routed_expert_params * (1.0 - mb.experts_per_token / mb.experts)


def kv_heads_per_gpu(num_kv_heads: int, tp: int) -> int:
    """KV heads one of `tp` GPUs stores: an even split, or one (replicated) when there are fewer heads than GPUs."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise ValueError(f"{num_kv_heads} KV heads do not split evenly over tp={tp} GPUs")
        return num_kv_heads // tp
    if tp % num_kv_heads:
        raise ValueError(f"tp={tp} is not a multiple of {num_kv_heads} KV heads")
    return 1


def per_gpu(mb: ModelBytes, tp: int, kv_bytes_per_token: int | None = None) -> ModelBytes:
    """What one of `tp` tensor-parallel GPUs reads per step: its 1/tp of the sharded weights plus the replicated ones,
    and the KV bytes per token of the heads it stores (`kv_bytes_per_token`; default the model's over tp)."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if tp == 1:
        return mb
    sharded = mb.weight_read_bytes - mb.replicated_read_bytes
    sharded_params = mb.matmul_params - mb.replicated_matmul_params
    if sharded < 0 or sharded_params < 0:
        raise ValueError("replicated bytes/params exceed the totals")
    return ModelBytes(weight_read_bytes=sharded // tp + mb.replicated_read_bytes,
                      kv_bytes_per_token=mb.kv_bytes_per_token // tp if kv_bytes_per_token is None else kv_bytes_per_token,
                      matmul_params=sharded_params // tp + mb.replicated_matmul_params,
                      replicated_read_bytes=mb.replicated_read_bytes,
                      replicated_matmul_params=mb.replicated_matmul_params,
                      routed_expert_read_bytes=mb.routed_expert_read_bytes // tp,
                      routed_expert_params=mb.routed_expert_params // tp, experts=mb.experts,
                      experts_per_token=mb.experts_per_token)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_bits: int, dtype_bytes: int = 2) -> int:
    """K and V of one token across all layers, as LMDeploy's PyTorch engine stores them (harness.storage_bytes): K and
    V as uint8 (two int4 values a byte for 4), plus a scale and a zero point per token, per head, for K and for V,
    in the model dtype (lmdeploy/pytorch/engine/cache_engine/schema.py: build_quant_cache_descs)."""
    if kv_bits == 16 and dtype_bytes != 2:
        raise ValueError("16-bit KV is stored in a 2-byte dtype")
    return storage_bytes.kv_bytes_per_token(num_layers, num_kv_heads, head_dim, kv_bits, 2 * dtype_bytes)


def decode_bytes_per_step(mb: ModelBytes, batch: int, context_len: float) -> float:
    """Weights (of an MoE, the experts the batch's tokens route to) plus every sequence's KV."""
    return weight_read_bytes(mb, batch) + batch * context_len * mb.kv_bytes_per_token


def decode_roofline_tok_s(mb: ModelBytes, batch: int, context_len: float, bandwidth_bytes_s: float) -> float:
    """Output tokens per second over the whole batch if every step ran at HBM bandwidth."""
    return batch * bandwidth_bytes_s / decode_bytes_per_step(mb, batch, context_len)


def step_time_floor_s(mb: ModelBytes, batch: int, context_len: float, bandwidth_bytes_s: float) -> float:
    """The per-token latency floor of each sequence in the batch (one step emits one token per sequence)."""
    return decode_bytes_per_step(mb, batch, context_len) / bandwidth_bytes_s


def mean_decode_context(prompt_len: int, gen_len: int) -> float:
    """Context length averaged over the gen_len - 1 decode steps that follow the prefill (which emits token 1):
    step j (1..gen_len-1) attends to prompt_len + j tokens."""
    if gen_len <= 1:
        return float(prompt_len)
    return prompt_len + gen_len / 2


def prefill_floor_s(mb: ModelBytes, tokens: int, peak_flops: float, bandwidth_bytes_s: float) -> float:
    """Time-to-first-token floor for `tokens` prompt tokens processed together: the larger of the matmul FLOPs over
    peak rate and the weight read over bandwidth (attention FLOPs are small at these lengths and are left out)."""
    return max(2.0 * active_matmul_params(mb) * tokens / peak_flops, weight_read_bytes(mb, tokens) / bandwidth_bytes_s)


def kv_capacity_tokens(free_bytes: float, cache_share: float, kv_per_token: int) -> int:
    """Tokens of KV that fit in `cache_share` of the free GPU memory left after the weights (LMDeploy's
    cache_max_entry_count: a share of free memory, not of the total). An upper bound: the engine also reserves
    runtime buffers before it takes its share, and allocates whole blocks."""
    return int(free_bytes * cache_share // kv_per_token)


def _find(module, name: str):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def decode_model_bytes(model):
    """What one decode step reads, as ModelBytes: the parameters and buffers of whatever modules
    sit at the decoder's projections and the LM head (packed int4 codes, scales, ... as they are), and K/V per
    token of context in the model dtype. matmul_params counts the unquantized shapes (prefill FLOPs).
    Feed it to decode_roofline_tok_s."""
    from harness.architectures import architecture_for, config_dims, parameter_count

    arch = architecture_for(model)
    blocks = model.get_submodule(arch.blocks)
    from eval.static_decode import FUSED  # projections fused for the decode loop count as what replaced them

    names = list(arch.linears) + list(FUSED)
    weights = sum(_module_bytes(m) for block in blocks for n in names
                  if (m := _find(block, n)) is not None)
    weights += _module_bytes(model.get_submodule(arch.lm_head))
    cfg = model.config.to_dict()
    d = config_dims(cfg)
    dtype_bytes = model.get_submodule(arch.embedding).weight.element_size()
    kv_16bit = kv_bytes_per_token(d["layers"], d["nkv"], d["hd"], kv_bits=16)
    return ModelBytes(weight_read_bytes=weights, kv_bytes_per_token=kv_16bit * dtype_bytes // 2,
                      matmul_params=parameter_count(arch, cfg)["matmul"])
