"""One front door (issue 28): the run, the export, the web page's models and the quality benchmarks all go through the
stages of experiments/stages.py, so a bad config is refused by the same check, with the same line, before any weight
loads, whichever door it came in by; and the web page looks for exactly the quantized weights a run cached."""
from __future__ import annotations

import pytest

from harness.config import ConfigError
from tests.experiments.test_pipeline import SMALL, cfg_of


def _boom(*a, **k):
    raise AssertionError("the model was loaded before the config was checked")


def _refusals(cfg, tmp_path) -> dict[str, str]:
    """The error each front door raises for `cfg`."""
    from app.local_models import LocalModels
    from benchmarks.common import quality_config, quality_row
    from experiments import export, pipeline

    bench = quality_config("milton", 2, quant=cfg.quant, seqlen=64, results_dir=str(tmp_path))
    doors = {"run": lambda: pipeline.run(cfg), "export": lambda: export.export(cfg, tmp_path / "out"),
             "app": lambda: LocalModels(cfg.model, progress=False).get(cfg), "benchmark": lambda: quality_row(bench)}
    out = {}
    for door, call in doors.items():
        with pytest.raises(ConfigError) as e:
            call()
        out[door] = str(e.value)
    return out


@pytest.mark.parametrize("overrides, starts", [
    (["quant=rtn_w4", "quant.group_size=128"], "quant.group_size=128 does not divide in_features=576"),
    (["quant=awq_w4", "quant.calib.seqlen=9000"],
     "quant.calib.seqlen: 9000 — smollm2-135m-instruct has 8192 positions"),
])
def test_every_front_door_refuses_a_bad_config_with_the_same_line_before_loading(tmp_path, monkeypatch, overrides,
                                                                                  starts):
    monkeypatch.setattr("harness.models.load_model", _boom)
    said = _refusals(cfg_of(SMALL + overrides + [f"results_dir={tmp_path}"]), tmp_path)
    assert len(set(said.values())) == 1, said
    assert said["run"].startswith(starts) and "\n" not in said["run"], said["run"]
    assert not (tmp_path / "out").exists() and not list((tmp_path / "runs").glob("*.json"))


def test_prepare_without_evaluation_checks_only_what_quantizing_needs(tmp_path):
    """The export and the web page evaluate nothing: an evaluation setting past the model's positions, or a results
    folder that cannot be written, is not theirs to refuse; the calibration still is checked."""
    from experiments.stages import prepare

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = cfg_of(SMALL + ["quant=awq_w4", "quant.calib.n_samples=4", "eval.perplexity.seqlen=20000",
                          f"results_dir={blocker}/results"])
    prep = prepare(cfg, evaluate=False)
    assert prep.windows == {} and prep.tokenizer is not None
    with pytest.raises(ConfigError, match="^results_dir: "):
        prepare(cfg)
    with pytest.raises(ConfigError, match=r"^quant\.calib\.seqlen: 9000"):
        prepare(cfg_of(SMALL + ["quant=awq_w4", "quant.calib.seqlen=9000"]), evaluate=False)


def test_the_web_page_finds_the_weights_a_run_cached(tmp_path, monkeypatch, smollm2_resolved):
    """A calibrated method on a tiny checkpoint: the run's record names the cache key its weights went under, and the
    web page's models compute that same key from the same stages, see the weights as cached, and restore them."""
    import torch

    from app.local_models import LocalModels
    from experiments import pipeline
    from quant import quantized_cache
    from tests.experiments.tiny import tiny_checkpoint

    monkeypatch.setattr(quantized_cache, "cache_dir", lambda: tmp_path / "cache")  # texts and tokens: the real cache
    d = tiny_checkpoint(tmp_path / "tiny", smollm2_resolved.directory)
    cfg = cfg_of(["quant=gptq_w4", "quant.calib.n_samples=4", "quant.calib.seqlen=64", "eval=none", "progress=false",
                  "data.splits=[milton]", f"model.path={d}", "model.dtype=float32", "eval.throughput.kernel=dequant",
                  f"results_dir={tmp_path / 'results'}"])
    rec = pipeline.run(cfg)
    key = rec["metrics"]["quant"]["cache_key"]
    pages = LocalModels(cfg.model, progress=False)
    assert pages.weights_key(cfg) == key and pages.state(cfg) == "cached"
    said = []
    model = pages.get(cfg, said.append)
    assert any("restoring quantized weights from the cache" in s for s in said), said
    fresh = pipeline.load(cfg, pipeline.prepare(cfg, evaluate=False))
    assert quantized_cache.load_into(key, fresh) is not None
    restored, page = fresh.state_dict(), model.state_dict()
    assert restored.keys() == page.keys() and all(torch.equal(restored[k], page[k]) for k in restored)
