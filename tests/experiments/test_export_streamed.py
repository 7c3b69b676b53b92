"""`model.stream=true` through the user's doors (experiments/streamed.py): `experiments.export` quantizes block by block
from the checkpoint (or from the seed for synthetic:<arch>) and writes the AWQ GEMM checkpoint of the in-memory export,
tensor for tensor, without ever loading the model whole; `experiments.run ... eval=none` records the streamed run; what
cannot stream is refused in one line before any weight is read; and the export's host memory stays within a few blocks
on a model many blocks larger (measured in fresh processes, beside the same process loading the model whole)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import experiments.export as E
from harness import synthetic

FAST = {"awq": ["quant=awq_w4", "quant.calib.n_samples=4", "quant.calib.seqlen=32", "quant.search_samples=2",
                "quant.n_grid=4", "quant.clip_n_grid=4", "quant.clip_tokens=64"],
        "gptq": ["quant=gptq_w4", "quant.calib.n_samples=4", "quant.calib.seqlen=32"],
        "rtn": ["quant=rtn_w4"]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_resolved):
    """A tiny Llama checkpoint (2 blocks, tied embeddings, safetensors) with the SmolLM2 tokenizer; a cache of this
    module's own."""
    from tests.experiments.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("streamed_export")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("QH_CACHE", str(root / "cache"))
        yield tiny_checkpoint(root / "tiny-llama", smollm2_resolved.directory)


def _args(d, method: str) -> list[str]:
    return [*FAST[method], "quant.group_size=64", f"model.path={d}", "model.dtype=float32", "progress=false"]


