"""Issue 27, finding 5: `app.serve -- quant=awq_w4 kv=int8` must serve the quantized weights, not the FP16 folder.
A weight quant of a real model is exported through experiments.export (quantized-weight cache + AWQ GEMM export) and
that folder is served with `--model-format awq`; the command line is built by a pure function and checked here on the
CPU. Without a GPU or LMDeploy, serve fails with the preflight line experiments.run gives, before any work."""
from __future__ import annotations

import pytest

import app.serve as S
from backends import lmdeploy as lb
from harness.compose import compose
from harness.config import ConfigError


@pytest.fixture
def tiny_dir(tmp_path, smollm2_resolved, monkeypatch):
    from tests.experiments.tiny import tiny_checkpoint

    d = tiny_checkpoint(tmp_path / "tiny-llama", smollm2_resolved.directory)
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    return d


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_a_weight_quant_is_exported_and_served_as_awq(tmp_path, tiny_dir):
    from harness.outputs import read_manifest
    from harness.records import run_id

    cfg = compose(["backend=lmdeploy", f"model.path={tiny_dir}", "quant=rtn_w4", "quant.group_size=64", "kv=int8",
                   "progress=false"])
    model_dir, exported = S.serving_dir(cfg, export_root=tmp_path / "serve")
    assert exported and model_dir == tmp_path / "serve" / run_id(cfg)
    assert lb.checkpoint_format(model_dir) == "awq" and read_manifest(model_dir)["run_id"] == run_id(cfg)
    argv = S.server_argv(cfg, model_dir, "127.0.0.1", 23333, "pytorch", api_keys=[])
    assert argv[1:6] == ["-m", "lmdeploy", "serve", "api_server", str(model_dir)]
    assert _flag(argv, "--model-format") == "awq" and _flag(argv, "--dtype") == "float16"
    assert _flag(argv, "--quant-policy") == "8"  # kv=int8
    again, exported = S.serving_dir(cfg, export_root=tmp_path / "serve")  # the harness's own folder: replaced
    assert again == model_dir and exported


def test_an_unquantized_folder_is_never_served_under_a_weight_quant(tiny_dir):
    cfg = compose(["backend=lmdeploy", f"model.path={tiny_dir}", "quant=awq_w4"])
    with pytest.raises(ConfigError, match=rf"^quant.method: awq — {tiny_dir} holds unquantized weights — "):
        S.server_argv(cfg, tiny_dir, api_keys=[])
    fp16 = S.server_argv(compose(["backend=lmdeploy", f"model.path={tiny_dir}"]), tiny_dir, api_keys=[])
    assert "--model-format" not in fp16 and fp16[5] == str(tiny_dir)


def _boom(*a, **k):
    raise AssertionError("a model was resolved or exported before the preflight")


def test_without_a_gpu_serve_gives_the_preflight_line_of_experiments_run(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lb, "resolve_model_dir", _boom)
    monkeypatch.setattr(S, "serving_dir", _boom)
    with pytest.raises(ConfigError) as expected:  # what experiments.run's prepare raises for backend=lmdeploy
        lb.LMDeployBackend().preflight(compose(["backend=lmdeploy", "quant=awq_w4"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        S.main(["--", "quant=awq_w4", "kv=int8"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {expected.value}\n"


def test_a_method_lmdeploy_cannot_load_from_an_awq_export_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(lb.LMDeployBackend, "preflight", lambda self, cfg: None)  # as on a GPU machine
    monkeypatch.setattr(lb, "resolve_model_dir", _boom)
    with pytest.raises(SystemExit) as e:
        S.main(["--", "quant=smoothquant_w8a8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: quant.method: smoothquant — the AWQ GEMM format holds")
    assert len(err.strip().splitlines()) == 1


def test_chat_through_lmdeploy_talks_to_the_exported_quantized_weights(tiny_dir, monkeypatch):
    """app.chat's LMDeploy backend starts the engine on the folder app.serve would serve (the AWQ export of a weight
    quant), never on the FP16 folder under the quant's name."""
    import argparse

    from app import chat

    seen = {}

    class Started(Exception):
        pass

    def fake_pipeline(cfg, model_dir):
        seen["dir"] = model_dir
        raise Started

    monkeypatch.setattr(lb, "make_pipeline", fake_pipeline)
    opts = argparse.Namespace(synthetic_root=None, tokenizer=None, max_new_tokens=8, temperature=0.0)
    cfg = compose(["backend=lmdeploy", f"model.path={tiny_dir}", "quant=rtn_w4", "progress=false"])
    with pytest.raises(Started):
        chat.CHAT_BACKENDS.get("lmdeploy")(cfg, opts)
    assert seen["dir"] != tiny_dir and lb.checkpoint_format(seen["dir"]) == "awq"
    with pytest.raises(Started):
        chat.CHAT_BACKENDS.get("lmdeploy")(compose(["backend=lmdeploy", f"model.path={tiny_dir}"]), opts)
    assert seen["dir"] == tiny_dir  # FP16: the model's own folder
