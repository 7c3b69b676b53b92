"""auto-round (0.16.1) on the benchmark's model and calibration tokens: SignRound at one setting, its fake-quantized
weights written for the harness to score (common.py says what is written).

Settings: the package's defaults scaled to the benchmark (the spec's iters, nsamples and seqlen; lr, minmax lr,
batch size 8, amp, seed 42 and the best-loss snapshot are the package's), group g, asymmetric (sym=False), lm_head
unquantized (its default). NVFP4: its NVFP4 scheme with act_bits=16 (weight-only, as the harness's). Calibration: the
benchmark's token ids as a list of [1, seqlen] tensors, so no dataset is downloaded. The weights written are those of
its own fake-format checkpoint (quantize_and_save(format="fake"): quantize-dequantized weights in the model's dtype).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

try:  # imported as benchmarks.peers.workers.<name>
    from .common import Timer, calibration_ids, load_model, own_state_keys, read_spec, write_outputs
except ImportError:  # run as a script by the peers' interpreter (its folder is on the path)
    from common import Timer, calibration_ids, load_model, own_state_keys, read_spec, write_outputs


def scheme_kwargs(setting: dict) -> dict:
    if setting["format"] == "nvfp4":
        return {"scheme": "NVFP4", "act_bits": 16}
    if setting["format"] != "int":
        raise SystemExit(f"format {setting['format']!r}: this worker knows int and nvfp4")
    return {"scheme": f"W{setting['w_bit']}A16", "bits": setting["w_bit"], "group_size": setting["group_size"],
            "sym": not setting["zero_point"]}


def read_checkpoint(folder: Path, keys: list[str]) -> dict:
    """The checkpoint's tensors under the model's own keys (auto-round's wrapped-layer `.orig_layer.` dropped)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.rglob("*.safetensors")):
        state.update({k.replace(".orig_layer.", "."): v for k, v in load_file(str(f)).items()})
    return {k: state[k] for k in keys if k in state}


def setting_of(ar, name: str):
    """A knob as the compressor ran it (on the compressor, its algorithm config or its calibration state)."""
    for owner in (ar, getattr(ar, "quantize_config", None), getattr(ar, "calibration_context", None)):
        if owner is not None and getattr(owner, name, None) is not None:
            return getattr(owner, name)
    return None


def main() -> None:
    spec = read_spec()
    from auto_round import AutoRound

    ids = calibration_ids(spec)
    model, tok = load_model(spec)
    keys = own_state_keys(model)
    kwargs = {**scheme_kwargs(spec["setting"]), "iters": spec["iters"], "nsamples": ids.shape[0],
              "seqlen": ids.shape[1], "device_map": spec["device"]}
    with tempfile.TemporaryDirectory(dir=spec["out_dir"]) as tmp, Timer() as t:
        ar = AutoRound(model, tok, dataset=[r[None] for r in ids], **kwargs)
        ar.quantize_and_save(output_dir=tmp, format="fake")
        state = read_checkpoint(Path(tmp), keys)
    write_outputs(Path(spec["out_dir"]), state, {
        "tool": "auto-round", "recipe": spec["recipe"], "quantize_s": t.seconds,
        "quantize_s_note": "quantize_and_save: SignRound plus writing its fake-format checkpoint (about a second)",
        "settings": {**kwargs, "alg": "signround", "format": "fake",
                     **{k: setting_of(ar, k) for k in ("lr", "minmax_lr", "batch_size", "amp", "seed",
                                                      "enable_minmax_tuning", "enable_quanted_input")}},
        "patches": []})


if __name__ == "__main__":
    main()
