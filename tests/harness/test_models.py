"""Model identity is content: two same-size checkpoints that differ in one tensor get different identities and
different cache keys; each weight file is hashed once and re-hashed only when it changes."""
import os
import shutil

import pytest
import torch

from harness.config import ModelConfig
from quant.awq.config import AWQConfig
from quant.rtn import RTNConfig


@pytest.fixture
def two_copies(tmp_path, monkeypatch):
    """A tiny Llama checkpoint and a same-size copy with one tensor scaled x1.5; a private cache folder."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    torch.manual_seed(0)
    a = tmp_path / "a"
    LlamaForCausalLM(cfg).save_pretrained(a, safe_serialization=True)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    f = b / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, f, metadata={"format": "pt"})
    assert f.stat().st_size == (a / "model.safetensors").stat().st_size
    return a, b


def _resolve(path):
    from harness.models import resolve_model

    return resolve_model(ModelConfig(name="x", path=str(path)))


def test_same_size_copies_with_other_weights_differ_everywhere(two_copies):
    from eval.fidelity import reference_key
    from quant.quantized_cache import quant_key

    a, b = (_resolve(p) for p in two_copies)
    assert a.model_sha != b.model_sha and a.model_sha.startswith("weights-sha256:")
    q = RTNConfig()
    assert quant_key(a.model_sha, q, "bfloat16") != quant_key(b.model_sha, q, "bfloat16")
    w = torch.zeros(1, 8, dtype=torch.long)
    assert reference_key(a.model_sha, torch.bfloat16, "cpu", w) != reference_key(b.model_sha, torch.bfloat16, "cpu", w)
    # an identical copy elsewhere is the same model
    c = two_copies[0].parent / "c"
    shutil.copytree(two_copies[0], c)
    assert _resolve(c).model_sha == a.model_sha


def test_weight_files_are_hashed_once_and_again_when_touched(two_copies, monkeypatch):
    import harness.assets as assets

    a = two_copies[0]
    calls = []
    real = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p, *k: calls.append(p) or real(p, *k))
    first = _resolve(a).model_sha
    assert len(calls) == 1  # the one weight file
    assert _resolve(a).model_sha == first and len(calls) == 1  # unchanged: not read again
    f = a / "model.safetensors"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _resolve(a).model_sha == first and len(calls) == 2  # touched: hashed anew (same bytes, same identity)


def _after_a_clock_tick(path) -> None:
    """Return once a change made now gets a later ctime than `path` has: file times come from a coarse kernel clock
    (one tick, a few ms), so an edit in the same tick as the file's last change could keep its ctime."""
    probe = path.with_name(".tick")
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > path.stat().st_ctime_ns:
            return


def _edit_in_place_keeping_size_and_mtime(f) -> None:
    """One low mantissa bit of one weight flipped in the file itself (same inode, same size), its mtime set back."""
    from tests.quant.test_integrity import flip_low_mantissa_bit

    st = f.stat()
    _after_a_clock_tick(f)
    flip_low_mantissa_bit(f, "model.layers.0.mlp.down_proj.weight")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = f.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_an_edit_in_place_that_keeps_size_inode_and_mtime_is_hashed_again(two_copies):
    """The memo's stamp includes the ctime, which no user-space tool sets back (issue 27, finding 4: today's main kept
    the stale identity, so the edited weights' numbers went under the old model's)."""
    from harness.models import _dir_sha

    a = two_copies[0]
    first = _resolve(a).model_sha
    _edit_in_place_keeping_size_and_mtime(a / "model.safetensors")
    edited = _resolve(a).model_sha
    assert edited != first
    fresh = a.parent / "fresh"  # the same bytes in a new file: hashed from scratch, the same identity
    shutil.copytree(a, fresh)
    assert _dir_sha(fresh) == edited


@pytest.fixture
def converted(two_copies, tmp_path):
    """A checkpoint as harness.assets converts one: its files, their hashes (CONTENT_SHA), then .complete."""
    from harness import assets

    d = tmp_path / "converted"
    shutil.copytree(two_copies[0], d)
    assets.record_converted(d)
    (d / ".complete").write_text("marker")
    return d


def test_an_edited_converted_checkpoint_is_refused_naming_the_file(converted):
    """The harness's own conversion of an embedded GGUF is hashed once when written and checked whenever a file's
    stamp moves: an edit in place (size and mtime kept) is refused in one line naming the file and how to convert
    again; a touch or a copy of the same bytes passes (issue 27, finding 4: today's main scored an edited copy under
    the normal run_id)."""
    from harness import assets

    calls = []
    real = assets.sha256_file
    assets_sha = lambda p, *k: calls.append(p) or real(p, *k)  # noqa: E731
    gguf = converted.parent / "model.gguf"  # not read: the checkpoint is converted already
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assets, "sha256_file", assets_sha)
        assert assets._convert_gguf(gguf, converted, "marker", "x") == converted
        assert calls == []  # stamps unchanged: nothing read
        f = converted / "model.safetensors"
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assets.check_converted(converted, gguf)
        assert calls == [f]  # touched: hashed once, same bytes, and the new stamp remembered
        assets.check_converted(converted, gguf)
        assert calls == [f]
    _edit_in_place_keeping_size_and_mtime(f)
    with pytest.raises(assets.AssetError) as e:
        assets._convert_gguf(gguf, converted, "marker", "x")
    msg = str(e.value)
    assert "\n" not in msg and msg.count(" — ") == 2
    assert msg.startswith(f"{f}: changed since the harness converted it") and f"delete {converted}" in msg


