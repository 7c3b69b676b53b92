"""Does quant/kv_cache.py quantize K/V exactly as LMDeploy's own kernels? GPU check against LMDeploy's PyTorch engine
(issue 19): the same K/V tensors go through LMDeploy's `fill_kv_cache` (quant_policy 8 and 4), its prefill dequant
`flatten_kv_cache`, and its paged-attention decode kernel `flash_attn_with_kvcache`, and through the harness's
`kv_quantize` / `kv_dequantize_prefill` / `kv_dequantize_decode` on the CPU.

    python -m benchmarks.kv_lmdeploy_check --out $OUT          # GPU, LMDeploy importable: writes kv_lmdeploy_check.json
    python -m benchmarks.kv_lmdeploy_check --self-check --out D  # CPU: the harness against itself (tests the plumbing)

Default shapes: 4 sequences x 300 tokens x 8 KV heads, head_dim 128 and 64, with and without outlier channels (x20),
fp16 and bf16. For every case and for K and V, the JSON holds:
- codes: fraction equal / differing by ±1 / by more (int4 compared nibble by nibble, LMDeploy's layout);
- scale and zero: fraction bit-identical, max absolute difference (zero in code units), max relative scale difference;
- per dequant path: fraction bit-identical, max difference in LSB (one quantization step = the stored scale) and in
  ulps of the model dtype where the codes agree, and the error against the original values, LMDeploy / harness (RMS
  and max) — 1.0 means the deployed cache loses exactly what the harness says;
  `prefill`: flatten_kv_cache against kv_dequantize_prefill; `prefill_fused`: the same LMDeploy output against
  fp16(q*s - s*z) rounded once, i.e. if the compiler fused the fp16 multiply-subtract into one FMA (bf16 computes in
  fp32 anyway). The 2026-11-28 H200 run found the fused form (100% where codes agree, the two-rounding form 14-60%),
  and kv_dequantize_prefill now is that form, so both columns agree for runs after it; `decode`: V only, read out of the paged-attention kernel with a zero query and ALiBi slopes so steep
  that each query sees only its last token (output = that token's dequantized V, exactly; K's dequant is the same
  expression `((k - kz) * ks).to(q.dtype)` but only enters through q.k, so it is not read out).

LMDeploy is imported only inside `lmdeploy_side`: this module imports on a CPU machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

NAME = "kv_lmdeploy_check"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kv_lmdeploy_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/gpu"), help="folder for kv_lmdeploy_check.json")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=300, help="tokens per sequence")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dims", default="128,64", help="comma-separated")
    ap.add_argument("--dtypes", default="float16,bfloat16", help=f"comma-separated, of {sorted(DTYPES)}")
    ap.add_argument("--policies", default="8,4", help="LMDeploy quant_policy values (kv bits), comma-separated")
    ap.add_argument("--outlier-scale", type=float, default=20.0, help="outlier channels are multiplied by this")
    ap.add_argument("--outlier-channels", type=int, default=4, help="how many channels per head are outliers")
    ap.add_argument("--block-size", type=int, default=64, help="LMDeploy's cache block (page) size in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--self-check", action="store_true",
                    help="no LMDeploy: compare the harness with itself on the CPU (every statistic must be exact)")
    args = ap.parse_args(argv)
    args.head_dims = [int(d) for d in str(args.head_dims).split(",")]
    args.dtypes = [d.strip() for d in str(args.dtypes).split(",")]
    args.policies = [int(p) for p in str(args.policies).split(",")]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: {bad} not in {sorted(DTYPES)}")
    if any(p not in (8, 4) for p in args.policies):
        ap.error("--policies: 8 and/or 4")
    if any(d % 2 for d in args.head_dims):
        ap.error("--head-dims must be even (int4 packs two halves of the head)")
    return args


def make_kv(seqs: int, tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype, outlier_scale: float | None,
            outlier_channels: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [seqs, tokens, kv_heads, head_dim] in `dtype` (LMDeploy's token-major layout), on the CPU: normal
    values with a per-channel spread and a per-head offset; with `outlier_scale`, `outlier_channels` fixed channels of
    every head multiplied by it (the channel outliers that make per-token KV quantization coarse)."""
    g = torch.Generator().manual_seed(seed * 1000 + head_dim)
    out = []
    for _ in range(2):
        x = torch.randn(seqs, tokens, kv_heads, head_dim, generator=g)
        x = x * (torch.rand(1, 1, kv_heads, head_dim, generator=g) + 0.5) + torch.randn(1, 1, kv_heads, 1, generator=g)
        if outlier_scale:
            x[..., torch.randperm(head_dim, generator=g)[:outlier_channels]] *= outlier_scale
        out.append(x.to(dtype))
    return out[0], out[1]


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    from quant.kv_cache import unpack_int4_halves

    return unpack_int4_halves(codes) if bits == 4 else codes


