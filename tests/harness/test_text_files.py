"""Local text files as evaluation splits and calibration data (`file:<path>`, harness/text_files.py): the windows
come from the file, the file's content (not its path) is in the run's identity, bad files fail before any model
loads."""
from __future__ import annotations

import json

import pytest
import torch

from harness.config import ConfigError
from harness.data import calibration_provider, eval_windows, load_text, text_sha256, tokenize_cached
from harness.records import run_id
from tests.experiments.test_pipeline import SMALL, cfg_of

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and the cat watches it." for i in range(200))


def _cfg(split: str, *more: str):
    return cfg_of([f"data.splits=[{split}]", *SMALL, *more])


def test_plain_text_file_is_a_split_and_its_windows_come_from_the_file(tmp_path, tokenizer):
    from experiments.pipeline import prepare

    f = tmp_path / "own.txt"
    f.write_text(TEXT)
    cfg = _cfg(f"file:{f}")
    prep = prepare(cfg)
    name = f"file:{f}"
    want = eval_windows(tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0], 64, 2)
    assert torch.equal(prep.windows[name], want)
    assert prep.split_sha[name] == text_sha256(TEXT)[:16]


def test_jsonl_text_field_and_calibration(tmp_path, tokenizer):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"id": i, "text": f"Document {i}. " + "words " * 300}) for i in range(3)) + "\n")
    text = load_text(f"file:{f}")
    assert text == "\n\n".join(f"Document {i}. " + "words " * 300 for i in range(3))
    cfg = _cfg("milton", "quant=awq_w4", f"quant.calib.dataset=file:{f}", "quant.calib.n_samples=2",
               "quant.calib.seqlen=32")
    get, _ = calibration_provider(cfg.quant.calib, tokenizer)
    samples = get()
    ids = tokenize_cached(tokenizer, text)
    assert samples.shape == (2, 32)
    for s in samples:  # every sample is a stretch of the file's tokens
        starts = (ids[: ids.numel() - 31] == s[0]).nonzero().flatten().tolist()
        assert any(torch.equal(ids[i : i + 32], s) for i in starts)


def test_content_not_path_identifies_a_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(TEXT)
    assert run_id(_cfg(f"file:{a}")) == run_id(_cfg(f"file:{b}"))  # same text, another path: the same run
    rid = run_id(_cfg(f"file:{a}"))
    a.write_text(TEXT + "\nOne more line.")
    assert run_id(_cfg(f"file:{a}")) != rid  # an edited file is a new run ...
    assert text_sha256(load_text(f"file:{a}")) != text_sha256(TEXT)  # ... and a new data hash in the record
    calib = run_id(_cfg("milton", "quant=awq_w4", f"quant.calib.dataset=file:{a}"))
    b.write_text("something else entirely " * 50)
    assert run_id(_cfg("milton", "quant=awq_w4", f"quant.calib.dataset=file:{b}")) != calib


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no such file"),
    ("empty.txt", "  \n\n", "is empty"),
    ("bad.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n', "line 2 has no string field 'text'"),
    ("broken.jsonl", '{"text": "fine"}\nnot json\n', "line 2 is not JSON"),
])
def test_bad_files_fail_in_one_line_before_the_model_loads(tmp_path, monkeypatch, name, content, message):
    import experiments.pipeline as P

    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    monkeypatch.setattr("harness.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for cfg in (_cfg(f"file:{f}", f"results_dir={tmp_path}"),
                _cfg("milton", "quant=awq_w4", f"quant.calib.dataset=file:{f}", f"results_dir={tmp_path}")):
        with pytest.raises(ConfigError, match=message) as e:
            P.run(cfg)
        assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_quantized_weight_cache_keys_a_calibration_file_by_content(tmp_path):
    from quant.quantized_cache import quant_key

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(TEXT)
    q = lambda f: _cfg("milton", "quant=awq_w4", f"quant.calib.dataset=file:{f}").quant  # noqa: E731
    key = quant_key("m", q(a), "bfloat16")
    assert quant_key("m", q(b), "bfloat16") == key
    a.write_text(TEXT + " edited")
    assert quant_key("m", q(a), "bfloat16") != key
    # embedded sources keep their keys (no file: nothing is read)
    plain = _cfg("milton", "quant=rtn_w4").quant
    assert quant_key("m", plain, "bfloat16") == quant_key("m", plain, "bfloat16")


# ----------------------------------------------------------------------------------------- text that is not text


@pytest.mark.parametrize("name,blob", [("nul.txt", b"\0" * 4096), ("mostly_nul.txt", b"a b c " + b"\0" * 600),
                                       ("escapes.jsonl", json.dumps({"text": "\x1b\x07" * 50 + "ok"}).encode()),
                                       ("punctuation.txt", b"... --- !!! ???\n" * 20)])
def test_a_file_that_is_not_text_is_refused_when_read(tmp_path, name, blob):
    """Issue 27, finding 6: a file of NUL bytes is valid UTF-8, and was scored (PPL 1.4e9) as if it were a text."""
    f = tmp_path / name
    f.write_bytes(blob)
    with pytest.raises(ConfigError) as e:
        load_text(f"file:{f}")
    msg = str(e.value)
    assert msg.startswith(f"text source: file:{f} — not text: ") and "\n" not in msg and "UTF-8 text" in msg


def test_a_few_control_characters_in_a_real_text_pass(tmp_path):
    f = tmp_path / "ff.txt"
    f.write_text(TEXT.replace("Line 7:", "\x0cLine 7:\x1b"))  # a form feed (layout) and one stray escape
    assert load_text(f"file:{f}").count("\x1b") == 1


def test_a_nul_split_fails_before_the_tokenizer_or_the_model_loads(tmp_path, monkeypatch):
    from experiments import pipeline

    def boom(*a, **k):
        raise AssertionError("loaded before the text was checked")

    monkeypatch.setattr("harness.models.load_model", boom)
    monkeypatch.setattr("harness.models.load_tokenizer", boom)
    f = tmp_path / "nul.txt"
    f.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match=r"not text: 4096 of 4096 characters are control characters \(first: 0x00"):
        pipeline.run(_cfg(f"file:{f}", f"results_dir={tmp_path / 'results'}"))
