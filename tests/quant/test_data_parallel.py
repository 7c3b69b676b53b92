"""Data-parallel calibration (#18): two gloo processes, each with half of the calibration sequences, reduce every
statistic AWQ takes over the data (mean |x|, grid losses on the global search subset, clip Gram matrices, max |x|)
to what one process computes, up to float32 summation order, and pick the same alphas."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.assets import REPO_ROOT
from quant.calibration.reduce import Reducer
from tests.quant.dp_worker import CASES


def test_one_process_reducer_is_the_identity_and_shards_cover_the_data():
    r = Reducer()
    t = torch.tensor([1.5, -2.0])
    assert r.sum(t) is t and torch.equal(t, torch.tensor([1.5, -2.0])) and r.sum_float(3, 2.5) == [3, 2.5]
    assert r.shard(5) == slice(0, 5)
    shards = [Reducer(k, 3).shard(7) for k in range(3)]
    assert [list(range(7))[s] for s in shards] == [[0, 1], [2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks"):
        Reducer(0, 3).shard(2)


def _run(cmd, out):
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as torch.distributed.run sets it per rank: same GEMM rounding
    done = subprocess.run(cmd + [str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # three processes loading torch and the model: ~1.5 min here
def test_two_gloo_ranks_quantize_as_one_process(tmp_path):
    _run([sys.executable, "-m", "tests.quant.dp_worker"], tmp_path / "one")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
          "tests.quant.dp_worker"], tmp_path / "two")
    for case in CASES:
        one, two = (load_file(str(tmp_path / d / f"{case}.stats.safetensors")) for d in ("one", "two"))
        assert one.keys() == two.keys() and len(one) >= 9, case
        for k in one:  # block 0: the same inputs on both sides, so only the summation order differs
            torch.testing.assert_close(two[k].double(), one[k].double(), rtol=1e-5, atol=1e-6 * one[k].abs().max())
        a, b = (json.loads((tmp_path / d / f"{case}.json").read_text()) for d in ("one", "two"))
        assert a == b, case  # the same alphas
        one, two = (load_file(str(tmp_path / d / f"{case}.safetensors")) for d in ("one", "two"))
        codes = [k for k in one if k.startswith("codes.")]
        differ = sum((one[k] != two[k]).sum().item() for k in codes) / sum(one[k].numel() for k in codes)
        # a clipping threshold whose two grid candidates tie to float32 rounding may flip (as it does between two
        # thread counts in one process: 0.05-0.08% of codes here); measured 0-0.06%
        assert differ < 2e-3, (case, differ)
    # GPTQ: every rank accumulates the Hessian of its own sequences; reduced, it is the one process's Hessian (block 0:
    # only the summation order differs). GPTQ feeds each column's rounding error into the next columns, so a last-bit
    # difference in H changes some codes and then the columns after them (measured: 0.15% of block 0's codes; 10.5% of
    # block 1's, whose inputs come from the quantized block 0) at the same error: GPTQ's own loss per quantized group
    # agrees within 0.3% (measured 0.002-0.22%)
    one, two = (load_file(str(tmp_path / d / "gptq.stats.safetensors")) for d in ("one", "two"))
    assert sorted(one) == ["h0", "h1"]
    for k in one:
        torch.testing.assert_close(two[k].double(), one[k].double(), rtol=1e-5, atol=1e-6 * one[k].abs().max())
    a, b = (json.loads((tmp_path / d / "gptq.json").read_text()) for d in ("one", "two"))
    assert a.keys() == b.keys() and len(a) == 4 * 2
    for k in a:
        assert abs(b[k] - a[k]) <= 1e-2 * a[k], (k, a[k], b[k])
    one, two = (load_file(str(tmp_path / d / "gptq.safetensors")) for d in ("one", "two"))
    codes = [k for k in one if k.startswith("codes.model.layers.0.")]
    assert len(codes) == 7 and len([k for k in one if k.startswith("codes.")]) == 7 * 2
    differ = sum((one[k] != two[k]).sum().item() for k in codes) / sum(one[k].numel() for k in codes)
    assert differ < 1e-2, differ
