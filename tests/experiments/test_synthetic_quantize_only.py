"""Issue 27, finding 10: a quantize-only run on random weights (model.weights=random) needs no tokenizer. On a fresh
machine the embedded SmolLM2 (whose tokenizer synthetic checkpoints borrow) is not converted, so the synthetic
checkpoint has no tokenizer files; the run calibrates on seeded random token ids below the model's vocabulary."""
from __future__ import annotations

import json

import pytest

from harness import synthetic
from tests.experiments.test_pipeline import cfg_of

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512, max_position_embeddings=256)


@pytest.fixture
def tiny_arch(tmp_path, monkeypatch):
    """A Llama-2-shaped architecture at a tiny size, as synthetic:tiny-llama, and an empty cache (QH_CACHE)."""
    arch_dir = tmp_path / "arch"
    arch_dir.mkdir()
    d = json.loads((synthetic.ARCH_DIR / "llama2-7b.json").read_text())
    d.update(name="tiny-llama", hf_config={**d["hf_config"], **TINY})
    (arch_dir / "tiny-llama.json").write_text(json.dumps(d))
    monkeypatch.setattr(synthetic, "ARCH_DIR", arch_dir)
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "empty-cache"))
    return "synthetic:tiny-llama"


def test_quantize_only_on_random_weights_needs_no_tokenizer(tmp_path, tiny_arch):
    from experiments import pipeline

    cfg = cfg_of(["model=llama2_7b_synthetic", f"model.path={tiny_arch}", "model.device=cpu", "model.dtype=float32",
                  "quant=awq_w4", "quant.group_size=64", "quant.calib.n_samples=4", "quant.calib.seqlen=32",
                  "quant.n_grid=4", "quant.clip_n_grid=4", "eval=none", "progress=false",
                  f"results_dir={tmp_path / 'results'}"])
    assert synthetic.default_tokenizer_dir() is None  # the embedded model is not converted in this cache
    rec = pipeline.run(cfg)
    model_dir = tmp_path / "empty-cache" / "synthetic"
    assert not any(model_dir.rglob("tokenizer*"))  # no tokenizer anywhere: none was needed
    assert rec["status"] == "complete" and rec["metrics"]["quant"]
    assert rec["provenance"]["data_sha256"] == {s: synthetic.RANDOM_IDS for s in cfg.data.splits}
    assert rec["provenance"]["bos_token_id"] is None


def test_random_calibration_ids_are_seeded_and_fit_the_vocabulary():
    from harness.config import CalibConfig

    get, state = synthetic.random_calibration(CalibConfig(n_samples=3, seqlen=40, seed=5), 512)
    ids = get()
    assert ids.shape == (3, 40) and int(ids.max()) < 512 and int(ids.min()) >= 0 and state["samples"] is ids
    again, _ = synthetic.random_calibration(CalibConfig(n_samples=3, seqlen=40, seed=5), 512)
    other, _ = synthetic.random_calibration(CalibConfig(n_samples=3, seqlen=40, seed=6), 512)
    assert again().equal(ids) and not other().equal(ids)
