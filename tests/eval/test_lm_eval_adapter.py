"""The harness's model wrapped for lm-eval gives lm-eval's own numbers: the local task's accuracy and perplexity
through the wrapper equal those of lm-eval's stock HFLM loading the same checkpoint. Bad task names fail at once."""
from __future__ import annotations

import time

import pytest
import torch

from harness.config import ConfigError

TASK = "lambada_shakespeare_heldout_local"


def test_local_task_matches_lm_eval_hflm(smollm2_resolved, smollm2_bf16_shared, tokenizer):
    from lm_eval.models.huggingface import HFLM

    from eval.lm_eval_adapter import HarnessLM
    from eval.tasks_eval import resolve_tasks, run_tasks

    tm = resolve_tasks([TASK])
    ours = run_tasks(HarnessLM(smollm2_bf16_shared, tokenizer, batch_size=8), [TASK], tm, limit=16)[TASK]
    stock = HFLM(pretrained=smollm2_resolved.directory, device="cpu", dtype=torch.bfloat16, batch_size=8,
                 softmax_dtype=torch.float32)  # the harness sums log-likelihoods in fp32 (HarnessLM)
    theirs = run_tasks(stock, [TASK], tm, limit=16)[TASK]
    assert ours["n"] == theirs["n"] == 16
    assert ours["acc"] == theirs["acc"]
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-9)
    assert 1 < ours["perplexity"] < 1e5


def test_local_task_data_is_reproducible():
    from eval.tasks import build

    text = "\n".join(["word " * 30 + "end.", "more words " * 20 + "EDEN,", "and so it goes on to the close"] * 3)
    ps = build.last_word_passages(text, min_words=50)
    assert ps == build.last_word_passages(text, min_words=50) and len(ps) >= 2
    for p in ps:
        last = p.split(" ")[-1]
        assert last.isalpha() and not last.isupper() and len(p.split(" ")) >= 50
    m = build.manifest(TASK)
    assert m["n_docs"] > 1000 and m == build.manifest(TASK)


def test_unknown_task_offline_lists_local_tasks(monkeypatch):
    from eval.tasks_eval import local_task_names, resolve_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="eval.tasks.names") as e:
        resolve_tasks(["hellaswag", TASK])
    assert time.perf_counter() - t0 < 10  # before any long work
    assert "hellaswag" in str(e.value) and all(n in str(e.value) for n in local_task_names())
    assert {"lambada_milton_local", TASK} <= set(local_task_names())
    with pytest.raises(ConfigError, match="empty"):
        resolve_tasks([])
