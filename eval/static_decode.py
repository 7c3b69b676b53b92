"""Greedy decoding that shows the kernel, not the launcher: a static KV cache and one CUDA graph per decode step.

transformers' eager `generate` spends most of a small-batch decode step launching kernels from Python (GPU.md: 32
tok/s eager against 129 with CUDA graphs, Llama-2-7B shape, batch 1). Here a Llama-family decoder runs written out:

- the KV cache is preallocated, [layers][batch, kv_heads, max_len, head_dim] in the model dtype, and written in place
  at a position held in a device tensor; attention (`scaled_dot_product_attention`) covers the whole cache with a
  mask of the valid positions, so every step has the same shapes and no host-device sync;
- the decode step (one token per sequence: embed, blocks, final norm, LM head, argmax, write the next id and advance
  the position) is captured once as a `torch.cuda.CUDAGraph` and replayed (PyTorch's "CUDA Graphs" recipe: warm up
  on a side stream, capture, replay); on the CPU the same step runs eagerly. The prefill runs eagerly;
- projections (q/k/v/o, gate/up/down, LM head) are called as opaque modules, `module(x)`: int4 kernels replace them
  without this file reading a `.weight`. Norms are the model's own modules (their eps, their float32 upcast), RoPE
  the model's own rotary module, evaluated once over all positions into a cos/sin table.

All sequences of a batch share one prompt length (no padding). Supported: the Llama family of
harness/architectures.py (llama, mistral, qwen2, qwen3 with its per-head q/k norms); others raise NotImplementedError.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from harness.architectures import architecture_for, config_dims
from harness.registry import UnknownNameError

# RoPE types whose frequencies do not depend on the sequence length, so one table serves every position
# ("dynamic" and "longrope" rescale with the length seen, which a static graph cannot follow)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"static decode: {what}; supported: the Llama family (llama, mistral, qwen2, qwen3) "
                               f"with RoPE types {', '.join(STATIC_ROPE_TYPES)} and full attention")


def check_supported(model, max_len: int):
    """The model's Architecture, or NotImplementedError naming what this decoder cannot run."""
    cfg = model.config
    try:
        arch = architecture_for(model)
    except UnknownNameError:
        arch = None
    if arch is None or arch.family != "llama":
        raise _unsupported(f"model_type {cfg.model_type!r} is not supported")
    rotary = model.get_submodule(arch.blocks.rsplit(".", 1)[0] + ".rotary_emb")
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise _unsupported(f"{cfg.model_type} with rope_type {rope_type!r} is not supported")
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (layer_types is None or "sliding_attention" in layer_types) and window < max_len:
        raise _unsupported(f"{cfg.model_type} with sliding_window {window} < max_len {max_len} is not supported")
    return arch, rotary


# Few kernels per block, since under a CUDA graph each small one still costs ~1.5-2.5 us on an H100 (a Llama-2-7B
# step written with transformers' own norm modules and rotate_half ran ~36 of them per block, 2.2 of its 8.2 ms).

