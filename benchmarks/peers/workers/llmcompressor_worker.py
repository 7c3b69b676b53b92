"""llm-compressor (0.14) on the benchmark's model and calibration tokens: one recipe (rtn, gptq, awq, awq_gptq) at
one setting, its fake-quantized weights written for the harness to score (common.py says what is written).

Weights: int w_bit group g asymmetric (compressed-tensors QuantizationArgs, strategy group; W4A16_ASYM's fields at
our group size and bits), or NVFP4A16 (its preset). lm_head is left unquantized, as the harness does. Every modifier
knob not named here is llm-compressor's default (the JSON records each modifier as it ran). Calibration: the
benchmark's token ids as a DataLoader of batch 1 (oneshot's own default batch size), so no dataset is downloaded.
The weights written are what the quantized model's forward computes (compressed_tensors' forward_quantize of each
quantized Linear's weight with its scale, zero point and global scale).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.utils.data

try:  # imported as benchmarks.peers.workers.<name>
    from .common import Timer, calibration_ids, load_model, own_state_keys, read_spec, write_outputs
except ImportError:  # run as a script by the peers' interpreter (its folder is on the path)
    from common import Timer, calibration_ids, load_model, own_state_keys, read_spec, write_outputs


def skip_pinning_on_cpu() -> list[str]:
    """llm-compressor 0.14's AWQ pins its cached intermediates in host memory for faster onloading; on a host
    without an accelerator pin_memory fails, so there the pinning is skipped (a no-op: nothing is onloaded)."""
    if torch.cuda.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return ["llmcompressor.pipelines.cache.IntermediatesCache.pin_memory replaced by a no-op (no accelerator: "
            "pinning host memory fails on a CPU-only host; AWQ pins its intermediates)"]


def quant_kwargs(setting: dict) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    common = {"ignore": ["lm_head"]}
    if setting["format"] == "nvfp4":
        return {**common, "targets": ["Linear"], "scheme": "NVFP4A16"}
    if setting["format"] != "int":
        raise SystemExit(f"format {setting['format']!r}: this worker knows int and nvfp4")
    weights = QuantizationArgs(num_bits=setting["w_bit"], type="int", strategy="group",
                               group_size=setting["group_size"], symmetric=not setting["zero_point"], dynamic=False)
    return {**common, "config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}}


def recipe(name: str, setting: dict, awq_n_grid: int | None = None) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    q = quant_kwargs(setting)
    awq = {} if awq_n_grid is None else {"n_grid": awq_n_grid}  # None: its default grid
    recipes = {
        "rtn": lambda: [QuantizationModifier(**q)],
        "gptq": lambda: [GPTQModifier(**q)],
        "awq": lambda: [AWQModifier(**awq), QuantizationModifier(**q)],
        "awq_gptq": lambda: [AWQModifier(**awq), GPTQModifier(**q)],
    }
    if name not in recipes:
        raise SystemExit(f"recipe {name!r}: known {', '.join(recipes)}")
    return recipes[name]()


def calibration_loader(ids: torch.Tensor):
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
    return torch.utils.data.DataLoader(rows, batch_size=1, shuffle=False)


@torch.no_grad()
def fake_quantized_state(model, keys: list[str]) -> tuple[dict, int]:
    """The model's own tensors with every quantized Linear's weight as its forward computes it; how many Linears."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    n = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
            module.weight.data = forward_quantize(module, module.weight, "weight", scheme.weights)
            n += 1
    state = model.state_dict()
    return {k: state[k] for k in keys}, n


def main() -> None:
    spec = read_spec()
    patches = skip_pinning_on_cpu()
    from llmcompressor import oneshot

    ids = calibration_ids(spec)
    model, tok = load_model(spec)
    keys = own_state_keys(model)
    mods = recipe(spec["recipe"], spec["setting"], spec.get("awq_n_grid"))
    with Timer() as t:
        oneshot(model=model, tokenizer=tok, recipe=mods, dataset=calibration_loader(ids),
                num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    state, n = fake_quantized_state(model, keys)
    write_outputs(Path(spec["out_dir"]), state, {
        "tool": "llm-compressor", "recipe": spec["recipe"], "quantize_s": t.seconds, "quantized_linears": n,
        "modifiers": [{"type": type(m).__name__, **m.model_dump(mode="json", exclude_none=True)} for m in mods],
        "patches": patches})


if __name__ == "__main__":
    main()
