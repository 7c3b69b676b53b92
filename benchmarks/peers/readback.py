"""What a peer worker wrote (workers/common.py), verified before it is scored: a row whose output is missing,
incomplete, mis-shaped, not finite or not on the setting's grid is a failed row with the reason, never a number."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.assets import sha256_file
from quant.surgery import quantizable_linears


class ReadBackError(Exception):
    """The worker's output cannot be scored; the message is the row's reason."""


def reference_keys(model) -> dict[str, torch.Size]:
    """The state-dict keys a worker must write (a tied lm_head is the embedding: left out) and their shapes."""
    keys = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        keys.pop("lm_head.weight", None)
    return keys


def max_distinct_per_group(w: torch.Tensor, group_size: int) -> int:
    """The largest number of distinct values in any group of `group_size` consecutive inputs of w [out, in]."""
    g = w.detach().float().reshape(w.shape[0], -1, group_size).sort(dim=-1).values
    return int(((g[..., 1:] != g[..., :-1]).sum(dim=-1) + 1).max())


def read_result(out_dir: Path) -> dict:
    path = Path(out_dir) / "result.json"
    if not path.exists():
        raise ReadBackError(f"no {path.name} in {out_dir}: the worker did not finish")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ReadBackError(f"{path} is not JSON ({e})") from None


def read_state(out_dir: Path, result: dict, model, setting) -> tuple[dict, dict]:
    """The worker's tensors, checked against the model they replace: the same keys and shapes, finite, and every
    Linear the harness quantizes on the setting's grid (at most setting.levels distinct values per group) and not
    FP16's weight. Returns (state, notes): notes name the other tensors the peer changed (e.g. norms AWQ scaled)."""
    from safetensors.torch import load_file

    path = Path(out_dir) / "state.safetensors"
    if not path.exists():
        raise ReadBackError(f"no {path.name} in {out_dir}")
    if result.get("state_sha256") != sha256_file(path):
        raise ReadBackError(f"{path}: sha256 differs from the one result.json names (written twice or truncated)")
    state = load_file(str(path))
    want = reference_keys(model)
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    if missing or extra:
        raise ReadBackError(f"{path.name}: {len(missing)} tensors missing {missing[:3]}, {len(extra)} unexpected "
                            f"{extra[:3]}")
    for k, shape in want.items():
        if state[k].shape != shape:
            raise ReadBackError(f"{path.name}: {k} has shape {tuple(state[k].shape)}, the model's is {tuple(shape)}")
        if not torch.is_floating_point(state[k]) or not bool(torch.isfinite(state[k].float()).all()):
            raise ReadBackError(f"{path.name}: {k} is not a finite float tensor")
    ref = model.state_dict()
    linears = {f"{name}.weight" for name in quantizable_linears(model)}
    for k in sorted(linears):
        w = state[k]
        if w.shape[1] % setting.group_size:
            raise ReadBackError(f"{k}: {w.shape[1]} inputs do not split into groups of {setting.group_size}")
        n = max_distinct_per_group(w, setting.group_size)
        if n > setting.levels:
            raise ReadBackError(f"{k}: a group of {setting.group_size} holds {n} distinct values, more than the "
                                f"{setting.levels} of {setting.label}: not quantized at this setting")
        if torch.equal(w.to(ref[k].dtype), ref[k].cpu()):
            raise ReadBackError(f"{k}: identical to the FP16 weight (not quantized)")
    changed = sorted(k for k in want.keys() - linears if not torch.equal(state[k].to(ref[k].dtype), ref[k].cpu()))
    return state, {"quantized_linears_checked": len(linears), "other_tensors_changed": changed}


def load_into(model, state: dict) -> None:
    """The worker's tensors into `model` (in its dtype, on its device); a tied lm_head follows the embedding."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if k not in ("lm_head.weight",)]
    if left or unexpected:
        raise ReadBackError(f"loading: missing {left[:3]}, unexpected {unexpected[:3]}")
