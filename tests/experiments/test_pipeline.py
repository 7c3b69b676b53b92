"""The Hydra entry point end to end on the embedded model: composition, validation before long work, one record per
run keyed by the config, and reuse of an existing record."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness.config import ConfigError, register_schemas, to_run_config
from harness.models import ModelUnavailableError
from harness.records import run_id

CONF = str(Path(__file__).resolve().parents[2] / "conf")
SMALL = ["eval.perplexity.seqlen=64", "eval.perplexity.max_windows=2", "eval.perplexity.batch_size=2", "progress=false"]


def cfg_of(overrides):
    register_schemas()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=overrides))


def test_every_config_option_composes_and_validates():
    for group in ("model", "data", "eval", "quant", "kv", "backend", "experiment"):
        for f in sorted((Path(CONF) / group).glob("*.yaml")):
            key = f"+experiment={f.stem}" if group == "experiment" else f"{group}={f.stem}"
            cfg_of([key])


@pytest.mark.parametrize("override, field", [
    ("quant=rtn_w4 quant.w_bit=9", "quant.w_bit"),
    ("kv.bits=3", "kv.bits"),
    ("eval.perplexity.seqlen=1", "eval.perplexity.seqlen"),
    ("model.dtype=int8", "model.dtype"),
    ("quant=rtn_w4 quant.group_fallback=nearest", "quant.group_fallback"),
    ("quant=awq_w4 quant.scale_grid=golden", "quant.scale_grid"),
    ("quant=awq_w4 quant.search_tokens=-1", "quant.search_tokens"),
])
def test_bad_values_fail_at_load_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg_of(override.split())


def test_unknown_field_and_unknown_option_fail_at_composition():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError

    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        cfg_of(["quant.bitz=4"])
    with pytest.raises(ConfigCompositionException):
        cfg_of(["model=no_such_model"])


def test_run_id_is_stable_and_ignores_output_location():
    a = cfg_of(SMALL)
    b = cfg_of(SMALL + ["results_dir=/elsewhere", "force=true"])
    c = cfg_of(SMALL + ["eval.perplexity.max_windows=3"])
    assert run_id(a) == run_id(b) != run_id(c)


def test_bad_input_fails_before_the_model_loads(tmp_path, monkeypatch):
    from experiments import pipeline

    def boom(*a, **k):
        raise AssertionError("model loaded before the input was checked")

    monkeypatch.setattr("harness.models.load_model", boom)
    with pytest.raises(ValueError, match="seqlen"):
        pipeline.run(cfg_of(SMALL + ["eval.perplexity.seqlen=100000000", "eval.perplexity.max_windows=1", f"results_dir={tmp_path}"]))
    with pytest.raises(KeyError, match="text source"):
        pipeline.run(cfg_of(SMALL + ["data.splits=[no_such_split]", f"results_dir={tmp_path}"]))
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        pipeline.run(cfg_of(SMALL + ["model.path=/no/such/dir", f"results_dir={tmp_path}"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="model=smollm2_135m"):
        pipeline.run(cfg_of(SMALL + ["model=qwen2_5_0_5b", f"results_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"^quant\.method: no_such_method — no config is registered for it"):
        cfg_of(SMALL + ["quant.method=no_such_method", f"results_dir={tmp_path}"])


@pytest.mark.slow
def test_cli_writes_one_record_and_reuses_it(tmp_path):
    args = [sys.executable, "-m", "experiments.run", *SMALL, f"results_dir={tmp_path}"]
    root = Path(CONF).parent
    first = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    records = list((tmp_path / "runs").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["run_id"] == records[0].stem == run_id(cfg_of(SMALL))
    for split in ("milton", "shakespeare_heldout"):
        m = rec["metrics"]["perplexity"][split]
        assert m["windows"] == 2 and m["tokens_scored"] == 2 * 63 and 1 < m["token_ppl"] < 10_000
        assert m["tokens_per_s"] > 0
    prov = rec["provenance"]
    assert prov["model_sha"].startswith("gguf-sha256:") and "Q4_1" in prov["reference_note"]
    assert set(prov["data_sha256"]) == {"milton", "shakespeare_heldout"} and prov["versions"]["torch"]
    mtime = records[0].stat().st_mtime_ns
    second = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "reusing it" in second.stderr
    assert records[0].stat().st_mtime_ns == mtime  # not rewritten
    assert "loading" not in second.stderr  # the model was never loaded


def test_prepare_puts_the_bos_at_the_head_of_every_window():
    from experiments.pipeline import prepare

    forced = prepare(cfg_of(SMALL + ["data.add_bos=true"]))
    auto = prepare(cfg_of(SMALL))
    assert forced.bos_token_id == 1 and auto.bos_token_id is None  # SmolLM2's tokenizer adds no BOS itself
    for split, w in forced.windows.items():
        assert w.shape == auto.windows[split].shape and (w[:, 0] == 1).all()
        assert torch.equal(w[0, 1:], auto.windows[split].flatten()[: w.shape[1] - 1])


def _gguf_overrides():
    from harness.assets import embedded_gguf

    return [f"model.path={embedded_gguf()}", "model.name=smollm2-gguf", "model.reference_note="]


@pytest.mark.slow
def test_a_gguf_file_in_model_path_prepares():
    """The config comes from the GGUF's metadata (harness.models.load_config), the tokenizer from the same file."""
    from experiments.pipeline import prepare

    prep = prepare(cfg_of(SMALL + _gguf_overrides()))
    assert prep.resolved.gguf_file.endswith(".gguf") and prep.resolved.model_sha.startswith("gguf-sha256:")
    embedded = prepare(cfg_of(SMALL))
    for split, w in prep.windows.items():
        assert torch.equal(w, embedded.windows[split])  # one tokenizer, two packagings


