"""Early checks and one-line errors (issue 15): each bad input fails before any model loads (or, for weights that are
not finite, right after loading and before any quantization or evaluation), naming the field, the value, what is
allowed and the fix, without a traceback unless HARNESS_DEBUG=1; a corrupt record is skipped by the report and
recomputed by the pipeline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import records
from harness.config import ConfigError, ModelConfig
from harness.log import one_line_errors
from harness.models import check_device, first_nonfinite, load_model, resolve_model
from tests.experiments.test_pipeline import SMALL, cfg_of

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- results_dir


def test_results_dir_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as e:
        records.check_results_dir(blocker / "results")
    msg = str(e.value)
    assert msg.startswith(f"results_dir: {blocker / 'results'} — cannot write ") and "results_dir=" in msg


def test_results_dir_without_room_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    with pytest.raises(ConfigError, match=r"results_dir: .* has 4096 bytes free, too few for a record"):
        records.check_results_dir(tmp_path / "results")


def test_results_dir_check_leaves_nothing_behind(tmp_path):
    records.check_results_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and list((tmp_path / "runs").iterdir()) == []


def _boom(*a, **k):
    raise AssertionError("the model was loaded before the input was checked")


def test_pipeline_checks_results_dir_and_device_before_the_model_loads(tmp_path, monkeypatch):
    from experiments import pipeline

    monkeypatch.setattr("harness.models.load_model", _boom)
    monkeypatch.setattr("harness.models.resolve_model", _boom)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="^results_dir: "):
        pipeline.run(cfg_of(SMALL + [f"results_dir={blocker}/results"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^model.device: cuda — this machine has 0 CUDA device"):
            pipeline.run(cfg_of(SMALL + ["model.device=cuda", f"results_dir={tmp_path}"]))


# ----------------------------------------------------------------------------------------------- model.device


@pytest.mark.parametrize("device,match", [("gpu", "not a torch device name"), ("cuda:7", "CUDA device"),
                                          ("cpu", None)])
def test_device_is_checked(device, match):
    if match is None:
        check_device(ModelConfig(name="x", path="x", device=device))
        return
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ConfigError) as e:
        check_device(ModelConfig(name="x", path="x", device=device))
    assert str(e.value).startswith(f"model.device: {device} — ") and match in str(e.value)


# ----------------------------------------------------------------------------------------------- corrupt records


def _write_truncated(runs: Path, name: str = "0123456789abcdef") -> Path:
    runs.mkdir(parents=True, exist_ok=True)
    p = runs / f"{name}.json"
    p.write_text(json.dumps({"run_id": name, "status": "complete", "metrics": {}})[:25])
    return p


def test_report_skips_a_corrupt_record_naming_it(tmp_path, capsys):
    from report import build

    from tests.report.test_report import make_record

    rec = make_record()  # a whole record (its run_id the hash of its config: the report checks it)
    good = tmp_path / "runs" / f"{rec['run_id']}.json"
    bad = _write_truncated(tmp_path / "runs")
    good.write_text(json.dumps(rec))
    recs, _ = build.load(tmp_path)
    assert [r["run_id"] for r in recs] == [good.stem]
    err = capsys.readouterr().err
    assert f"skipping {bad}: not a readable record" in err


def test_pipeline_treats_a_corrupt_record_as_missing(tmp_path, monkeypatch, capsys):
    from experiments import pipeline

    cfg = cfg_of(SMALL + [f"results_dir={tmp_path}"])
    bad = _write_truncated(tmp_path / "runs", records.run_id(cfg))
    assert not pipeline.record_exists(cfg)

    class Recompute(Exception):
        pass

    def prepare(cfg):
        raise Recompute

    monkeypatch.setattr(pipeline, "prepare", prepare)
    with pytest.raises(Recompute):  # it goes on to compute the run
        pipeline.run(cfg)
    err = capsys.readouterr().err
    assert f"{bad}: not a readable record" in err and "recomputing" in err


# ----------------------------------------------------------------------------------------------- finite weights


def _tiny_checkpoint(d: Path, poison: dict[str, float]) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    for name, value in poison.items():
        m.get_parameter(name).data.view(-1)[:3] = value
    m.save_pretrained(d)
    return d


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_first_nonfinite_tensor_is_named_when_the_model_loads(tmp_path, value):
    first, later = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    d = _tiny_checkpoint(tmp_path / "m", {later: value, first: value})
    cfg = ModelConfig(name="tiny", path=str(d), dtype="float32")
    with pytest.raises(ConfigError) as e:
        load_model(resolve_model(cfg), cfg)
    assert str(e.value).startswith(f"model.path: {d} — tensor {first} has 3 NaN/Inf values of 4096; ")


def test_finite_model_passes(smollm2_bf16_shared):
    assert first_nonfinite(smollm2_bf16_shared) is None


def test_nan_weights_never_reach_quantization_or_a_record(tmp_path, monkeypatch, smollm2_resolved):
    from experiments import pipeline

    d = _tiny_checkpoint(tmp_path / "m", {"model.layers.1.self_attn.o_proj.weight": float("nan")})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_resolved.directory) / f, d / f)
    monkeypatch.setattr(pipeline, "quantize", _boom)
    cfg = cfg_of(SMALL + ["quant=rtn_w4", "data.splits=[milton]", f"model.path={d}", "model.dtype=float32",
                          f"results_dir={tmp_path / 'results'}"])
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.1\.self_attn\.o_proj\.weight has 3 NaN/Inf"):
        pipeline.run(cfg)
    assert list((tmp_path / "results" / "runs").iterdir()) == []


# ----------------------------------------------------------------------------------------------- one-line errors


def test_user_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    monkeypatch.delenv("HARNESS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e, one_line_errors(ConfigError):
        raise ConfigError("kv.bits: 3 — one of 16, 8, 4 — use kv.bits=8")
    assert e.value.code == 2 and capsys.readouterr().err == "error: kv.bits: 3 — one of 16, 8, 4 — use kv.bits=8\n"
    monkeypatch.setenv("HARNESS_DEBUG", "1")
    with pytest.raises(ConfigError), one_line_errors(ConfigError):
        raise ConfigError("kv.bits: 3")
    with pytest.raises(RuntimeError), one_line_errors(ConfigError):  # not a user error: its traceback shows
        raise RuntimeError("a bug")


def test_cli_prints_one_line_and_a_traceback_only_with_harness_debug(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = [sys.executable, "-m", "experiments.run", *SMALL, f"results_dir={blocker}/results"]
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_DEBUG"}
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2 and p.stderr.splitlines()[-1].startswith(f"error: results_dir: {blocker}/results — ")
    assert "Traceback" not in p.stderr and "loading" not in p.stderr, p.stderr
    # with HARNESS_DEBUG=1 the traceback shows (a config error: fails in about a second)
    p = subprocess.run([sys.executable, "-m", "experiments.run", "kv.bits=3"], cwd=ROOT,
                       env={**env, "HARNESS_DEBUG": "1"}, capture_output=True, text=True, timeout=180)
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError: kv.bits" in p.stderr


def test_a_record_that_cannot_be_written_at_the_end_is_a_named_error(tmp_path):
    from experiments import pipeline

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = cfg_of(SMALL + [f"results_dir={blocker}"])
    with pytest.raises(ConfigError, match=rf"^results_dir: {blocker} — writing {blocker}/runs/\w+\.json failed"):
        pipeline.write_record(records.record_path(cfg), {"run_id": "x"}, cfg)


def test_group_size_that_does_not_divide_a_layer_fails_before_the_model_loads(tmp_path, monkeypatch, smollm2_resolved):
    from transformers import AutoConfig

    from experiments import pipeline
    from quant.rtn import RTNConfig
    from quant.surgery import check_group_sizes

    hf = AutoConfig.from_pretrained(smollm2_resolved.directory).to_dict()
    with pytest.raises(ConfigError, match=r"quant.group_size=128 does not divide in_features=576 of model\.layers\.0\."):
        check_group_sizes(RTNConfig(group_size=128), hf)
    check_group_sizes(RTNConfig(group_size=128, group_fallback="per_channel"), hf)
    check_group_sizes(RTNConfig(group_size=64), hf)
    monkeypatch.setattr("harness.models.load_model", _boom)
    with pytest.raises(ConfigError, match="quant.group_size=128"):
        pipeline.run(cfg_of(SMALL + ["quant=rtn_w4", "quant.group_size=128", f"results_dir={tmp_path}"]))


# ----------------------------------------------------------------------------------------------- calibration


def test_calibration_that_cannot_fit_in_memory_is_refused(smollm2_resolved, monkeypatch):
    from transformers import AutoConfig

    from eval import memory
    from harness.config import CalibConfig

    hf = AutoConfig.from_pretrained(smollm2_resolved.directory)
    per_token = 5 * 576 + 1536  # bf16: x 2 bytes
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000 * 512 * per_token * 2)
    memory.check_calibration_fits(hf, CalibConfig(n_samples=128), "cpu")
    with pytest.raises(ConfigError) as e:
        memory.check_calibration_fits(hf, CalibConfig(n_samples=6000), "cpu")
    assert str(e.value).startswith("quant.calib.n_samples: 6000 — 6000 x 512 calibration tokens need about ")
    assert str(e.value).endswith("use at most quant.calib.n_samples=900")


def test_calibration_checks_run_before_the_model_loads(tmp_path, monkeypatch):
    from eval import memory
    from experiments import pipeline

    monkeypatch.setattr("harness.models.load_model", _boom)
    with pytest.raises(ConfigError, match=r"^quant.calib.seqlen: 100000000 — smollm2-135m-instruct has 8192 positions"):
        pipeline.run(cfg_of(SMALL + ["quant=awq_w4", "quant.calib.seqlen=100000000", f"results_dir={tmp_path}"]))
    short = tmp_path / "short.txt"  # within the positions, longer than the calibration text
    short.write_text("A short calibration text, far fewer than 512 tokens long. " * 5)
    with pytest.raises(ConfigError, match=r"^quant.calib.seqlen: 512 — the calibration text has \d+ tokens"):
        pipeline.run(cfg_of(SMALL + ["quant=awq_w4", f"quant.calib.dataset=file:{short}", f"results_dir={tmp_path}"]))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1 << 30)
    with pytest.raises(ConfigError, match=r"^quant.calib.n_samples: 6000 — "):
        pipeline.run(cfg_of(SMALL + ["quant=awq_w4", "quant.calib.n_samples=6000", f"results_dir={tmp_path}"]))


def test_weights_that_quantization_makes_nonfinite_are_named_and_never_cached(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant.rtn import RTNConfig
    from harness.registry import Registry
    from quant import quantized_cache
    from quant.registry import QuantContext, QuantOutcome

    class Broken:  # a cacheable method whose quantization leaves NaNs in one Linear
        def __call__(self, model, cfg, ctx):
            model.get_parameter("model.layers.1.mlp.up_proj.weight").data[0, :2] = float("nan")
            return QuantOutcome()

        def caches(self, cfg) -> bool:
            return True

    methods = Registry("quantization method")
    methods.add("rtn", Broken())
    monkeypatch.setattr(quantized_cache, "METHODS", methods)
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    hf = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(hf)
    cfg = RTNConfig()
    with pytest.raises(ConfigError, match=r"^quant.method: rtn — quantizing left 2 NaN/Inf values of 8192 in "
                                          r"model\.layers\.1\.mlp\.up_proj\.weight"):
        quantized_cache.quantize_cached(model, cfg, "sha", "float32", QuantContext(calibration=lambda: None), {})
    assert not quantized_cache.is_cached(quantized_cache.quant_key("sha", cfg, "float32"))


# ----------------------------------------------------------------------------------------------- the model's limits


@pytest.mark.parametrize("overrides,field,value", [
    (["eval.perplexity.seqlen=20000"], "eval.perplexity.seqlen", "20000"),
    (["quant=awq_w4", "quant.calib.seqlen=9000"], "quant.calib.seqlen", "9000"),
    (["eval.word_perplexity.enabled=true", "eval.word_perplexity.max_length=8193"], "eval.word_perplexity.max_length",
     "8193"),
    (["eval.throughput.enabled=true", "eval.throughput.prompt_len=8000", "eval.throughput.gen_len=500"],
     "eval.throughput.prompt_len", r"8000 \(\+ gen_len 500\)"),
])
def test_a_sequence_past_the_models_positions_fails_before_the_model_loads(tmp_path, monkeypatch, overrides, field,
                                                                           value):
    """Issue 27, finding 6: SmolLM2 has 8,192 positions (its config.json, read before any weight); a longer window
    would score the model outside its trained context and record that PPL as the model's."""
    from experiments import pipeline

    monkeypatch.setattr("harness.models.load_model", _boom)
    monkeypatch.setattr("harness.models.load_tokenizer", _boom)
    with pytest.raises(ConfigError, match=rf"^{field}: {value} — smollm2-135m-instruct has 8192 positions "
                                          r"\(max_position_embeddings\), .* — .*8192"):
        pipeline.run(cfg_of(SMALL + overrides + [f"results_dir={tmp_path}"]))


