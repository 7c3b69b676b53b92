"""backend.name picks who evaluates (backends/): hf runs the evaluators in this process; lmdeploy needs a GPU and
LMDeploy and says so before any model loads; the forward helper hands a KV cache to any pinned transformers."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from backends import BACKENDS
from backends.lmdeploy import LMDeployBackend
from eval.forward import cache_kwargs, forward
from harness.assets import REPO_ROOT
from harness.compose import compose
from harness.config import ConfigError


def test_registry_has_one_runner_per_backend_option():
    options = {p.stem for p in (REPO_ROOT / "conf" / "backend").glob("*.yaml")}
    assert options == set(BACKENDS.names()) == {"hf", "lmdeploy"}


def test_lmdeploy_preflight_names_the_field_without_gpu_or_package():
    cfg = compose(["backend=lmdeploy", "eval=ppl"])
    be = LMDeployBackend()
    with pytest.raises(ConfigError, match=r"^backend\.name: .*CUDA GPU.*backend=hf"):
        be.preflight(cfg, cuda_available=False)
    with pytest.raises(ConfigError, match=r"^backend\.name: .*pip install -e \.\[lmdeploy\]"):
        be.preflight(cfg, cuda_available=True, find_spec=lambda name: None)
    be.preflight(cfg, cuda_available=True, find_spec=lambda name: object())  # a GPU machine with LMDeploy: passes


def test_lmdeploy_preflight_refuses_evaluators_it_does_not_run():
    cfg = compose(["backend=lmdeploy", "eval=full"])
    with pytest.raises(ConfigError, match=r"eval\.word_perplexity\.enabled.*eval=ppl") as e:
        LMDeployBackend().preflight(cfg, cuda_available=True, find_spec=lambda name: object())
    assert "fidelity" not in str(e.value).split("only;")[1]  # fidelity runs through the engine's logits
    ok = compose(["backend=lmdeploy", "eval=ppl", "eval.fidelity.enabled=true"])
    LMDeployBackend().preflight(ok, cuda_available=True, find_spec=lambda name: object())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cli_backend_lmdeploy_fails_in_preflight_with_one_line(tmp_path):
    """Before this, `experiments.run backend=lmdeploy` ran transformers and labelled the record lmdeploy."""
    r = subprocess.run([sys.executable, "-m", "experiments.run", "backend=lmdeploy", "eval=ppl", f"results_dir={tmp_path}"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: backend.name: 'lmdeploy'")
    assert "Traceback" not in r.stderr and "loading" not in r.stderr
    assert not (Path(tmp_path) / "runs").exists() or not list((Path(tmp_path) / "runs").glob("*.json"))


def _tiny_llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_forward_fills_the_cache_it_is_given_without_deprecation_warnings():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 12))
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated argument name would raise here
        with torch.no_grad():
            full = forward(model, ids).logits
            forward(model, ids[:, :8], cache)
            step = forward(model, ids[:, 8:], cache).logits
    assert cache.get_seq_length() == 12  # the cache was used, not silently dropped
    torch.testing.assert_close(step, full[:, 8:], rtol=1e-4, atol=1e-5)


def test_cache_argument_name_follows_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return cache

    marker = object()
    assert cache_kwargs(Old(), marker) == {"past_key_values": marker, "use_cache": True}
    assert cache_kwargs(New(), marker) == {"cache": marker, "use_cache": True}
    assert cache_kwargs(New(), None) == {"use_cache": False}
    assert forward(Old(), None, marker) is marker and forward(New(), None, marker) is marker


def test_benchmark_rows_name_each_method_by_its_own_label():
    """The LMDeploy benchmark used to call every non-FP16 method "AWQ"; its rows now use harness.labels."""
    from benchmarks.lmdeploy_throughput import label

    assert label(compose(["quant=rtn_w4"])) == "RTN w4 g64"
    assert label(compose(["quant=awq_w4", "kv=int8"])) == "AWQ w4 g64 (search+clip) + KV int8"
    assert label(compose(["quant=fp16"])) == "FP16"
