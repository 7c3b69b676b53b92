"""Files the harness reads back as truth are checked against the sha256 written with them (issue 27, finding 3): a
block checkpoint or a quantized-cache entry with one low mantissa bit flipped in one value is named in one line,
discarded and computed again, and the result is bit for bit the uninterrupted run's."""
from __future__ import annotations

import copy
import json
import struct

import pytest
import torch

from harness.architectures import architecture_for
from quant import QuantContext, quantized_cache
from quant.calibration.runner import run_sequential
from quant.rtn import RTNConfig
from tests.quant.test_awq import _calib, _truncated
from tests.quant.test_resume import _Crash, _RecordingRTN, _same, _tensors


def flip_low_mantissa_bit(path, name: str) -> None:
    """Flip bit 0 of the first value of tensor `name` in the safetensors file at `path`, in place (same size; a
    little-endian float's lowest byte holds its lowest mantissa bits)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header[name]["dtype"] in ("F32", "BF16", "F16"), header[name]
    raw[8 + n + header[name]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(raw))


class _RTNDiesAt(_RecordingRTN):
    """A fast method on the sequential runner (what GPTQ, AWQ and SmoothQuant run on): RTN per block, each block
    calibrating on the quantized blocks before it; raises in block `dies_at` after changing it, as a kill would."""

    def __init__(self, arch, dies_at: int | None = None):
        super().__init__(arch)
        self.dies_at = dies_at

    def quantize_block(self, block, index, *args):
        res = super().quantize_block(block, index, *args)
        if index == self.dies_at:
            raise _Crash
        return res


def test_a_block_checkpoint_with_one_flipped_bit_is_discarded_and_recomputed(smollm2_fp32, calib_ids, tmp_path, capsys):
    """Killed in block 2, block 1's checkpoint damaged in one value: the resume says which file and why, computes from
    block 1 again, and ends with the tensors of a run never interrupted (today's main resumed from block 2 with the
    damaged value, which then went on into the quantized-weight cache)."""
    base = _truncated(smollm2_fp32, 3)
    arch = architecture_for(base)
    samples = _calib(calib_ids, 4, 32)

    def run(model, dies_at=None, checkpoint_dir=None):
        return run_sequential(model, arch, _RTNDiesAt(arch, dies_at), samples, propagate="quantized",
                              checkpoint_dir=checkpoint_dir, progress=False)

    ref_model = copy.deepcopy(base)
    ref = run(ref_model)
    with pytest.raises(_Crash):
        run(copy.deepcopy(base), dies_at=2, checkpoint_dir=tmp_path)
    damaged = tmp_path / "block_0001.safetensors"
    flip_low_mantissa_bit(damaged, "state.mlp.down_proj.weight")
    capsys.readouterr()

    model = copy.deepcopy(base)
    out = run(model, checkpoint_dir=tmp_path)
    said = [line for line in capsys.readouterr().err.splitlines() if str(damaged) in line]
    assert len(said) == 1 and "sha256" in said[0] and "from block 1" in said[0], said
    assert out.resumed_from == 1
    _same({**_codes(out), **model.state_dict()}, {**_codes(ref), **ref_model.state_dict()})


def _codes(run) -> dict:
    return {f"{k}.{n}": getattr(q, n) for k, q in run.qtensors.items() for n in ("q", "scales", "zeros")}


@pytest.mark.parametrize("damage", ["flipped bit", "no recorded sha256"])
def test_a_quantized_cache_entry_that_is_not_what_was_written_is_a_miss(damage, smollm2_fp32, tmp_path, monkeypatch,
                                                                        capsys):
    """The quantized-weight cache: an entry with one flipped bit (or from before hashes were written) is named in a
    warning and quantized again; the rewritten entry then loads as a hit."""
    monkeypatch.setenv("QH_CACHE", str(tmp_path))
    base = _truncated(smollm2_fp32, 2)
    cfg = RTNConfig(w_bit=4, group_size=64)
    ctx = QuantContext(lambda: None, progress=False)
    ref_model = copy.deepcopy(base)
    ref = quantized_cache.quantize_cached(ref_model, cfg, "sha", "float32", ctx, {})
    tensors_path, sidecar = quantized_cache._paths(ref.summary["cache_key"])
    if damage == "flipped bit":
        flip_low_mantissa_bit(tensors_path, "params.model.layers.1.post_attention_layernorm.weight")
    else:
        meta = json.loads(sidecar.read_text())
        del meta["tensors_sha256"]
        sidecar.write_text(json.dumps(meta))
    capsys.readouterr()

    model = copy.deepcopy(base)
    out = quantized_cache.quantize_cached(model, cfg, "sha", "float32", ctx, {})
    said = [line for line in capsys.readouterr().err.splitlines() if str(tensors_path) in line]
    assert len(said) == 1 and "sha256" in said[0] and "quantizing again" in said[0], said
    assert not out.summary.get("from_cache")
    _same(_tensors(model, out), _tensors(ref_model, ref))

    again = copy.deepcopy(base)
    hit = quantized_cache.quantize_cached(again, cfg, "sha", "float32", ctx, {})
    assert hit.summary["from_cache"]
    _same(_tensors(again, hit), _tensors(ref_model, ref))


def test_hashing_reads_each_file_once_per_load(tmp_path, monkeypatch):
    """The check is one sha256 pass over the bytes on save and one on load (no second hash, no memo to trust)."""
    import hashlib

    from harness import integrity

    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(integrity.hashlib, "file_digest", lambda f, d: calls.append(d) or real(f, d))
    t = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    sha = integrity.save_tensors(t, tmp_path / "x.safetensors")
    assert calls == ["sha256"]
    assert torch.equal(integrity.load_tensors(tmp_path / "x.safetensors", sha)["w"], t["w"])
    assert calls == ["sha256"] * 2
    with pytest.raises(integrity.IntegrityError, match="no sha256"):
        integrity.load_tensors(tmp_path / "x.safetensors", None)
