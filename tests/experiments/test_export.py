"""`python -m experiments.export`: a run's config -> its AWQ GEMM checkpoint, through the quantized-weight cache;
configs the format cannot hold fail in one line before any model loads."""
from __future__ import annotations

import json

import pytest
import torch

import experiments.export as E

FAST_RTN = ["quant=rtn_w4", "quant.group_size=64", "progress=false"]


@pytest.mark.parametrize("overrides, message", [
    (["quant=fp16"], "quant.method=fp16: nothing is quantized"),
    (["quant=rtn_w4", "quant.w_bit=3"], "quant.w_bit=3: the AWQ GEMM format is 4-bit only"),
    (["quant=rtn_w4", "quant.zero_point=false"], "quant.zero_point=False"),
    (["quant=rtn_w4", "quant.group_size=-1"], "quant.group_size=-1"),
    (["quant=rtn_w4", "quant.group_size=128"], "does not divide"),  # SmolLM2's hidden size is 576
    (["quant=rtn_w4", "quant.group_size=128", "quant.group_fallback=per_channel"], "group_fallback=per_channel"),
    (["quant=awq_w4", "quant.calib.dataset=file:/nonexistent/calib.txt"], "no such file"),
    (["quant=nonsense"], "nonsense"),
    (["quant=smoothquant_w8a8"], "quant.method: smoothquant — the AWQ GEMM format holds"),  # issue 27, finding 8
    (["quant=rtn_w4", "quant.grop_size=64"], "use quant.group_size=64"),
])
def test_unexportable_configs_fail_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, overrides,
                                                                      message):
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert E.main([*overrides, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_out_is_required(capsys):
    assert E.main(["quant=rtn_w4"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
@torch.no_grad()
def test_export_of_rtn_w4_g64_round_trips(tmp_path, smollm2_resolved):
    """The checkpoint read back (load_awq_dequantized) holds the quantized model's weights: the cached codes exactly,
    every Linear equal to its dequantization with the fp16 scales the format stores, and close to the bf16 weights the
    run evaluated."""
    import json

    from harness.models import load_model
    from quant import quantized_cache
    from quant.export.awq import load_awq_dequantized, load_awq_qtensors
    from quant.primitives import dequantize

    out = tmp_path / "rtn"
    assert E.main([*FAST_RTN, "--out", str(out)]) == 0
    cfg = E.compose_config(FAST_RTN)
    meta = json.loads((out / "quant_meta.json").read_text())
    from harness.records import run_id

    assert meta["run_id"] == run_id(cfg) and meta["method"] == "rtn" and meta["group_size"] == 64

    # the quantized model as a run sees it: the cache entry the export went through
    model = load_model(smollm2_resolved, cfg.model)
    key = quantized_cache.quant_key(smollm2_resolved.model_sha, cfg.quant, cfg.model.dtype)
    outcome = quantized_cache.load_into(key, model)
    assert outcome is not None  # the export quantized through the cache
    loaded_qt = load_awq_qtensors(out)
    assert loaded_qt.keys() == outcome.qtensors.keys()
    loaded = load_awq_dequantized(out, torch.float32)
    mods, ours = dict(loaded.named_modules()), dict(model.named_modules())
    for name, qt in outcome.qtensors.items():
        lq = loaded_qt[name]
        assert torch.equal(lq.q, qt.q) and torch.equal(lq.zeros, qt.zeros)
        scales16 = qt.scales.half().float()
        assert torch.equal(mods[name].weight, dequantize(qt.q, scales16, qt.zeros, 64))
        torch.testing.assert_close(mods[name].weight, ours[name].weight.float(), rtol=1e-2, atol=1e-3)
    for key_, t in model.state_dict().items():  # norms and embeddings: the model's, at fp16
        if not any(key_ == f"{n}.weight" for n in outcome.qtensors) and key_ != "lm_head.weight":
            torch.testing.assert_close(loaded.state_dict()[key_], t.float(), rtol=1e-2, atol=1e-4)


# ----------------------------------------------------------------------------------------------- issue 27, finding 1
# The output directory: a fresh path, or (--force) a directory this harness wrote; never the user's files. Every
# check runs before the model loads.


@pytest.fixture
def tiny_dir(tmp_path, smollm2_resolved, monkeypatch):
    from tests.experiments.tiny import tiny_checkpoint

    d = tiny_checkpoint(tmp_path / "tiny-llama", smollm2_resolved.directory)
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    return d


def _tiny(d):
    return ["quant=rtn_w4", "quant.group_size=64", f"model.path={d}", "model.dtype=float32", "progress=false"]


@pytest.fixture
def no_loading(monkeypatch):
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _refused(capsys, argv, message) -> str:
    capsys.readouterr()  # what came before (the fixture's writing)
    assert E.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out: ") and message in err[0], err
    return err[0]


def test_a_directory_of_the_users_is_never_replaced(tmp_path, capsys, tiny_dir, no_loading):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    (out / "data").mkdir()
    (out / "data" / "measurements.csv").write_text("1,2,3")
    for force in ([], ["--force"]):
        _refused(capsys, [*_tiny(tiny_dir), "--out", str(out), *force], "holds files this harness did not write")
    assert (out / "thesis.tex").read_text() == "three years of work"
    assert (out / "data" / "measurements.csv").read_text() == "1,2,3"


def test_a_file_named_as_out_is_never_replaced(tmp_path, capsys, tiny_dir, no_loading):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for force in ([], ["--force"]):
        _refused(capsys, [*_tiny(tiny_dir), "--out", str(out), *force], "is not a directory this harness wrote")
    assert out.read_text() == "mine"


def test_an_unwritable_place_fails_before_the_model_loads(tmp_path, capsys, tiny_dir, no_loading, monkeypatch):
    import errno

    import harness.outputs

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _refused(capsys, [*_tiny(tiny_dir), "--out", str(blocker / "ckpt")], "is a file, so no directory can be made")

    def read_only(folder, nbytes=4096):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(harness.outputs, "probe_write", read_only)
    _refused(capsys, [*_tiny(tiny_dir), "--out", str(tmp_path / "ro" / "ckpt")], "(OSError: Read-only file system)")
    monkeypatch.setattr(harness.outputs, "probe_write", lambda folder, nbytes=4096: 1 << 20)  # 1 MiB free
    line = _refused(capsys, [*_tiny(tiny_dir), "--out", str(tmp_path / "full")], "has 1 MiB free; the checkpoint")
    assert not (tmp_path / "ro").exists() and not (tmp_path / "full").exists()
    # the estimate: the checkpoint's size, tiny here (a 49152 x 64 embedding at fp16, the int4 codes of 2 blocks)
    assert 6 < float(line.split("needs about ")[1].split(" MiB")[0]) < 45


def test_force_replaces_only_what_the_harness_wrote(tmp_path, capsys, tiny_dir):
    from harness.outputs import MANIFEST, read_manifest
    from harness.records import run_id

    out = tmp_path / "exports" / "rtn"
    assert E.main([*_tiny(tiny_dir), "--out", str(out)]) == 0
    m = read_manifest(out)
    assert m["run_id"] == run_id(E.compose_config(_tiny(tiny_dir))) and "model.safetensors" in m["files"]
    assert sorted(m["files"]) == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    _refused(capsys, [*_tiny(tiny_dir), "--out", str(out)], "add --force to replace it")
    assert E.main([*_tiny(tiny_dir), "--out", str(out), "--force"]) == 0  # the harness's own: replaced
    assert read_manifest(out)["run_id"] == m["run_id"]
    (out / "my_notes.md").write_text("keep me")
    _refused(capsys, [*_tiny(tiny_dir), "--out", str(out), "--force"], "1 file(s) it did not write (first: my_notes.md)")
    assert (out / "my_notes.md").read_text() == "keep me"
    assert sorted(p.name for p in out.parent.iterdir()) == ["rtn"]  # no temp sibling left behind


def test_an_export_that_fails_while_writing_leaves_nothing_at_out(tmp_path, tiny_dir, monkeypatch):
    import harness.outputs

    def killed(folder, info):
        raise KeyboardInterrupt  # as a Ctrl-C while the last file is written

    monkeypatch.setattr(harness.outputs, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        E.main([*_tiny(tiny_dir), "--out", str(tmp_path / "exports" / "rtn")])
    assert list((tmp_path / "exports").iterdir()) == []


def test_calibration_past_the_models_positions_fails_before_the_model_loads(tmp_path, capsys, no_loading):
    """Issue 27, finding 6, for the export: SmolLM2 has 8,192 positions; its eval settings do not matter here."""
    assert E.main(["quant=awq_w4", "quant.calib.seqlen=9000", "eval.perplexity.seqlen=20000", "--out",
                   str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: quant.calib.seqlen: 9000 — smollm2-135m-instruct has 8192 positions") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_format_compressed_tensors_writes_what_its_decompressor_reads_and_awq_stays_the_default(tmp_path, capsys,
                                                                                            tiny_dir):
    """`--format compressed-tensors`: the same run's codes in that layout (here 3-bit, which AWQ GEMM cannot hold);
    compressed-tensors' own compressors decompress every quantized Linear to within half a step of the tiny model's
    fp32 weights (RTN's bound, plus the fp16 scales' rounding); the manifest names the format. Without --format the
    export is AWQ GEMM, which refuses 3 bits as before."""
    from safetensors.torch import load_file

    from harness.outputs import read_manifest
    from tests.quant.test_export_compressed_tensors import reference_decompress

    w3 = [*_tiny(tiny_dir), "quant.w_bit=3"]
    capsys.readouterr()
    assert E.main([*w3, "--out", str(tmp_path / "awq")]) == 2
    assert "the AWQ GEMM format is 4-bit only" in capsys.readouterr().err
    out = tmp_path / "ct"
    assert E.main([*w3, "--out", str(out), "--format", "compressed-tensors"]) == 0
    assert read_manifest(out)["format"] == "compressed-tensors"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert {g["weights"]["num_bits"] for g in qc["config_groups"].values()} == {3}
    original = load_file(str(tiny_dir / "model.safetensors"))
    got = reference_decompress(out)
    assert len(got) == 2 * 7  # every Linear of the two blocks
    for name, w in got.items():
        ref = original[f"{name}.weight"].double()
        groups = ref.reshape(ref.shape[0], -1, 64)
        step = (groups.amax(-1) - groups.amin(-1)) / 7  # 3 bits: 7 steps between each group's min and max
        err = (w.double() - ref).reshape_as(groups).abs()
        assert (err <= step[..., None] / 2 * 1.01 + 2e-3 * groups.abs()).all(), name


@pytest.mark.parametrize("argv, message", [
    (["--format", "gguf"], "--format: 'gguf' — one of awq, compressed-tensors"),
    (["--format", "compressed-tensors", "quant=smoothquant_w8a8"], "quant.method"),
])
def test_a_format_it_cannot_write_is_refused_before_the_model_loads(tmp_path, capsys, no_loading, argv, message):
    assert E.main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err and not (tmp_path / "x").exists()