def round_fp16_fused(q: torch.Tensor, s: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """fp16(q*s - sz) rounded once (an FMA), from fp16 s and sz: the exact value in float64 (q*s and the difference
    fit its 53 bits), rounded once to fp16 (quant.kv_cache.round_to_fp16_once)."""
    from quant.kv_cache import round_to_fp16_once

    return round_to_fp16_once(q.double() * s.double() - sz.double())


def harness_side(x: torch.Tensor, bits: int) -> dict:
    """The harness's cache for x [seqs, tokens, heads, D]: codes (LMDeploy layout), scales, zeros, both dequants."""
    from quant.kv_cache import kv_dequantize_decode, kv_dequantize_prefill, kv_quantize

    kv = kv_quantize(x.transpose(1, 2), bits)  # harness layout [batch, heads, seq, D]
    q = _unpack(kv.codes, bits).transpose(1, 2)
    s, z = kv.scales.transpose(1, 2), kv.zeros.transpose(1, 2)
    out = {"codes": kv.codes.transpose(1, 2), "scales": s, "zeros": z,
           "prefill": kv_dequantize_prefill(kv).transpose(1, 2), "decode": kv_dequantize_decode(kv).transpose(1, 2)}
    if x.dtype == torch.float16:
        sz = (s.float() * z.float()).half()
        out["prefill_fused"] = round_fp16_fused(q, s[..., None], sz[..., None])
    else:
        out["prefill_fused"] = out["prefill"]
    return out


def _frac(mask: torch.Tensor) -> float:
    return mask.double().mean().item() if mask.numel() else float("nan")


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype == torch.uint8:
        return a == b
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return (a.view(ints) == b.view(ints)) | (torch.isnan(a) & torch.isnan(b))


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (normal range; the smallest normal's below it)."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.double().abs().clamp_min(fi.tiny)))) * fi.eps


def _max(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return t.max().item() if t.numel() else 0.0


def compare(lmd: dict, har: dict, x: torch.Tensor, bits: int) -> dict:
    """Statistics of LMDeploy's cache `lmd` against the harness's `har` (dicts as harness_side returns; `lmd` may lack
    some dequant paths) for the original values x [seqs, tokens, heads, D]."""
    q_l, q_h = _unpack(lmd["codes"], bits).int(), _unpack(har["codes"], bits).int()
    dq = (q_l - q_h).abs()
    s_h, z_h = har["scales"].double(), har["zeros"].double()
    stats = {
        "codes": {"frac_equal": _frac(dq == 0), "frac_pm1": _frac(dq == 1), "frac_more": _frac(dq > 1),
                  "max_abs_diff": int(dq.max())},
        "scale": {"frac_bit_identical": _frac(_bitwise_equal(lmd["scales"], har["scales"])),
                  "max_abs_diff": _max((lmd["scales"].double() - s_h).abs()),
                  "max_rel_diff": _max((lmd["scales"].double() - s_h).abs() / s_h.abs())},
        "zero": {"frac_bit_identical": _frac(_bitwise_equal(lmd["zeros"], har["zeros"])),
                 "max_abs_diff_codes": _max((lmd["zeros"].double() - z_h).abs())},
    }
    agree = (q_l == q_h) & _bitwise_equal(lmd["scales"], har["scales"])[..., None] \
        & _bitwise_equal(lmd["zeros"], har["zeros"])[..., None]
    codes_agree = q_l == q_h
    x64 = x.double()
    for path in ("prefill", "prefill_fused", "decode"):
        if path not in lmd:
            continue
        a, b = lmd[path], har[path]
        diff = (a.double() - b.double()).abs()
        err_l, err_h = (a.double() - x64), (b.double() - x64)
        stats[path] = {
            "frac_bit_identical": _frac(_bitwise_equal(a, b)),
            "frac_bit_identical_where_codes_scale_zero_agree": _frac(_bitwise_equal(a, b)[agree]),
            "max_diff_lsb_where_codes_agree": _max((diff / s_h[..., None])[codes_agree]),
            "max_diff_ulp_where_codes_agree": _max((diff / _ulp(b, b.dtype))[codes_agree]),
            "rms_error_ratio_lmdeploy_over_harness": _rms(err_l) / _rms(err_h),
            "max_error_ratio_lmdeploy_over_harness": _max(err_l.abs()) / _max(err_h.abs()),
            "rms_error_lsb_harness": _rms(err_h / s_h[..., None]),
        }
    return stats


def _rms(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return t.pow(2).mean().sqrt().item()


def lmdeploy_side(k: torch.Tensor, v: torch.Tensor, bits: int, block_size: int, device: str) -> tuple[dict, dict]:
    """LMDeploy's own kernels on K, V [seqs, tokens, heads, D]: fill_kv_cache, flatten_kv_cache, and V read out of
    flash_attn_with_kvcache (see the module docstring). Returns (K dict, V dict) on the CPU, as harness_side's."""
    from lmdeploy.pytorch.kernels.cuda.fill_kv_cache import fill_kv_cache
    from lmdeploy.pytorch.kernels.cuda.flatten_kv_cache import flatten_kv_cache

    try:
        from lmdeploy.messages import QuantPolicy
        policy = QuantPolicy(bits)
    except (ImportError, ValueError):
        policy = bits
    seqs, tokens, heads, dim = k.shape
    dtype = k.dtype
    packed = dim if bits == 8 else dim // 2
    nblk = -(-tokens // block_size)
    num_blocks = seqs * nblk
    # interleaved block ids, as LMDeploy's kernel tests lay them out
    block_offsets = (torch.arange(seqs)[:, None] + torch.arange(nblk)[None, :] * seqs).to(device)
    caches = [torch.zeros(num_blocks, block_size, heads, packed, dtype=torch.uint8, device=device) for _ in range(2)]
    sz = [torch.zeros(num_blocks, block_size, heads, 2, dtype=dtype, device=device) for _ in range(2)]
    seqlens = torch.full((seqs,), tokens, dtype=torch.long, device=device)
    start_loc = seqlens.cumsum(0) - seqlens
    states = [t.reshape(seqs * tokens, heads, dim).to(device).contiguous() for t in (k, v)]
    fill_kv_cache(states[0], states[1], caches[0], caches[1], start_loc, seqlens, seqlens, tokens, block_offsets,
                  k_scales_zeros=sz[0], v_scales_zeros=sz[1], quant_policy=policy)
    flat_k, flat_v = flatten_kv_cache(caches[0], caches[1], seqlens, block_offsets, start_loc=start_loc,
                                      out_size=seqs * tokens, out_dtype=dtype, k_scales_zeros=sz[0],
                                      v_scales_zeros=sz[1], quant_policy=policy, kv_layout="bshd",
                                      flatten_kv_layout="shd")
    torch.cuda.synchronize()

    def gather(t):  # paged [blocks, block_size, ...] -> [seqs, tokens, ...]
        return t[block_offsets].flatten(1, 2)[:, :tokens].cpu()

    out = []
    for i, flat in enumerate((flat_k, flat_v)):
        out.append({"codes": gather(caches[i]), "scales": gather(sz[i][..., 0]), "zeros": gather(sz[i][..., 1]),
                    "prefill": flat.reshape(seqs, tokens, heads, dim).cpu()})
        out[-1]["prefill_fused"] = out[-1]["prefill"]
    try:
        out[1]["decode"] = decode_values(caches, sz, block_offsets, seqs, tokens, heads, dim, dtype, policy, device)
    except Exception as e:  # noqa: BLE001  (the JSON says why the decode path is missing)
        out[1]["decode_error"] = f"{type(e).__name__}: {e}"
    return out[0], out[1]


def decode_values(caches, sz, block_offsets, seqs, tokens, heads, dim, dtype, policy, device) -> torch.Tensor:
    """Every token's dequantized V through LMDeploy's decode kernel: one decode query per (sequence, token t) with
    cache_seqlens t + 1, q = 0 (all scores 0) and ALiBi slope 1e4, so the softmax weight of the last token is 1 and
    of every earlier one exp(-1e4) = 0: the output is that token's V, dequantized by the kernel, exactly."""
    from lmdeploy.pytorch.kernels.cuda.pagedattention import flash_attn_with_kvcache

    n = seqs * tokens
    q = torch.zeros(n, heads, dim, dtype=dtype, device=device)
    page_table = block_offsets.repeat_interleave(tokens, dim=0)
    cache_seqlens = torch.arange(1, tokens + 1, device=device).repeat(seqs)
    slopes = torch.full((heads,), 1e4, dtype=torch.float32, device=device)
    o = flash_attn_with_kvcache(q, caches[0], caches[1], cache_seqlens=cache_seqlens, page_table=page_table,
                                max_seqlen_q=1, softmax_scale=1.0, alibi_slopes=slopes, k_scales_zeros=sz[0],
                                v_scales_zeros=sz[1], quant_policy=policy, kv_layout="bshd")
    torch.cuda.synchronize()
    return o.reshape(seqs, tokens, heads, dim).cpu()


def run(args: argparse.Namespace) -> dict:
    results = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for head_dim in args.head_dims:
            for outliers in (None, args.outlier_scale):
                k, v = make_kv(args.seqs, args.tokens, args.kv_heads, head_dim, dtype, outliers,
                               args.outlier_channels, args.seed)
                for bits in args.policies:
                    har = [harness_side(t, bits) for t in (k, v)]
                    if args.self_check:  # what lmdeploy_side returns, from the harness: K has no decode readout
                        lmd = [{**h, "prefill_fused": h["prefill"]} for h in har]
                        del lmd[0]["decode"]
                    else:
                        lmd = lmdeploy_side(k, v, bits, args.block_size, args.device)
                    case = {"dtype": dname, "head_dim": head_dim, "outlier_scale": outliers, "quant_policy": bits}
                    for name, t, h, l in (("K", k, har[0], lmd[0]), ("V", v, har[1], lmd[1])):
                        stats = compare(l, h, t, bits)
                        if "decode_error" in l:
                            stats["decode_error"] = l["decode_error"]
                        results.append({**case, "tensor": name, **stats})
                    print(_line(results[-2]), _line(results[-1]), sep="\n", flush=True)
    return {"name": NAME, "self_check": args.self_check,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": results}


def _line(r: dict) -> str:
    c = r["codes"]
    case = f"{r['dtype']:8s} D={r['head_dim']:<3d} out={r['outlier_scale'] or 0:<4g} int{r['quant_policy']} {r['tensor']}:"
    parts = [case,
             f"codes eq {c['frac_equal']:.5f} ±1 {c['frac_pm1']:.5f}",
             f"scale rel {r['scale']['max_rel_diff']:.2e}", f"zero {r['zero']['max_abs_diff_codes']:.3g}"]
    for p in ("prefill", "prefill_fused", "decode"):
        if p in r:
            parts.append(f"{p} bit-eq {r[p]['frac_bit_identical']:.4f} lsb {r[p]['max_diff_lsb_where_codes_agree']:.3g}"
                         f" err-ratio {r[p]['rms_error_ratio_lmdeploy_over_harness']:.4f}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    try:
        from harness.environment import environment
        out["environment"] = environment()
    except Exception as e:  # noqa: BLE001
        out["environment"] = {"error": repr(e)}
    try:
        import lmdeploy
        out["environment"]["lmdeploy"] = lmdeploy.__version__
    except ImportError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
