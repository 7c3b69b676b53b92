"""benchmarks/quantize_dp.py, the data-parallel quantization benchmark of issue 18, on the CPU: the launch commands,
the code comparison against a float reference of its own arithmetic, and (slow) the whole benchmark as a gloo dry run
on a small synthetic model: 1 process against 2 torchrun ranks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.quantize_dp import compare_qtensors, table, worker_command
from quant.primitives import quantize_tensor

ROOT = Path(__file__).resolve().parents[2]


def test_one_gpu_is_a_plain_process_and_n_gpus_go_through_torchrun(tmp_path):
    one = worker_command(1, tmp_path / "m", tmp_path, "llama2_7b_synthetic", 128, None, python="py")
    two = worker_command(2, tmp_path / "m", tmp_path, "llama2_7b_synthetic", 128, tmp_path / "ref", python="py")
    assert one[:3] == ["py", "-m", "benchmarks.quantize_dp"] and "--reference" not in one
    assert two[:5] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[5:7] == ["-m", "benchmarks.quantize_dp"] and two[two.index("--reference") + 1] == str(tmp_path / "ref")


def test_code_comparison_counts_exactly_what_differs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    q = quantize_tensor(w, 4, 32, True)
    a = {"l0": {"q": q.q, "scales": q.scales, "zeros": q.zeros}, "l1": {"q": q.q, "scales": q.scales, "zeros": q.zeros}}
    q2 = q.q.clone()
    flat = q2.view(-1)
    flat[:7] = (flat[:7].to(torch.int16) + 1).clamp(max=15).to(q2.dtype)
    changed = int((q2 != q.q).sum())
    b = {"l0": dict(a["l0"]), "l1": {"q": q2, "scales": q.scales * 1.001, "zeros": q.zeros}}
    res = compare_qtensors(a, b)
    assert res["codes"] == 2 * q.q.numel() and res["codes_differing"] == changed > 0
    assert res["layers_differing"] == 1 and res["first_layers_differing"] == ["l1"] and res["max_code_diff"] == 1
    assert abs(res["max_scale_rel_diff"] - 0.001 / 1.001) < 1e-6
    assert compare_qtensors(a, a)["codes_differing"] == 0
    with pytest.raises(ValueError, match="different layers"):
        compare_qtensors(a, {"l0": a["l0"]})


@pytest.mark.slow
def test_cpu_dry_run_of_the_whole_benchmark(tmp_path):
    """1 process against 2 gloo ranks on the synthetic SmolLM2 shape (8 x 64 tokens): both finish, the 2-rank run
    compares its codes with the 1-process run's and agrees on all but a sliver (tied clipping choices)."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "benchmarks.quantize_dp", "--out", str(out), "--model",
                        "smollm2_135m_synthetic", "--synthetic-root", str(tmp_path / "syn"), "--group-size", "64",
                        "--samples", "8", "--seqlen", "64", "--timeout", "600"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env={"OMP_NUM_THREADS": "1",
                                                                                    **__import__("os").environ})
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.loads((out / f"quantize_dp_{n}gpu.json").read_text()) for n in (1, 2))
    assert "error" not in one and "error" not in two, (one, two)
    assert one["calibration"]["per_rank"] == 8 and two["calibration"]["per_rank"] == 4
    ag = two["agreement_with_1gpu"]
    assert ag["layers"] == 30 * 7 and ag["share_differing"] < 0.005
    assert not (out / "codes_1gpu.safetensors").exists()
    assert "| 2 | 4 |" in table([one, two])