def test_a_sequence_at_the_models_positions_passes(smollm2_resolved):
    from harness.limits import check_positions, max_positions
    from harness.models import load_config

    cfg = cfg_of(SMALL + ["quant=awq_w4", "quant.calib.seqlen=8192", "eval.perplexity.seqlen=8192"])
    hf = load_config(smollm2_resolved, cfg.model)
    assert max_positions(hf) == 8192
    check_positions(cfg, hf)


def test_overrides_that_skip_every_linear_fail_before_the_model_loads(tmp_path, monkeypatch, smollm2_resolved):
    """Issue 27, finding 6: skipping every Linear ran and was labelled "RTN w4 g64 +overrides" on FP16 numbers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from experiments import pipeline
    from harness.config import LayerOverride
    from quant.rtn import RTNConfig
    from quant.surgery import check_group_sizes, plan_layers

    everything = RTNConfig(layer_overrides=[LayerOverride("*.self_attn.*", skip=True), LayerOverride("*", skip=True)])
    hf = AutoConfig.from_pretrained(smollm2_resolved.directory)
    with pytest.raises(ConfigError) as e:
        check_group_sizes(everything, hf.to_dict())
    assert str(e.value).startswith("quant.layer_overrides: skip *.self_attn.*, * — every Linear is skipped (210 of 210)")
    assert str(e.value).endswith("use quant=fp16 for the unquantized model, or narrow the skip patterns")
    tiny = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ConfigError, match=r"every Linear is skipped \(14 of 14\)"):  # on a loaded model too
        plan_layers(tiny, everything)
    assert len(plan_layers(tiny, RTNConfig(layer_overrides=[LayerOverride("*.self_attn.*", skip=True)])).quantized()) == 6
    monkeypatch.setattr("harness.models.load_model", _boom)
    with pytest.raises(ConfigError, match=r"^quant.layer_overrides: skip \* — every Linear is skipped"):
        pipeline.run(cfg_of(SMALL + ["quant=rtn_w4", "quant.layer_overrides=[{pattern:'*',skip:true}]",
                                     f"results_dir={tmp_path}"]))
