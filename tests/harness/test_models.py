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
