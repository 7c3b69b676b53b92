"""The model's limits, checked from its config (config.json or a GGUF file's metadata) before any weight loads: every
sequence a run feeds the model fits its positions (max_position_embeddings). A window past them is scored outside the
model's trained context, and its PPL would be recorded as if it were the model's."""
from __future__ import annotations

from typing import Any, Optional

from harness.config import RunConfig, user_error


def max_positions(model_config: Any) -> Optional[int]:
    """The positions the model was trained for, or None when its config does not say (then nothing is checked)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def sequence_lengths(cfg: RunConfig) -> list[tuple[str, Any, int, str]]:
    """(field, its value, tokens, the fix with {n} for the model's positions) of every sequence the run's enabled
    stages feed the model in one forward: evaluation windows (perplexity, and fidelity on the same windows),
    calibration samples, lm-eval's rolling windows, the throughput prompt plus its new tokens, LMDeploy's session."""
    ev, out = cfg.eval, []
    if ev.perplexity.enabled or ev.fidelity.enabled:
        s = ev.perplexity.seqlen
        out.append(("eval.perplexity.seqlen", s, s, "use eval.perplexity.seqlen={n} or less"))
    calib = getattr(cfg.quant, "calib", None)  # only calibrated methods have one
    if calib is not None:
        out.append(("quant.calib.seqlen", calib.seqlen, calib.seqlen, "use quant.calib.seqlen={n} or less"))
    if ev.word_perplexity.enabled:
        s = ev.word_perplexity.max_length
        out.append(("eval.word_perplexity.max_length", s, s, "use eval.word_perplexity.max_length={n} or less"))
    if ev.throughput.enabled:
        tp = ev.throughput
        out.append(("eval.throughput.prompt_len", f"{tp.prompt_len} (+ gen_len {tp.gen_len})", tp.prompt_len + tp.gen_len,
                    "make eval.throughput.prompt_len + eval.throughput.gen_len at most {n}"))
    if cfg.backend.name == "lmdeploy" and cfg.backend.session_len is not None:
        s = cfg.backend.session_len
        out.append(("backend.session_len", s, s, "use backend.session_len={n} or less"))
    return out


def check_positions(cfg: RunConfig, model_config: Any, only: tuple[str, ...] | None = None) -> None:
    """Raise a one-line ConfigError for the first sequence longer than the model's positions (`only`: the fields to
    check, e.g. an export checks its calibration alone)."""
    n = max_positions(model_config)
    if n is None:
        return
    for field, value, tokens, fix in sequence_lengths(cfg):
        if tokens > n and (only is None or field in only):
            raise user_error(field, value, f"{cfg.model.name} has {n} positions (max_position_embeddings), and a "
                             f"sequence of {tokens} tokens runs past its trained context", fix.format(n=n))
