"""Fidelity to FP16: KL is 0 and top-1 agreement 1 for a model against itself; against a perturbed copy the KL,
agreement and PPL ratio match a float64 recomputation from the two models' full logits; the reference is cached and
never recomputed."""
from __future__ import annotations

import copy

import torch

from eval.fidelity import ReferenceStore, compare
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