@pytest.mark.slow
def test_a_gguf_file_runs_end_to_end(tmp_path):
    from experiments import pipeline

    rec = pipeline.run(cfg_of(SMALL + _gguf_overrides() + [f"results_dir={tmp_path}"]))
    ref = pipeline.run(cfg_of(SMALL + [f"results_dir={tmp_path}"]))
    assert rec["status"] == "complete" and rec["provenance"]["model_sha"] != ref["provenance"]["model_sha"]
    for split, m in rec["metrics"]["perplexity"].items():  # the same Q4_1 weights, dequantized either way
        assert m["token_ppl"] == pytest.approx(ref["metrics"]["perplexity"][split]["token_ppl"], rel=0.03)


def test_a_record_of_a_local_checkpoint_edited_in_place_is_not_reused(tmp_path, smollm2_resolved):
    """Issue 27, finding 4: the run_id names a local model by its path, so after an edit in place (size, inode and
    mtime kept) the old record was reused for the new weights. The record's model_sha is checked against the weights'
    identity now (hashed again after the edit: the memo's stamp holds the ctime), and the run is computed again."""
    from experiments import pipeline
    from harness.models import resolve_model
    from tests.experiments.tiny import tiny_checkpoint
    from tests.harness.test_models import _edit_in_place_keeping_size_and_mtime

    d = tiny_checkpoint(tmp_path / "tiny", smollm2_resolved.directory)
    cfg = cfg_of(SMALL + ["quant=rtn_w4", "data.splits=[milton]", "eval=ppl", f"model.path={d}",
                          "model.dtype=float32", f"results_dir={tmp_path / 'results'}"])
    first = pipeline.run(cfg)
    assert pipeline.record_exists(cfg)
    _edit_in_place_keeping_size_and_mtime(d / "model.safetensors")
    assert "made from other weights" in pipeline.stale_reason(first, cfg)
    assert not pipeline.record_exists(cfg)
    second = pipeline.run(cfg)
    assert second["run_id"] == first["run_id"]
    assert second["provenance"]["model_sha"] == resolve_model(cfg.model).model_sha != first["provenance"]["model_sha"]
    assert pipeline.record_exists(cfg)
