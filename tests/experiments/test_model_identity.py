"""Issue 27, finding 11: a model given by path (model.path=<dir> or <file>.gguf with the default model group) is named
and described by itself, not by the embedded SmolLM2 whose option it was given under: its name comes from its path,
its reference note from the loaded model (model_type, origin, weights' sha), unless the user sets them."""
from __future__ import annotations

import pytest

from harness.compose import compose
from harness.config import model_name_of
from tests.experiments.test_pipeline import SMALL


def test_a_model_option_keeps_its_own_name_and_note():
    cfg = compose([])
    assert cfg.model.name == "smollm2-135m-instruct" and "SmolLM2-135M-Instruct Q4_1 GGUF" in cfg.model.reference_note
    cfg = compose(["model=gemma3_270m", "model.path=embedded:gemma-3-270m"])  # its own path, given again
    assert cfg.model.name == "gemma-3-270m" and "Gemma-3-270M" in cfg.model.reference_note


@pytest.mark.parametrize("path, name", [("/data/models/Qwen2-0.5B-Instruct-Q4_0.gguf", "Qwen2-0.5B-Instruct-Q4_0"),
                                        ("/data/ckpt/tiny-qwen2/", "tiny-qwen2"), ("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"),
                                        ("embedded:smollm2-135m-instruct", "smollm2-135m-instruct")])
def test_another_path_under_an_option_is_named_by_its_path(path, name):
    assert model_name_of(path) == name
    for option in ("gemma3_270m", "llama2_7b", "smollm2_135m_synthetic"):
        cfg = compose([f"model={option}", f"model.path={path}"])
        assert cfg.model.name == name and cfg.model.reference_note == ""
    cfg = compose([f"model.path={path}", "model.name=mine", "model.reference_note=my note"])
    assert cfg.model.name == "mine" and cfg.model.reference_note == "my note"


def test_records_of_a_local_qwen2_are_headed_by_that_model(tmp_path, smollm2_resolved, monkeypatch):
    from experiments import pipeline
    from tests.experiments.tiny import tiny_checkpoint

    d = tiny_checkpoint(tmp_path / "tiny-qwen2", smollm2_resolved.directory, model_type="qwen2")
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    base = SMALL + ["eval.perplexity.seqlen=32", "data.splits=[milton]", f"model.path={d}", "model.dtype=float32",
                    f"results_dir={tmp_path / 'results'}"]
    rec = pipeline.run(compose(base))
    assert rec["config"]["model"]["name"] == "tiny-qwen2" and rec["config"]["model"]["reference_note"] == ""
    note = rec["provenance"]["reference_note"]
    assert note == f"FP16 reference = qwen2 weights of local directory {d} ({rec['provenance']['model_sha']})"
    assert "SmolLM2" not in note and "smollm2" not in str(rec["config"]["model"])
    smol = compose(SMALL + ["data.splits=[milton]", f"results_dir={tmp_path / 'results'}"])
    assert rec["run_id"] != pipeline.run_id(smol)
    # the user's own name and note stand, in the config and in the record's provenance
    mine = pipeline.run(compose(base + ["model.name=qwen-tiny", "model.reference_note=a tiny random Qwen2"]))
    assert mine["config"]["model"]["name"] == "qwen-tiny" and mine["provenance"]["reference_note"] == "a tiny random Qwen2"
