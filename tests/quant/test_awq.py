"""AWQ: the scale fold is exact in floating point, the searches find what brute force finds, the layer maps fit
real (Llama, Gemma) and constructed (InternLM2) module trees, and the whole method beats RTN on real text."""
import copy

import pytest
import torch
import torch.nn as nn

from harness.config import CalibConfig
from quant.awq.config import AWQConfig
from quant.rtn import RTNConfig
from quant import METHODS, QuantContext
from quant.awq.fold import apply_scale_
from quant.awq.search import act_absmean, awq_scale, grid_points, group_gram, search_clip, search_scale
from harness.architectures import ARCHITECTURES, architecture_for
from quant.primitives import fake_quantize
from quant.surgery import quantizable_linears


def _block_out(block, x, kwargs):
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _rotary_kwargs(model, x):
    import inspect

    pos = torch.arange(x.shape[1])[None]
    rot = model.model.rotary_emb
    if "layer_type" in inspect.signature(rot.forward).parameters:  # Gemma-3: one table per layer type
        return {"position_embeddings": rot(x, pos, model.config.layer_types[0]), "attention_mask": None}
    return {"position_embeddings": rot(x, pos), "attention_mask": None}


@torch.no_grad()
def _check_fold_invariance(model, x):
    arch = architecture_for(model)
    block = model.model.layers[0]
    kwargs = _rotary_kwargs(model, x)
    before = _block_out(block, x, kwargs).double()
    g = torch.Generator().manual_seed(0)
    for grp in arch.groups:
        if grp.when is not None and not grp.when(block):
            continue
        n = block.get_submodule(grp.linears[0]).in_features
        s = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 0.5).float()  # scales over ~e^{+-1.5}
        apply_scale_(block, grp.prev_op, grp.prev_kind, grp.linears, s)
    after = _block_out(block, x, kwargs).double()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    return before, after


