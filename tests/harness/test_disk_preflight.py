"""The disk side of the preflight (issue 15): a cache that cannot be written or has no room is one warning and the run
goes on without caching; a results_dir without room or read-only is an error before any model loads (here through
benchmarks/fault_inject.py, which fails writes at the OS-call level as a full or read-only mount would); killed
writers' temp files are removed, a live writer's are not."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import assets

ROOT = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def tmp_name(target: str, host: str, pid: int) -> str:
    return f".{target}.{host}-{pid}-0123456789ab.tmp"


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    host = assets._writer_tag().rsplit("-", 1)[0]
    dead, live = tmp_name("a.json", host, dead_pid()), tmp_name("b.json", host, os.getppid())
    other_host, mine = tmp_name("c.json", "elsewhere", 1), tmp_name("d.json", host, os.getpid())
    old_foreign, record = tmp_name("e.json", "elsewhere", 2), "0123456789abcdef.json"
    for name in (dead, live, other_host, mine, old_foreign, record):
        (tmp_path / name).write_text("x")
    day_ago = time.time() - assets.STALE_TMP_AGE_S - 60
    os.utime(tmp_path / old_foreign, (day_ago, day_ago))
    removed = assets.remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead, old_foreign])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, other_host, mine, record])


def test_a_killed_atomic_write_leaves_a_temp_file_the_preflight_removes(tmp_path):
    from harness.records import check_results_dir

    runs = tmp_path / "runs"
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom harness.assets import atomic_file\n"
            "with atomic_file(Path(sys.argv[1])) as tmp:\n    tmp.write_text('{\"run')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", code, str(runs / "0123456789abcdef.json")], cwd=ROOT, timeout=60)
    assert p.returncode < 0 and len(list(runs.iterdir())) == 1
    check_results_dir(tmp_path)
    assert list(runs.iterdir()) == []


def test_cache_without_room_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("QH_CACHE", str(tmp_path))
    msgs = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 50 << 20))
    assert assets.check_cache_dir(40 << 20, msgs.append) and msgs == []
    assert not assets.check_cache_dir(300 << 20, msgs.append)
    assert msgs == [f"warning: the cache {tmp_path / 'quantized'} has 50 MiB free, this run may cache about 300 MiB; "
                    "running without caching quantized weights (free space or set QH_CACHE)"]


def test_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("QH_CACHE", str(tmp_path))
    (tmp_path / "quantized").write_text("a file where the folder should be")
    msgs = []
    assert not assets.check_cache_dir(0, msgs.append)
    assert len(msgs) == 1 and msgs[0].startswith(f"warning: the cache {tmp_path / 'quantized'} cannot be written (")


def test_quantize_cached_writes_nothing_when_the_cache_is_off(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant import quantized_cache
    from quant.rtn import RTNConfig
    from quant.registry import QuantContext

    monkeypatch.setenv("QH_CACHE", str(tmp_path))
    hf = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2)
    cfg = RTNConfig(group_size=32)
    for write, cached in ((False, False), (True, True)):
        model = AutoModelForCausalLM.from_config(hf)
        quantized_cache.quantize_cached(model, cfg, "sha", "float32", QuantContext(calibration=lambda: None), {},
                                        write_cache=write)
        assert quantized_cache.is_cached(quantized_cache.quant_key("sha", cfg, "float32")) is cached


@pytest.mark.parametrize("fault,strerror", [("QH_FAULT_ENOSPC", "No space left on device"),
                                            ("QH_FAULT_EROFS", "Read-only file system")])
def test_full_or_read_only_results_dir_fails_before_the_model_loads(tmp_path, fault, strerror):
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QH_FAULT_") and k != "HARNESS_DEBUG"}
    env[fault] = str(results)
    p = subprocess.run([sys.executable, "-m", "benchmarks.fault_inject", "experiments.run", "quant=rtn_w4",
                        f"results_dir={results}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    last = p.stderr.splitlines()[-1]
    assert p.returncode == 2 and last.startswith(f"error: results_dir: {results} — cannot write {results}/runs (")
    assert strerror in last and "[run] loading" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not results.exists() or all(not f for _d, _s, f in os.walk(results))  # nothing left behind