@pytest.fixture
def never_whole(monkeypatch):
    """Loading the model whole fails the test (harness.models.load_model: the in-memory door's only loader)."""
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded whole"))


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_checkpoint(streamed: Path, whole: Path) -> None:
    got, want = _tensors(streamed), _tensors(whole)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    qcfg = lambda d: json.loads((d / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qcfg(streamed) == qcfg(whole)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_streamed_export_is_the_in_memory_export_tensor_for_tensor(method, tmp_path, tiny_dir, monkeypatch):
    from harness.outputs import MANIFEST, read_manifest
    from harness.records import run_id

    assert E.main([*_args(tiny_dir, method), "--out", str(tmp_path / "whole")]) == 0
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded whole"))
    argv = [*_args(tiny_dir, method), "model.stream=true"]
    assert E.main([*argv, "--out", str(tmp_path / "streamed")]) == 0
    out = tmp_path / "streamed"
    _same_checkpoint(out, tmp_path / "whole")
    assert len(list(out.glob("model-block-*.safetensors"))) == 2  # one shard per block, written in its turn
    m = read_manifest(out)  # --force may replace it, as any export
    assert m["run_id"] == run_id(E.compose_config(argv)) and m["format"] == "awq-gemm"
    assert sorted(m["files"]) == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    meta = json.loads((out / "quant_meta.json").read_text())
    assert meta["streamed"]["placement"]["blocks_read"] == 2 and meta["streamed"]["placement"]["codes"] == "export"
    assert meta["streamed"]["host_memory"]["host_peak_rss_bytes"] > 0
    assert (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "whole"]  # no temp sibling left


def test_a_synthetic_model_streams_from_the_seed_without_writing_its_checkpoint(tmp_path, monkeypatch):
    """model.path=synthetic:<arch> with model.stream=true generates each block from the seed (no file is written) and
    exports what the in-memory path exports from the checkpoint harness.synthetic writes (the same model_sha)."""
    real = synthetic.load_arch
    monkeypatch.setattr(synthetic, "load_arch", lambda name, **o: real(
        name, **{"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 256, **o}))
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    argv = ["model=llama2_7b_synthetic", "model.device=cpu", "model.dtype=float32", *FAST["rtn"],
            "quant.group_size=64", "progress=false"]
    import harness.models

    with monkeypatch.context() as m:
        m.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded whole"))
        assert E.main([*argv, "model.stream=true", "--out", str(tmp_path / "streamed")]) == 0
    assert not (tmp_path / "cache" / "synthetic").exists()  # nothing written but the export
    assert E.main([*argv, "--out", str(tmp_path / "whole")]) == 0  # the file harness.synthetic writes, loaded whole
    assert (tmp_path / "cache" / "synthetic").is_dir()
    _same_checkpoint(tmp_path / "streamed", tmp_path / "whole")
    meta = lambda d: json.loads((tmp_path / d / "quant_meta.json").read_text())  # noqa: E731
    assert meta("streamed")["model_sha"] == meta("whole")["model_sha"] == "synthetic:llama2-7b-fp16-seed0"
    assert meta("streamed")["streamed"]["placement"]["stream"].startswith("synthetic llama2-7b, seed 0")


# ----------------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def no_block_read(monkeypatch, never_whole):
    import experiments.streamed

    monkeypatch.setattr(experiments.streamed, "open_model", lambda *a, **k: pytest.fail("a block was read"))


@pytest.mark.parametrize("overrides, message", [
    (["quant=awq_gptq_w4"], "quant.method: awq_gptq — streaming reads each block once"),
    (["quant=recipe_awq_gptq_w4"], "quant.method: recipe — streaming reads each block once"),
    (["quant=awq_w4", "quant.round_weights=false"], "quant.round_weights=false"),
    (["quant=rtn_w4", "--format", "compressed-tensors"], "--format: compressed-tensors — a streamed export writes AWQ "
                                                         "GEMM only"),
])
def test_an_export_that_cannot_stream_is_refused_before_any_weight_is_read(overrides, message, tmp_path, capsys,
                                                                            tiny_dir, no_block_read):
    argv = [f"model.path={tiny_dir}", "model.stream=true", "progress=false", *overrides, "--out", str(tmp_path / "x")]
    capsys.readouterr()
    assert E.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


@pytest.mark.parametrize("overrides, message", [
    (["quant=rtn_w4"], "no evaluator can run (enabled: perplexity, memory) — use eval=none"),  # eval=ppl, the default
    (["quant=rtn_w4", "eval=none", "eval.memory.enabled=true"], "(enabled: memory) — use eval=none"),
    (["quant=fp16", "eval=none"], "model.stream: true — quant.method=fp16 quantizes nothing"),
])
def test_a_run_that_evaluates_a_streamed_model_is_refused_before_any_work(overrides, message, tmp_path, tiny_dir,
                                                                          no_block_read):
    from experiments.pipeline import USER_ERRORS, run

    cfg = E.compose_config([f"model.path={tiny_dir}", "model.stream=true", "progress=false",
                            f"results_dir={tmp_path / 'results'}", *overrides])
    with pytest.raises(USER_ERRORS) as e:
        run(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "results" / "runs").exists() or not list((tmp_path / "results" / "runs").iterdir())


def test_a_streamed_run_is_recorded_like_any_other(tmp_path, tiny_dir, never_whole):
    """experiments.run model.stream=true eval=none: the record holds the quantization's summary with the streaming
    placement and the host memory; model.stream is part of its identity (stream=false keeps every earlier run_id) and
    the record stands for its config on the next run (reused)."""
    from experiments.pipeline import run
    from harness.records import run_id

    args = [f"model.path={tiny_dir}", "progress=false", "quant=rtn_w4", "quant.group_size=64", "eval=none",
            f"results_dir={tmp_path / 'results'}"]
    cfg = E.compose_config([*args, "model.stream=true"])
    rec = run(cfg)
    q = rec["metrics"]["quant"]
    assert set(rec["metrics"]) == {"quant"} and rec["config"]["model"]["stream"] is True
    assert q["placement"]["stream"].startswith("safetensors ") and q["placement"]["codes"] == "host"
    assert q["placement"]["blocks_read"] == 2 and q["layers_quantized"] == 14
    assert q["host_memory"]["host_peak_rss_bytes"] >= q["host_memory"]["host_rss_start_bytes"] > 0
    assert rec["run_id"] == run_id(cfg) != run_id(E.compose_config(args))
    assert run(cfg) == rec  # reused: the record stands for its config


# ------------------------------------------------------------------------------------------------ host memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    import experiments.export as E
    from quant.onload import HostPeak

    d, out, whole_too = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    argv = [f"model.path={d}", "model.weights=random", "model.dtype=float32", "model.stream=true", "quant=rtn_w4",
            "quant.group_size=128", "progress=false"]
    # the code first (Hydra, the stages, transformers' Llama): what any command imports, whatever the model's size
    import experiments.stages, transformers.models.llama.modeling_llama
    E.compose_config(argv)
    with HostPeak() as export:  # the whole command: prepare, open, every block, the rest of the checkpoint
        rc = E.main([*argv, "--out", str(out)])
    got = {"rc": rc, "export": export.summary(),
           "blocks_read": json.loads((out / "quant_meta.json").read_text())["streamed"]["placement"]["blocks_read"]}
    if whole_too:
        with HostPeak() as whole:  # the control: the same checkpoint loaded whole, as the in-memory export does
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        got["whole"] = whole.summary()
    print(json.dumps(got))
""")


def _memory_run(model_dir: Path, out: Path, tmp: Path, whole_too: bool) -> dict:
    import os

    # as tests/quant/test_streaming.py: tensors of 1 MiB and more in their own mappings, returned when freed (a 7B's
    # always are), so the heap's fragmentation from this small model's tensors does not grow with the depth
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "QH_CACHE": str(tmp / "cache")}
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(model_dir), str(out), "1" if whole_too else "0"],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0
    return got


@pytest.mark.slow  # two fresh processes and a 230 MB checkpoint: about a minute; guards the streaming door's claim
def test_a_streamed_exports_host_memory_stays_within_a_few_blocks(tmp_path):
    """`experiments.export model.stream=true` of a 16-block Llama (480 MB as the fp32 model it is quantized in), in a
    fresh process: the host memory the whole command adds is the same, within one block, as for a 4-block model of the
    same widths, and below 40% of the model; the same process loading the model whole grows by the model's size."""
    from tests.quant.test_streaming import check_host_growth, memory_arch

    def checkpoint(layers: int):
        arch = memory_arch(layers)
        return synthetic.write_checkpoint(arch, tmp_path / f"syn{layers}", synthetic.WeightFormat(), seed=0), arch

    (shallow_dir, _), (deep_dir, arch) = checkpoint(4), checkpoint(16)
    shallow = _memory_run(shallow_dir, tmp_path / "awq4", tmp_path, False)
    deep_run = _memory_run(deep_dir, tmp_path / "awq16", tmp_path, True)
    assert shallow["blocks_read"] == 4 and deep_run["blocks_read"] == 16
    check_host_growth(arch, shallow["export"]["host_peak_growth_bytes"], deep_run["export"]["host_peak_growth_bytes"],
                      deep_run["whole"]["host_peak_growth_bytes"])