def test_scale_fold_leaves_llama_block_unchanged(smollm2_fp32):
    x = torch.randn(2, 16, 576)
    before, after = _check_fold_invariance(smollm2_fp32, x)
    assert before.abs().max() > 0.1  # the block does something


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_scale_fold_leaves_gemma_block_unchanged(model_type):
    """Gemma's RMSNorm scales by (1 + w): folding s there is (1 + w) / s - 1, not w / s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    for p in model.parameters():  # random norm weights, so (1 + w) differs from w
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 8, 64)
    _check_fold_invariance(model, x)
    # the plain-RMSNorm fold would be wrong here: check the test can tell
    wrong = copy.deepcopy(model)
    from quant.awq import fold

    norm_name = ARCHITECTURES.get(model_type).groups[0].prev_op
    blk = wrong.model.layers[0]
    s = torch.full((64,), 2.0)
    fold.fold_into_norm_(blk.get_submodule(norm_name), s, "norm")
    fold.scale_linears_([blk.get_submodule(n) for n in ARCHITECTURES.get(model_type).groups[0].linears], s)
    kw = _rotary_kwargs(model, x)
    assert (_block_out(blk, x, kw) - _block_out(model.model.layers[0], x, kw)).abs().max() > 1e-2


def test_search_clip_matches_brute_force_float64():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.rand(8, 1)
    w[0, 3] = 6.0  # an outlier: clipping it should help
    x = torch.randn(40, 64)
    got = search_clip(w, x, 4, 32, True, n_grid=20, max_shrink=0.5, oc_batch=4)
    xd = x.double().reshape(40, 2, 32)
    torch.testing.assert_close(group_gram(x, 32).double(), torch.einsum("ngi,ngj->gij", xd, xd) / 40, rtol=1e-5, atol=1e-6)
    # the Gram form does not depend on how the tokens are split: a precomputed Gram matrix gives the same thresholds
    torch.testing.assert_close(search_clip(w, None, 4, 32, True, oc_batch=3, gram=group_gram(x, 32, chunk=7)), got)
    ref = torch.empty(8, 2)
    for o in range(8):
        for gi in range(2):
            # a plain loop per (row, group): the quantizer runs in float32 like the search (symmetric clipping makes
            # min/scale land on exact .5 ties, which float32 and float64 may round differently); errors in float64
            wg, xg = w[o, gi * 32:(gi + 1) * 32], x[:, gi * 32:(gi + 1) * 32].double()
            org = wg.abs().max()
            errs = []
            for k in range(10):
                mv = org * (1 - k / 20)
                q = fake_quantize(wg.clamp(-mv, mv)[None], 4, 32, True)[0].double()
                errs.append(((xg @ q - xg @ wg.double()) ** 2).mean().item())
            ref[o, gi] = org * (1 - min(range(10), key=errs.__getitem__) / 20)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    assert (got < w.reshape(8, 2, 32).abs().amax(-1)).any()  # some groups are clipped: the search is not a no-op


def test_search_scale_picks_the_grid_point_with_least_output_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64) * torch.linspace(0.1, 8, 64)  # a few salient input channels
    x_mean = act_absmean(x)
    qw = lambda w, j: fake_quantize(w, 3, 32, True)  # noqa: E731
    s, alpha, losses = search_scale(lin, x, [lin], x_mean, qw, n_grid=10)
    w0 = lin.weight.data.clone()
    brute = []
    for i in range(10):
        sc = awq_scale(x_mean, i / 10)
        wq = qw(w0 * sc, 0) / sc
        brute.append(((x @ wq.T - x @ w0.T) ** 2).mean().item())
    assert alpha == min(range(10), key=brute.__getitem__) / 10
    assert list(losses) == [i / 10 for i in range(10)]
    torch.testing.assert_close(torch.tensor(list(losses.values())), torch.tensor(brute), rtol=1e-4, atol=1e-7)
    assert torch.equal(lin.weight.data, w0)  # restored
    assert min(brute) < brute[0]  # activation awareness helps here


@pytest.mark.parametrize("n_grid", [20, 10, 7])
def test_coarse_fine_grid_finds_the_minimum_of_every_unimodal_loss(n_grid):
    for best in range(n_grid):
        calls = []

        def loss(i):
            calls.append(i)
            return (i - best) ** 2 + 0.1 * i  # unimodal along the grid, minimum at `best`

        seen = grid_points(n_grid, "coarse_fine", loss)
        assert min(seen, key=loss) == best
        assert len(set(calls)) == len(seen) <= 9


def test_coarse_fine_scale_search_scores_a_subset_of_the_full_grid():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64) * torch.linspace(0.1, 8, 64)
    qw = lambda w, j: fake_quantize(w, 3, 32, True)  # noqa: E731
    _, a_full, l_full = search_scale(lin, x, [lin], act_absmean(x), qw, n_grid=20)
    _, a_cf, l_cf = search_scale(lin, x, [lin], act_absmean(x), qw, n_grid=20, strategy="coarse_fine")
    assert len(l_cf) <= 9 and all(l_cf[a] == pytest.approx(l_full[a], rel=1e-6) for a in l_cf)
    assert a_cf == min(l_cf, key=l_cf.get)  # the best of the points it scored
    assert l_cf[a_cf] <= l_full[0.0]  # never worse than no scaling (alpha 0 is always scored)
    with pytest.raises(ValueError, match="coarse_fine"):
        search_scale(lin, x, [lin], act_absmean(x), qw, n_grid=20, strategy="golden")


class _InternLM2Block(nn.Module):
    """A module tree of InternLM2's shape (fused wqkv, wo, w1/w3/w2, attention_norm/ffn_norm); no weights reachable."""

    def __init__(self, h=32, i=48):
        super().__init__()
        self.attention_norm = nn.RMSNorm(h)
        self.ffn_norm = nn.RMSNorm(h)
        self.attention = nn.Module()
        self.attention.wqkv = nn.Linear(h, 3 * h, bias=False)
        self.attention.wo = nn.Linear(h, h, bias=False)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(h, i, bias=False)
        self.feed_forward.w3 = nn.Linear(h, i, bias=False)
        self.feed_forward.w2 = nn.Linear(i, h, bias=False)

    def ffn(self, x):
        f = self.feed_forward
        return f.w2(nn.functional.silu(f.w1(self.ffn_norm(x))) * f.w3(self.ffn_norm(x)))

    def qkv(self, x):
        return self.attention.wqkv(self.attention_norm(x))


@torch.no_grad()
def test_internlm2_map_fits_a_constructed_tree_and_folds_exactly():
    arch = ARCHITECTURES.get("internlm2")
    torch.manual_seed(0)
    block = _InternLM2Block()
    for p in block.parameters():
        p.data.normal_(1.0, 0.3) if p.dim() == 1 else None
    for rel in arch.linears:
        assert isinstance(block.get_submodule(rel), nn.Linear)
    x = torch.randn(5, 32)
    ref_ffn, ref_qkv = block.ffn(x), block.qkv(x)
    for grp in arch.groups:
        n = block.get_submodule(grp.linears[0]).in_features
        apply_scale_(block, grp.prev_op, grp.prev_kind, grp.linears, torch.rand(n) + 0.5)
    torch.testing.assert_close(block.ffn(x), ref_ffn, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.qkv(x), ref_qkv, rtol=1e-4, atol=1e-5)