def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin`, rotate_half(x) = cat(-x2, x1), with the sign folded into
    the table: cat(x2, x1) * cat(-sin1, sin2), which rounds the same (a sign flip is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' Llama/Qwen/Mistral RMSNorm, `weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)` with x32 in
    float32 whatever the dtype, through the fused `F.rms_norm` (one kernel on CUDA); a norm module of another
    kind is called as it is."""
    eps, weight = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    if eps is None or weight is None:
        return norm(x)
    x32 = x if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.float()  # fused: float32 math
    return weight * F.rms_norm(x32, x.shape[-1:], eps=eps).to(x.dtype)


class StaticDecoder:
    """Greedy decoding of `batch_size` sequences of at most `max_len` tokens (prompt + generated) each.

    `prefill(input_ids [B, P]) -> next ids [B]` (device), `step() -> next ids [B]` (device; a buffer the next step
    overwrites), `generate(input_ids, gen_len) -> ids [B, gen_len]` (host). `logits` holds the last position's
    logits [B, vocab] after each call (a buffer too). use_cuda_graph: None = on when the model is on CUDA."""

    @torch.no_grad()
    def __init__(self, model, batch_size: int, max_len: int, use_cuda_graph: bool | None = None,
                 compile_step: bool = False):
        self.arch, rotary = check_supported(model, max_len)
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        d = config_dims(model.config.to_dict())
        self.n_heads, self.n_kv, self.head_dim = d["nh"], d["nkv"], d["hd"]
        self._qkv_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.blocks = list(model.get_submodule(self.arch.blocks))
        self.embed = model.get_submodule(self.arch.embedding)
        self.norm = model.get_submodule(self.arch.final_norm)
        self.lm_head = model.get_submodule(self.arch.lm_head)
        emb = self.embed.weight  # the embedding table (not a projection) fixes the device and the model dtype
        self.device, self.dtype = emb.device, emb.dtype
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        if use_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs a model on CUDA, this one is on {self.device}")
        self.use_cuda_graph, self._graph = use_cuda_graph, None
        # compile_step: the decode step through torch.compile (Inductor fuses the norms, RoPE, residual adds and
        # the attention's small ops that are left between the projections; the projections' own kernels are
        # called as they are), then recorded in the CUDA graph like the eager step
        self.compile_step = compile_step
        self._step_fn = torch.compile(self._decode_step, dynamic=False) if compile_step else self._decode_step
        shape = (batch_size, self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        positions = torch.arange(max_len, device=self.device)
        cos, sin = rotary(torch.zeros(1, dtype=self.dtype, device=self.device), positions[None])
        half = self.head_dim // 2  # [max_len, head_dim] as the model computes them per position; see _rope
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self._positions = positions
        # tokens[:, i] is the sequence's i-th token; the step reads tokens[:, pos] and writes tokens[:, pos + 1]
        self.tokens = torch.zeros(batch_size, max_len + 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # the position the next step feeds
        self._host_pos = None  # the same, known on the host without a sync (None: no prefill yet)
        self.next_ids = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.logits = None

    def _blocks(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """The decoder blocks over hidden states [B, T, H], cos/sin [T, 1, head_dim]; attend(layer, q, k, v, scale)
        with q [B, heads, T, head_dim], k/v [B, kv_heads, T, head_dim] writes the cache and attends."""
        b, t, _ = h.shape
        for i, block in enumerate(self.blocks):
            attn, mlp = block.self_attn, block.mlp
            x = _rms_norm(h, block.input_layernorm)
            if hasattr(attn, "qkv_proj"):  # fused (fuse_projections): one product for q, k and v
                q, k, v = attn.qkv_proj(x).split(self._qkv_sizes, dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(b, t, self.n_heads, self.head_dim)
            k = k.view(b, t, self.n_kv, self.head_dim)
            v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's vector, before RoPE
                q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
            # RoPE in the [B, T, heads, head_dim] layout, so that at T = 1 the transposes below are views
            q, k = _rope(q, cos, sin).transpose(1, 2), _rope(k, cos, sin).transpose(1, 2)
            o = attend(i, q, k, v, getattr(attn, "scaling", self.head_dim ** -0.5))  # [B, heads, T, head_dim]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
            x = _rms_norm(h, block.post_attention_layernorm)
            if hasattr(mlp, "gate_up_proj"):
                gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        return h

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(h_last, self.norm))[:, -1]  # [B, vocab]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, P] (equal lengths), fill cache positions 0..P-1; the next ids [B] on the device."""
        b, p = input_ids.shape
        if b != self.batch_size or not 0 < p <= self.max_len:
            raise ValueError(f"prompt shape {tuple(input_ids.shape)}: needs batch {self.batch_size} and "
                             f"a length of 1 to max_len={self.max_len}")
        input_ids = input_ids.to(self.device)
        self.capture()  # before the cache holds anything: the capture's warm-up writes it

        def attend(i, q, k, v, scale):
            self.k_cache[i][:, :, :p].copy_(k)
            self.v_cache[i][:, :, :p].copy_(v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        h = self._blocks(self.embed(input_ids), self.cos[:p, None], self.sin[:p, None], attend)
        self.logits = self._logits(h[:, -1:])
        self.next_ids.copy_(self.logits.argmax(-1))
        self.tokens[:, :p].copy_(input_ids)
        self.tokens[:, p].copy_(self.next_ids)
        self.pos.fill_(p)
        self._host_pos = p
        return self.next_ids

    def _decode_step(self) -> torch.Tensor:
        """One token per sequence at position `pos`, all on the device: what the CUDA graph records."""
        b, g = self.batch_size, self.n_heads // self.n_kv
        ids = self.tokens.index_select(1, self.pos)  # [B, 1]
        # additive mask of the valid positions, made once per step (SDPA would convert a boolean one per block)
        mask = torch.zeros(1, 1, 1, self.max_len, dtype=self.dtype, device=self.device)
        mask.masked_fill_(self._positions > self.pos, float("-inf"))

        def attend(i, q, k, v, scale):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc.index_copy_(2, self.pos, k)
            vc.index_copy_(2, self.pos, v)
            # grouped-query attention without repeating the cache: each KV head's `g` query heads become g query
            # rows (transformers' repeat_kv maps query head j to KV head j // g)
            o = F.scaled_dot_product_attention(q.reshape(b, self.n_kv, g, self.head_dim), kc, vc, attn_mask=mask,
                                               scale=scale)
            return o.reshape(b, self.n_heads, 1, self.head_dim)

        cos, sin = self.cos.index_select(0, self.pos)[:, None], self.sin.index_select(0, self.pos)[:, None]
        logits = self._logits(self._blocks(self.embed(ids), cos, sin, attend))
        self.next_ids.copy_(logits.argmax(-1))
        self.tokens.index_copy_(1, self.pos + 1, self.next_ids[:, None])
        self.pos.add_(1)
        return logits

    @torch.no_grad()
    def capture(self) -> None:
        """Record the decode step as a CUDA graph, once (the first prefill does it; later ones reuse it). Its
        warm-up writes the first cache positions, so a prefill must follow. No-op without CUDA graphs."""
        if not self.use_cuda_graph or self._graph is not None:
            return
        self.pos.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS handles, allocator, autotuning)
            for _ in range(min(3, self.max_len)):
                self._step_fn()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):  # records without running: `pos` stays where the warm-up left it
            self._graph_logits = self._step_fn()
        self._host_pos = None

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed the last generated token; the next ids [B] on the device (a buffer: clone it to keep it)."""
        if self._host_pos is None or self._host_pos >= self.max_len:
            raise RuntimeError(f"step() needs a prefill first and fewer than max_len={self.max_len} tokens so far")
        if self.use_cuda_graph:
            self._graph.replay()
            self.logits = self._graph_logits
        else:
            self.logits = self._step_fn()
        self._host_pos += 1
        return self.next_ids

    def generate(self, input_ids: torch.Tensor, gen_len: int) -> torch.Tensor:
        """Greedy continuation of a prompt [B, P]: ids [B, gen_len] on the host (one copy, at the end)."""
        p = input_ids.shape[1]
        if gen_len < 1 or p + gen_len - 1 > self.max_len:
            raise ValueError(f"prompt {p} + gen_len {gen_len} - 1 exceeds max_len {self.max_len}")
        self.prefill(input_ids)
        for _ in range(gen_len - 1):
            self.step()
        return self.tokens[:, p:p + gen_len].cpu()


def _mark(cuda: bool):
    """A point in time: a CUDA event recorded on the current stream (read after a synchronize), else the host clock."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(start, end) -> float:
    return end - start if isinstance(start, float) else start.elapsed_time(end) / 1e3


def profile_steps(dec: "StaticDecoder", prompt_ids: torch.Tensor, steps: int, top: int = 12) -> dict:
    """Where a decode step's time goes: `steps` steps (as `step()` runs them: the CUDA graph's replay on CUDA) under
    torch.profiler after a prefill; the device time of each kernel per step, largest first, their sum, and the wall
    time per step, so that the time between kernels (launch gaps, host work) is their difference. On the CPU the
    operators' own times stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dec.device.type == "cuda"
    steps = max(1, min(steps, dec.max_len - prompt_ids.shape[1]))
    dec.prefill(prompt_ids.to(dec.device))
    if cuda:
        torch.cuda.synchronize(dec.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def run(step) -> tuple[dict, float]:
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize(dec.device)
            wall = time.perf_counter() - t0
        per = {}
        for e in prof.key_averages():
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            if us > 0 and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA):
                per[e.key] = (per.get(e.key, (0.0, 0))[0] + us, per.get(e.key, (0.0, 0))[1] + e.count)
        return per, wall

    per, wall = run(dec.step)
    graph_hidden = cuda and dec.use_cuda_graph and not per
    if graph_hidden:  # this profiler sees no kernels inside a graph's replay: the same step, launched eagerly
        dec.prefill(prompt_ids.to(dec.device))
        per, _ = run(dec._step_fn)
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])
    total_us = sum(us for us, _ in per.values())
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "kernels_from_eager_step": graph_hidden, "kernel_ms_per_step": total_us / 1e3 / steps,
            "kernels_per_step": sum(n for _, n in per.values()) / steps,
            "top": [{"name": k[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps,
                     "share": us / total_us if total_us else None} for k, (us, n) in ranked[:top]]}


def time_decode(model, prompt_ids: torch.Tensor, gen_len: int, warmup: int = 1, repeats: int = 3,
                use_cuda_graph: bool | None = None, compile_step: bool = False, profile: int = 0) -> dict:
    """Median prefill and decode times of `repeats` greedy runs after `warmup` untimed ones (the CUDA graph is
    captured before any of them). Conventions of eval/throughput.py: the prefill emits the first token, the decode
    is the gen_len - 1 steps after it. CUDA events on CUDA; perf_counter on the CPU. `profile` > 0: that many more
    steps under the profiler afterwards (profile_steps), in the result's "profile"."""
    b, p = prompt_ids.shape
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dec = StaticDecoder(model, b, p + gen_len, use_cuda_graph, compile_step)
    cuda = dec.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dec.device)
    prompt_ids = prompt_ids.to(dec.device)
    dec.capture()  # not inside a timed prefill, even with warmup=0
    for _ in range(warmup):
        ids = dec.generate(prompt_ids, gen_len)
    runs = []
    for _ in range(repeats):
        t0 = _mark(cuda)
        dec.prefill(prompt_ids)
        t1 = _mark(cuda)
        for _ in range(gen_len - 1):
            dec.step()
        t2 = _mark(cuda)
        if cuda:
            torch.cuda.synchronize(dec.device)
        runs.append((_seconds(t0, t1), _seconds(t1, t2)))
        ids = dec.tokens[:, p:p + gen_len].cpu()
    prof = profile_steps(dec, prompt_ids, profile) if profile else None  # after the timed runs: never timed
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    steps = gen_len - 1
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "decode_ms_per_step": 1e3 * decode_s / steps if steps else None,
            "decode_tok_s": b * steps / decode_s if steps else None, "prefill_tok_s": b * p / prefill_s,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(dec.device) if cuda else None,
            "cuda_graph": dec.use_cuda_graph, "compiled": dec.compile_step, "repeats_s": [list(r) for r in runs], "ids": ids,
            **({"profile": prof} if prof else {})}


# Projections that read the same input, and the module that replaces them (their weights concatenated along the
# output dimension, in this order): one matrix product instead of three (two), which is what lets a decode step at
# batch 1 approach the bandwidth floor (each cuBLAS/int4 call has a fixed cost; GPU.md). Per-row groups of a
# W4A16 quantization run along the input, so quantizing the fused weight gives the concatenation of the codes.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


@torch.no_grad()
def fuse_projections(model) -> int:
    """Replace each block's q/k/v and gate/up nn.Linears by one nn.Linear each (before any quantization or kernel
    swap), in place; the static decoder calls the fused module. transformers' own forward no longer runs on the
    result. Returns the number of fused modules made."""
    arch, _ = check_supported(model, 1)
    n = 0
    for block in model.get_submodule(arch.blocks):
        for fused, parts in FUSED.items():
            mods = [block.get_submodule(p) for p in parts]
            if not all(isinstance(m, torch.nn.Linear) for m in mods):
                continue
            w = torch.cat([m.weight for m in mods], 0)
            bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods], 0)
            new = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            if bias is not None:
                new.bias.copy_(bias)
            parent_name = fused.rsplit(".", 1)[0]
            parent = block.get_submodule(parent_name)
            setattr(parent, fused.rsplit(".", 1)[1], new)
            for p in parts:
                delattr(parent, p.rsplit(".", 1)[1])
            n += 1
    return n
