"""No code from data (issue 15): the quantized-weight cache is safetensors + a JSON sidecar, read without pickle, so a
pickle planted in the cache is never executed (it is a miss, named in a warning); the cache round-trips bit for bit;
every other cache file on disk is read with `weights_only=True`; synthetic checkpoints live in the project's cache."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from quant.rtn import RTNConfig
from quant import quantized_cache
from quant.registry import METHODS, QuantContext

ROOT = Path(__file__).resolve().parents[2]


class _Plant:
    """Unpickling this runs os.system(...): creates the marker file. Only a pickle load would do that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_llama(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()


RTN = RTNConfig(w_bit=4, group_size=32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "quantized"


def test_cache_round_trips_bit_exactly(cache):
    model = _tiny_llama()
    outcome = METHODS.get("rtn")(model, RTN, QuantContext(calibration=lambda: None, progress=False))
    key = quantized_cache.quant_key("sha", RTN, "bfloat16")
    path = quantized_cache.save(key, model, outcome)
    assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
    assert quantized_cache.is_cached(key)

    fresh = _tiny_llama(seed=1)  # other random weights: everything must come from the cache
    back = quantized_cache.load_into(key, fresh)
    assert back is not None and back.summary["from_cache"] and back.timings_s == outcome.timings_s
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied
    assert back.qtensors.keys() == outcome.qtensors.keys()
    for n, q in outcome.qtensors.items():
        b = back.qtensors[n]
        assert torch.equal(b.q, q.q) and b.q.dtype == q.q.dtype and torch.equal(b.scales, q.scales)
        assert (b.zeros is None) == (q.zeros is None) and (q.zeros is None or torch.equal(b.zeros, q.zeros))
        assert (b.w_bit, b.group_size) == (q.w_bit, q.group_size)


@pytest.mark.parametrize("name", ["{key}.safetensors", "{key}.pt"])
def test_planted_pickle_is_never_executed(cache, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    key = quantized_cache.quant_key("sha", RTN, "bfloat16")
    cache.mkdir(parents=True)
    (cache / name.format(key=key)).write_bytes(pickle.dumps(_Plant(marker)))  # .pt: where version 3 kept it
    (cache / f"{key}.json").write_text('{"version": %d, "key": "%s", "qtensors": {}, "tied": {}, "summary": {}, '
                                       '"timings_s": {}}' % (quantized_cache.CACHE_VERSION, key))
    model = _tiny_llama()
    assert quantized_cache.load_into(key, model) is None  # a miss
    assert not marker.exists()
    if name.endswith(".safetensors"):
        err = capsys.readouterr().err
        assert str(cache / f"{key}.safetensors") in err and "miss" in err
    # and through quantize_cached: the run quantizes again and overwrites the planted file with a real cache
    out = quantized_cache.quantize_cached(model, RTN, "sha", "bfloat16", QuantContext(calibration=lambda: None,
                                          progress=False), {})
    assert not out.summary.get("from_cache") and not marker.exists()
    assert quantized_cache.load_into(key, _tiny_llama()) is not None


def test_truncated_cache_is_a_named_miss(cache, capsys):
    model = _tiny_llama()
    outcome = METHODS.get("rtn")(model, RTN, QuantContext(calibration=lambda: None, progress=False))
    key = quantized_cache.quant_key("sha", RTN, "bfloat16")
    path = quantized_cache.save(key, model, outcome)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert quantized_cache.load_into(key, _tiny_llama()) is None
    assert str(path) in capsys.readouterr().err


def _project_sources():
    """The project's own Python files: every layer's package (not virtualenvs, caches, or what travels in .device/)."""
    from tests.test_layers import LAYERS

    return [p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]


def test_no_pickle_loads_of_files_on_disk():
    """Every torch.load in the project's code passes weights_only=True; nothing calls pickle.load(s)."""
    offenders = []
    for p in _project_sources():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line:
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_synthetic_checkpoints_default_to_the_project_cache(tmp_path, monkeypatch):
    from harness import synthetic

    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    assert synthetic.default_root() == tmp_path / "cache" / "synthetic"
    for f in ("harness/synthetic.py", "app/chat.py", "app/serve.py", "app/web_session.py", "backends/lmdeploy.py",
              "benchmarks/lmdeploy_throughput.py"):
        assert "/tmp/synthetic" not in (ROOT / f).read_text(), f


def test_trust_remote_code_only_where_the_config_sets_it():
    """Only model presets that need custom modelling code set it; the loaders pass the config's value through."""
    from harness.compose import compose

    assert compose([]).model.trust_remote_code is False
    sets_it = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if "trust_remote_code: true" in p.read_text())
    assert sets_it == ["internlm2_1_8b_synthetic", "internlm2_chat_1_8b"]
    for p in _project_sources():
        text = p.read_text()
        assert "trust_remote_code=True" not in text and "trust_remote_code = True" not in text, p


def test_a_synthetic_checkpoint_runs_only_the_repositorys_code(tmp_path):
    """A reused synthetic checkpoint whose Python files differ from the repository's (what trust_remote_code would
    import) is written again, not loaded."""
    from harness import synthetic

    arch = synthetic.load_arch("internlm2-chat-1_8b")
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in arch.remote_code:
        (d / f).write_bytes((synthetic.ARCH_DIR / f).read_bytes())
    assert synthetic.code_is_ours(arch, d)
    (d / arch.remote_code[0]).write_text("import os; os.system('touch /tmp/pwned')\n")
    assert not synthetic.code_is_ours(arch, d)
    (d / arch.remote_code[0]).write_bytes((synthetic.ARCH_DIR / arch.remote_code[0]).read_bytes())
    (d / "modeling_extra.py").write_text("")
    assert not synthetic.code_is_ours(arch, d)
    assert synthetic.code_is_ours(synthetic.load_arch("smollm2-135m"), tmp_path)  # no code at all


def test_tensor_caches_load_without_code_and_survive_bad_files(tmp_path, capsys, monkeypatch):
    """The token and FP16-reference caches (harness.assets.load/save_cached_tensors): a planted pickle is a miss that
    runs nothing, a truncated file is a named miss, a write that fails is a warning."""
    from harness.assets import load_cached_tensors, save_cached_tensors

    marker = tmp_path / "pwned"
    planted = tmp_path / "tokens" / "x.pt"
    planted.parent.mkdir()
    torch.save({"ids": _Plant(marker)}, planted)
    assert load_cached_tensors(planted) is None and not marker.exists()
    assert str(planted) in capsys.readouterr().err

    good = tmp_path / "tokens" / "y.pt"
    save_cached_tensors({"weight": torch.arange(5), "softcap": None}, good)
    back = load_cached_tensors(good)
    assert torch.equal(back["weight"], torch.arange(5)) and back["softcap"] is None
    good.write_bytes(good.read_bytes()[:40])
    assert load_cached_tensors(good) is None and str(good) in capsys.readouterr().err

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", full)
    save_cached_tensors(torch.arange(3), tmp_path / "tokens" / "z.pt")  # no exception: a warning
    assert "could not write the cache file" in capsys.readouterr().err
    assert not (tmp_path / "tokens" / "z.pt").exists()


def test_a_cache_that_does_not_fit_the_model_is_a_miss_and_leaves_it_untouched(cache, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _tiny_llama()
    outcome = METHODS.get("rtn")(model, RTN, QuantContext(calibration=lambda: None, progress=False))
    key = quantized_cache.quant_key("sha", RTN, "bfloat16")
    path = quantized_cache.save(key, model, outcome)
    other_cfg = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    other = AutoModelForCausalLM.from_config(other_cfg).to(torch.bfloat16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert quantized_cache.load_into(key, other) is None
    assert str(path) in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