def test_unsupported_architecture_names_the_registry():
    class Cfg:
        model_type = "bloom"

    class M:
        config = Cfg()

    with pytest.raises(KeyError, match="unknown architecture"):
        architecture_for(M())


def _truncated(model, n_layers):
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:n_layers]
    m.config.num_hidden_layers = n_layers
    return m


def _calib(calib_ids, n, seqlen):
    from harness.data import calibration_samples

    return calibration_samples(calib_ids, n, seqlen, seed=0)


@torch.no_grad()
@pytest.mark.parametrize("search", [{}, {"scale_grid": "coarse_fine", "search_tokens": 1024}], ids=["llm-awq", "fast"])
def test_awq_beats_rtn_on_held_out_text_and_keeps_tied_embeddings(smollm2_fp32, calib_ids, milton_ids, search):
    """Two real blocks of SmolLM2, w3 g64: AWQ's hidden-state error on held-out Milton is below RTN's, with llm-awq's
    search (every grid point, whole sequences) and with the faster one (coarse-to-fine grid, random tokens)."""
    base = _truncated(smollm2_fp32, 2)
    held = milton_ids[: 4 * 128].view(4, 128)
    ref = base.model(held).last_hidden_state.double()
    errs = {}
    for name, q in {"rtn": RTNConfig(w_bit=3, group_size=64),
                    "awq": AWQConfig(w_bit=3, group_size=64, search_samples=8, n_grid=10,
                                       calib=CalibConfig(n_samples=16, seqlen=128), **search)}.items():
        m = copy.deepcopy(base)
        out = METHODS.get(q.method)(m, q, QuantContext(calibration=lambda: _calib(calib_ids, 16, 128), progress=False))
        errs[name] = (m.model(held).last_hidden_state.double() - ref).pow(2).mean().item()
        assert len(out.qtensors) == 14 and out.summary["layers_quantized"] == 14
        if name == "awq":
            assert out.summary["scale_grid"] == search.get("scale_grid", "full")
            assert out.summary["calibration"]["search_tokens"] == search.get("search_tokens", 0)
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(m.model.embed_tokens.weight, base.model.embed_tokens.weight, rtol=0, atol=0)
        for n, qt in out.qtensors.items():  # the model holds exactly the dequantized codes
            torch.testing.assert_close(m.get_submodule(n).weight, qt.dequantize(), rtol=0, atol=0)
    assert errs["awq"] < 0.9 * errs["rtn"], errs


def test_awq_rejects_nan_calibration_activations(smollm2_fp32, calib_ids):
    m = _truncated(smollm2_fp32, 1)
    m.model.embed_tokens.weight.data[:] = float("nan")
    q = AWQConfig(w_bit=4, group_size=64, calib=CalibConfig(n_samples=2, seqlen=32))
    with pytest.raises(FloatingPointError, match="NaN"):
        METHODS.get("awq")(m, q, QuantContext(calibration=lambda: _calib(calib_ids, 2, 32), progress=False))


