"""The tensor names an architecture's own checkpoints use, for a model as the harness holds it.

transformers 5 renames some tensors at load time (its conversion mapping, `transformers.conversion_mapping`): Mixtral's
`block_sparse_moe.` becomes `mlp.`, and every architecture's per-expert Linears (`experts.<e>.w1/w3/w2` for Mixtral,
`experts.<e>.gate_proj/up_proj/down_proj` for the Qwen-MoE family) are fused into 3-D `experts.gate_up_proj` /
`experts.down_proj`. harness.moe_unfuse splits those back into per-expert Linears named gate_proj/up_proj/down_proj,
which are the checkpoint's names for the Qwen family but not for Mixtral. An exported checkpoint must carry the names
that loaders of the original architecture read (transformers' own `from_pretrained`, vLLM, LMDeploy), so every
export writes its keys through `CheckpointNames`: transformers' save-time reversal (the renamings reversed, as
`save_pretrained` does through `revert_weight_conversion`), and for an unfused expert Linear the per-expert name of
the fused tensor's source pattern (`.experts.*.w1.weight` for expert e's gate_proj). No name is spelled here: the
mapping is transformers', so it follows the installed version.
"""
from __future__ import annotations

import re

# how harness.moe_unfuse splits a fused expert tensor: `gate_up_proj` [E, 2I, h], gate rows first, and `down_proj`;
# transformers' converters list their per-expert sources in that order (Concatenate(dim=1) of gate, then up)
UNFUSED_LEAVES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_PLAIN_PATTERN = re.compile(r"^[\w.*]+$")  # a converter pattern the expert naming can read: dots, words and `*`


class CheckpointNameError(ValueError):
    pass


class CheckpointNames:
    """model state-dict key -> the key its architecture's checkpoints use (identity for a dense Llama/Qwen/Gemma)."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

        # as revert_weight_conversion for a model built from a config: no legacy renamings, no prefix changes
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
        self._renamings = [c.reverse_transform() for c in conversions[::-1] if isinstance(c, WeightRenaming)]
        self._experts: list[tuple[re.Pattern, str]] = []  # unfused expert Linear's weight key -> source pattern
        for c in conversions:
            if not isinstance(c, WeightConverter) or len(c.target_patterns) != 1:
                continue
            target = c.target_patterns[0]
            fused = target.rsplit(".", 1)[-1]
            leaves = UNFUSED_LEAVES.get(fused)
            if leaves is None or "experts" not in target:
                continue
            if len(leaves) != len(c.source_patterns) or not all(_PLAIN_PATTERN.match(p) for p in
                                                                  (target, *c.source_patterns)):
                raise CheckpointNameError(f"{model.config.model_type}: transformers' converter {c.source_patterns} -> "
                                          f"{target} is not the per-expert layout harness.moe_unfuse splits into "
                                          f"{', '.join(leaves)}; the exported names would be wrong")
            base = re.escape(target[: -len(fused)])  # ".experts." or "mlp.experts."
            for leaf, source in zip(leaves, c.source_patterns):
                self._experts.append((re.compile(base + r"(\d+)\." + re.escape(leaf) + r"\.weight$"), source))

    def __call__(self, key: str) -> str:
        for pattern, source in self._experts:
            m = pattern.search(key)
            if m:
                key = key[: m.start()] + source.replace("*", m.group(1))
                break
        # each reversed renaming in turn (what transformers' apply_renamings does; that helper is newer than the
        # WeightRenaming.rename_source_key it calls: transformers 5.17 has only the method)
        for renaming in self._renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    def module(self, name: str) -> str:
        """A module's checkpoint name (its tensors are `<that>.<suffix>`: weight, qweight, weight_packed, ...)."""
        return self(f"{name}.weight")[: -len(".weight")]

    def inverse(self, model) -> dict[str, str]:
        """checkpoint key -> state-dict key, over `model`'s parameters and buffers and its modules' names (for a
        loader that reads a checkpoint back into the harness's layout)."""
        out = {self(k): k for k in model.state_dict()}
        out.update({self.module(n): n for n, _ in model.named_modules() if n})
        return out