@pytest.mark.parametrize("change", ["added", "missing"])
def test_a_file_added_to_or_removed_from_a_converted_checkpoint_is_refused(converted, change):
    from harness import assets

    if change == "added":
        (converted / "model-00002-of-00002.safetensors").write_bytes(b"extra")
    else:
        (converted / "generation_config.json").unlink()
    with pytest.raises(assets.AssetError, match=change):
        assets.check_converted(converted, converted / "model.gguf")


def test_a_conversion_from_before_hashes_is_recorded_once_unless_edited_after_it(converted, monkeypatch, capsys):
    from harness import assets

    (converted / assets.CONTENT_SHA).unlink()  # converted by an older harness
    assets.check_converted(converted, converted / "model.gguf")
    assert "converted before content hashes were kept" in capsys.readouterr().err
    assert (converted / assets.CONTENT_SHA).exists()
    (converted / assets.CONTENT_SHA).unlink()
    monkeypatch.setattr(assets, "LEGACY_SLACK_NS", 0)
    _edit_in_place_keeping_size_and_mtime(converted / "model.safetensors")  # after .complete was written
    with pytest.raises(assets.AssetError, match="model.safetensors: changed since the harness converted it"):
        assets.check_converted(converted, converted / "model.gguf")


def test_calibration_text_enters_the_quantized_cache_key():
    from quant.quantized_cache import quant_key

    awq = AWQConfig()
    k = [quant_key("m", awq, "bfloat16", {"text_sha256": t, "bos_token_id": None}) for t in ("aaaa", "bbbb")]
    assert k[0] != k[1]
    rtn = RTNConfig()  # calibration-free methods ignore it
    assert quant_key("m", rtn, "bfloat16", {"text_sha256": "aaaa"}) == quant_key("m", rtn, "bfloat16", None)


@pytest.mark.slow
def test_gemma3_270m_is_embedded_and_needs_its_bos():
    """The second embedded model: pinned, converted once, its tokenizer adds a BOS, and without it the model is lost
    (issue 14: Milton 20x512 token PPL ~98 with the BOS, 258.7 without)."""
    from eval.perplexity import ppl_metrics, window_nll
    from harness.data import bos_token_id, eval_windows, load_text, tokenize_cached
    from harness.models import load_model, load_tokenizer, resolve_model

    mc = ModelConfig(name="gemma-3-270m", path="embedded:gemma-3-270m")
    r = resolve_model(mc)
    assert r.model_sha == "gguf-sha256:a5fd3b62230aa5ec" and "Q4_K_M" in r.origin
    tok = load_tokenizer(r, mc)
    assert bos_token_id(tok, "auto") == tok.bos_token_id == 2
    model = load_model(r, mc)
    ids = tokenize_cached(tok, load_text("milton"))
    ppl = {}
    for bos in (2, None):
        nll, s = window_nll(model, eval_windows(ids, 512, 2, bos_id=bos), 2, progress=False)
        ppl[bos] = ppl_metrics(nll, s, 512)["token_ppl"]
    assert ppl[2] < 0.6 * ppl[None], ppl


def test_a_converted_tokenizer_that_splits_words_differently_is_refused(smollm2_resolved, tmp_path):
    """The embedded models' tokenizers are built by transformers from the GGUF, and that code changed between
    versions (5.17 made Gemma-3's a Unigram model without merges: words in pieces, Milton PPL 2e4). A converted
    checkpoint must tokenize the probe line to the tested ids or be refused before any number is computed; a pass is
    recorded so the check runs once."""
    from harness import assets

    src = assets.embedded_model_dir()  # checked on the way (the real conversion passes)
    assert (src / assets.PROBE_OK).exists()
    ids = assets.TOKENIZER_PROBES[src.name]
    copy = tmp_path / src.name
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("*.safetensors", assets.PROBE_OK))
    wrong = ids[:3] + [ids[3] + 1] + ids[4:]  # one id off
    with pytest.raises(assets.AssetError, match="does not tokenize the probe line.*Delete"):
        assets.check_tokenizer(copy, wrong)
    assert not (copy / assets.PROBE_OK).exists()
    assets.check_tokenizer(copy, ids)
    assert (copy / assets.PROBE_OK).exists()
    assets.check_tokenizer(copy, wrong)  # passed once: not loaded again