def test_group_size_128_fails_fast_or_falls_back_per_channel(smollm2_fp32):
    m = _truncated(smollm2_fp32, 1)
    q = RTNConfig(w_bit=4, group_size=128)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=576 of model\.layers\.0\.self_attn\.q_proj"):
        METHODS.get("rtn")(m, q, QuantContext(calibration=lambda: None, progress=False))
    q.group_fallback = "per_channel"
    out = METHODS.get("rtn")(m, q, QuantContext(calibration=lambda: None, progress=False))
    # 576 = hidden size: q/k/v/o/gate/up fall back to per-channel; down_proj (in 1536 = 12 x 128) keeps g128
    assert sorted(out.summary["group_fallback_layers"]) == sorted(
        f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj"))
    assert out.qtensors["model.layers.0.mlp.down_proj"].group_size == 128
    assert out.qtensors["model.layers.0.mlp.up_proj"].group_size == 576
    assert len(quantizable_linears(m)) == 7


def _tiny_gemma3(n_layers=4):
    """A Gemma-3 text model with random weights whose layers differ in what the forward passes them: sliding layers
    (window 4, rotary theta 1e4) and a global one (full causal mask, theta 1e6), as the real 270M's every sixth."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           sliding_window_pattern=2, max_position_embeddings=64,
                           layer_types=["sliding_attention", "full_attention"] * (n_layers // 2))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model


@torch.no_grad()
def test_calibration_gives_every_block_the_inputs_the_real_forward_gives_it():
    from quant.calibration.capture import capture_block_inputs, run_block

    model = _tiny_gemma3()
    arch = architecture_for(model)
    samples = torch.randint(0, 128, (20, 24), generator=torch.Generator().manual_seed(0))  # 2 minibatches
    real = []
    hooks = [b.register_forward_hook(lambda m, a, o: real.append(o[0] if isinstance(o, tuple) else o))
             for b in model.model.layers]
    for i in range(0, 20, 16):  # the real forward, minibatch by minibatch as calibration runs it
        model(input_ids=samples[i : i + 16], use_cache=False)
    for h in hooks:
        h.remove()
    n = len(model.model.layers)
    real_out = [torch.cat(real[j::n]) for j in range(n)]

    calls = []  # capture records what each block is given and never runs a block's weights (no onloading needed)
    lin_hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.model.layers.modules()
                 if isinstance(m, torch.nn.Linear)]
    x, block_kwargs = capture_block_inputs(model, arch, samples)
    for h in lin_hooks:
        h.remove()
    assert calls == [] and all("forward" not in vars(b) for b in model.model.layers)
    assert len(block_kwargs) == n
    for j, block in enumerate(model.model.layers):
        x, _ = run_block(block, x, block_kwargs[j], [])
        torch.testing.assert_close(x, real_out[j], rtol=1e-10, atol=1e-10)
    # the old calibration (block 0's kwargs for every block) is measurably wrong on the global layer
    x0, _ = capture_block_inputs(model, arch, samples)
    x1, _ = run_block(model.model.layers[0], x0, block_kwargs[0], [])
    wrong, _ = run_block(model.model.layers[1], x1, block_kwargs[0], [])
    assert (wrong - real_out[1]).abs().max() > 1e-2


def test_awq_runs_on_a_model_with_sliding_and_global_layers():
    model = _tiny_gemma3().float()
    samples = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = AWQConfig(w_bit=4, group_size=16, search_samples=2, n_grid=4, clip_n_grid=4, clip_tokens=0,
                      calib=CalibConfig(n_samples=4, seqlen=16))
    out = METHODS.get("awq")(model, cfg, QuantContext(calibration=lambda: samples, progress=False))
    assert out.summary["layers_quantized"] == 7 * len(model.model.layers)


def test_streamed_input_statistics_equal_those_of_the_whole_activations():
    """What AWQ keeps of a Linear input, minibatch by minibatch (quant.awq.observe), against the same quantities taken
    from the whole activations in float64: mean |x|, max |x|, the kept sequences and tokens, and the Gram sums of the
    scaled inputs x / s over the clip tokens, from sums taken before s was known."""
    from quant.awq.observe import AWQInputObserver, scaled_gram
    from quant.calibration.reduce import Reducer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 12, 64, generator=g) * torch.linspace(0.1, 5, 64)  # 10 sequences of 12 tokens
    flat = x.reshape(-1, 64).double()
    clip_idx = torch.randperm(120, generator=g)[:40]
    search_idx = torch.randperm(120, generator=g)[:30].sort().values
    s = torch.exp(torch.randn(64, generator=g) * 0.7)
    for search in (None, search_idx):
        obs = AWQInputObserver(search_rows=3, search_idx=search, clip_idx=clip_idx, gram_groups=(16, 64), absmax=True)
        for i in range(0, 10, 4):  # minibatches of 4, 4, 2 sequences
            obs.add(x[i : i + 4])
        st = obs.result(Reducer())
        assert st.n == 120 and st.gram_n == 40
        torch.testing.assert_close(st.abssum / st.n, flat.abs().mean(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(st.absmax.double(), flat.abs().amax(0), rtol=0, atol=0)
        expect = x[:3] if search is None else flat[search].float().unsqueeze(0)
        torch.testing.assert_close(st.search, expect, rtol=0, atol=0)
        xs = flat[clip_idx] / s.double()
        for gs in (16, 64):
            ref = torch.stack([xs[:, j : j + gs].T @ xs[:, j : j + gs] for j in range(0, 64, gs)])
            torch.testing.assert_close(scaled_gram(st.grams[gs], s).double(), ref, rtol=1e-5, atol=1e-5)
