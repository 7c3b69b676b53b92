"""Fidelity to FP16: KL is 0 and top-1 agreement 1 for a model against itself; against a perturbed copy the KL,
agreement and PPL ratio match a float64 recomputation from the two models' full logits; the reference is cached and
never recomputed."""
from __future__ import annotations

import copy

import pytest
import torch

from eval.fidelity import ReferenceStore, compare, compare_logits
from quant.primitives import fake_quantize


def _windows(ids, n=2, seqlen=64):
    return ids[: n * seqlen].view(n, seqlen)


def test_self_kl_is_zero_and_reference_is_cached(smollm2_bf16_shared, milton_ids, tmp_path):
    model, windows = smollm2_bf16_shared, _windows(milton_ids)
    loads = []

    def load():
        loads.append(1)
        return model

    store = ReferenceStore("test-model", torch.bfloat16, "cpu", load, batch_size=2, root=tmp_path)
    hidden, key, hit = store.hidden(windows)
    head = store.head()
    assert not hit and hidden.shape == (2, 63, model.config.hidden_size) and hidden.dtype == torch.bfloat16
    res = compare(model, windows, hidden, head, batch_size=2)
    assert res["kl_mean"] < 1e-7 and res["kl_p99"] < 1e-6
    assert res["top1_agreement"] == 1.0
    assert abs(res["ppl_ratio"] - 1.0) < 1e-9 and res["positions"] == 2 * 63

    # a second run (a quantized config of the same model and data) finds it on disk and never loads the model
    again = ReferenceStore("test-model", torch.bfloat16, "cpu", None, batch_size=2, root=tmp_path)
    hidden2, key2, hit2 = again.hidden(windows)
    assert hit2 and key2 == key and torch.equal(hidden2, hidden) and torch.equal(again.head()["weight"], head["weight"])
    # other windows (or another model / dtype) are another entry
    assert ReferenceStore("test-model", torch.bfloat16, "cpu", load, 2, root=tmp_path).hidden(windows[:1])[2] is False
    assert len(loads) == 2


@torch.no_grad()
def test_metrics_match_float64_recomputation(smollm2_bf16_shared, milton_ids, tmp_path):
    ref, windows = smollm2_bf16_shared, _windows(milton_ids[5000:])
    quant = copy.deepcopy(ref)
    for layer in quant.model.layers:  # a real perturbation: RTN w3 g64 fake-quantized MLPs
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            lin.weight.data = fake_quantize(lin.weight.data.float(), 3, 64).to(lin.weight.dtype)

    store = ReferenceStore("test-model", torch.bfloat16, "cpu", lambda: ref, batch_size=2, root=tmp_path)
    res = compare(quant, windows, store.hidden(windows)[0], store.head(), batch_size=2)

    logp = torch.log_softmax(ref(windows).logits[:, :-1].double(), -1)
    logq = torch.log_softmax(quant(windows).logits[:, :-1].double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    tgt = windows[:, 1:, None]
    nll_p, nll_q = -logp.gather(-1, tgt).mean(), -logq.gather(-1, tgt).mean()
    assert res["kl_mean"] > 0.01  # the perturbation is visible
    assert abs(res["kl_mean"] - kl.mean().item()) < 1e-3 * kl.mean().item() + 1e-5
    assert abs(res["kl_p99"] - torch.quantile(kl.flatten(), 0.99).item()) < 2e-3 * res["kl_p99"] + 1e-5
    agree = (logp.argmax(-1) == logq.argmax(-1)).double().mean().item()
    assert abs(res["top1_agreement"] - agree) <= 2 / kl.numel()  # a near-tie may flip in bf16 vs float64
    assert abs(res["ppl_ratio"] - torch.exp(nll_q - nll_p).item()) < 1e-3


@torch.no_grad()
def test_engine_logits_path_scores_like_the_transformers_path(smollm2_bf16_shared, milton_ids, tmp_path):
    """backend=lmdeploy compares the engine's whole-sequence logits (`get_logits`, one call per batch of windows) with
    the same FP16 reference. A stand-in engine returning a perturbed model's own logits, one [len, vocab] tensor per
    sequence as LMDeploy does, gives the numbers the transformers path gives for that model; a source that leaves
    positions out is an error, not a smaller average."""
    from backends.lmdeploy import engine_q_chunks

    ref, windows = smollm2_bf16_shared, _windows(milton_ids[9000:], n=3)
    quant = copy.deepcopy(ref)
    for layer in quant.model.layers:
        lin = layer.mlp.down_proj
        lin.weight.data = fake_quantize(lin.weight.data.float(), 3, 64).to(lin.weight.dtype)
    store = ReferenceStore("test-model", torch.bfloat16, "cpu", lambda: ref, batch_size=2, root=tmp_path)
    hidden, head = store.hidden(windows)[0], store.head()

    class Engine:  # LMDeploy 0.18's shape: no Pipeline.get_logits, the async engine's coroutine run by _run
        calls = 0

        class async_engine:
            @staticmethod
            async def async_get_logits(input_ids):
                Engine.calls += 1
                return [quant(torch.tensor([ids])).logits[0] for ids in input_ids]

        @staticmethod
        def _run(coro):
            import asyncio
            import concurrent.futures

            fut = concurrent.futures.Future()
            fut.set_result(asyncio.run(coro))
            return fut

    want = compare(quant, windows, hidden, head, batch_size=2)
    got = compare_logits(engine_q_chunks(Engine), windows, hidden, head, 2, "cpu")
    assert Engine.calls == 2  # 3 windows in batches of 2
    assert want["kl_mean"] > 1e-3
    for k in ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "token_ppl", "positions"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k

    def short(ids):  # positions 0..T-3 only
        yield slice(0, ids.shape[1] - 2), quant(ids).logits[:, :-2]

    with pytest.raises(RuntimeError, match="positions got no logits"):
        compare_logits(short, windows, hidden, head, 2, "cpu")
