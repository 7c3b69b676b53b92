"""peers.md from peers.json: rows = tool / method, a column group per setting (token PPL with its 95% interval,
the paired difference to FP16, the gap over RTN's gap, seconds to quantize)."""
from __future__ import annotations


def _cell(c: dict | None) -> list[str]:
    if c is None:
        return ["", "", "", ""]
    if c["status"] != "ok":
        return [f"{'n/a' if c['status'] == 'not applicable' else 'failed'}: {c['reason'][:90]}", "", "", ""]
    lo, hi = c.get("token_ppl_ci95") or (float("nan"), float("nan"))
    d = c.get("delta_fp16")
    gap = c.get("gap_over_rtn_gap")
    return [f"{c['token_ppl']:.2f} [{lo:.1f}, {hi:.1f}]",
            "" if d is None else f"{d['estimate']:+.2f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]",
            "" if gap is None else f"{100 * gap:.0f}%", "" if c.get("quantize_s") is None else f"{c['quantize_s']:.0f}"]


def markdown(result: dict) -> str:
    settings = result["settings_run"]
    fp = result["fp16"]
    p = result["protocol"]
    head = ["tool", "method"] + [f"{result['settings'][s]['label']}: {h}" for s in settings
                                 for h in ("PPL [95%]", "Δ FP16 [95%]", "gap / RTN gap", "s")]
    lines = [f"*Peer benchmark{' (QUICK: a pipeline check, not comparable numbers)' if p['quick'] else ''}: token PPL "
             f"↓ on {p['eval_split']} ({p['eval_windows']}×512 windows), {p['n_samples']}×{p['seqlen']} calibration "
             f"tokens, scored in {p['dtype']} (peers quantize in {p.get('peer_dtype', p['dtype'])}), AutoRound "
             f"{p['iters']} steps/block; machine: {result['machine']} "
             f"({p['device']}). FP16 {fp['token_ppl']:.2f} [{fp['token_ppl_ci95'][0]:.1f}, "
             f"{fp['token_ppl_ci95'][1]:.1f}]. Δ: paired over windows; gap / RTN gap: against the harness's RTN at "
             f"the same setting; s: quantization wall time (peers: their own call, model load excluded).*", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["rows"].items():
        cells = [x for s in settings for x in _cell(row["cells"].get(s))]
        lines.append("| " + " | ".join([row["tool"], row["label"], *cells]) + " |")
    lines.append("")
    for s in settings:
        sm = result.get("summary", {}).get(s) or {}
        h, p_ = sm.get("best_harness"), sm.get("best_peer")
        if h and p_:
            line = (f"- {result['settings'][s]['label']}: best harness `{h['row']}` {h['token_ppl']:.2f}, best peer "
                    f"`{p_['row']}` {p_['token_ppl']:.2f} ({'below' if sm['harness_best_below_every_peer'] else 'NOT below'}"
                    f" every peer)")
            a = sm.get("autoround_vs_package")
            if a:
                line += (f"; harness AutoRound {a['ppl'][0]:.2f} in {a['quantize_s'][0]:.0f} s vs auto-round "
                         f"{a['ppl'][1]:.2f} in {a['quantize_s'][1]:.0f} s")
            lines.append(line)
    return "\n".join(lines) + "\n"
