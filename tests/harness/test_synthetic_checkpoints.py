"""Every synthetic architecture's checkpoint file, written at a tiny size, is what transformers reads as that model:
no missing or unexpected key, every tensor the one written. An architecture whose checkpoints name tensors otherwise
than its model (Mixtral: block_sparse_moe.experts.N.w1, renamed at load) is refused before anything is written, since
its experts would otherwise load as transformers' random initialisation."""
import pytest
import torch

from harness import synthetic

TINY = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "num_experts": 4,
        "num_local_experts": 4, "num_experts_per_tok": 2, "max_window_layers": 2}
ARCHS = sorted(p.stem for p in synthetic.ARCH_DIR.glob("*.json"))


def tiny(name: str) -> synthetic.Arch:
    arch = synthetic.load_arch(name)
    return synthetic.load_arch(name, **{k: v for k, v in TINY.items() if k in arch.hf_config})


@pytest.mark.parametrize("name", ARCHS)
def test_a_synthetic_checkpoint_loads_as_written_or_is_refused(name, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    arch = tiny(name)
    try:
        synthetic.check_writable(arch)
    except synthetic.CheckpointLayoutError as e:
        assert arch.hf_config["model_type"] == "mixtral" and "block_sparse_moe" in str(e), e
        with pytest.raises(synthetic.CheckpointLayoutError):
            synthetic.write_checkpoint(arch, tmp_path / "m", synthetic.WeightFormat())
        assert not (tmp_path / "m").exists()  # refused before anything was written
        return
    if arch.remote_code:
        pytest.skip(f"{name} travels with its configuration code only: its model is LMDeploy's, not transformers'")
    out = synthetic.write_checkpoint(arch, tmp_path / "m", synthetic.WeightFormat(), seed=3)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float16)
    assert not any(info.values()), info
    written = load_file(str(out / "model.safetensors"))
    params = dict(model.named_parameters())
    fused = [k for k in written if k not in params]  # experts fused by transformers at load (Qwen3-MoE)
    assert all(".experts." in k for k in fused), fused[:4]
    for k, t in written.items():
        if k in params:
            assert torch.equal(params[k].detach(), t), k
    if fused:  # expert 1's gate projection is the first half of the fused gate_up tensor's row 1
        key = next(k for k in fused if ".experts.1.gate_proj.weight" in k)
        fused_param = params[key.split(".experts.")[0] + ".experts.gate_up_proj"]
        assert torch.equal(fused_param[1, : written[key].shape[0]], written[key])
