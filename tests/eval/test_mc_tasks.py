"""The local four-way multiple-choice tasks (eval/tasks/build.py): deterministic, from evaluation text only, well
formed, and loaded and scored by lm-eval."""
from __future__ import annotations

import json

import pytest

from harness.corpus import EMBEDDED_SPLITS
from harness.data import load_text

MC = ["next_line_milton_mc4", "word_choice_shakespeare_mc4"]


def _rows(task):
    from eval.tasks import build

    with open(build.jsonl_path(task), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_builders_are_deterministic_and_seeded():
    from eval.tasks import build

    text = load_text("milton")
    a, b = build.next_line_items(text, n_items=50), build.next_line_items(text, n_items=50)
    assert a == b and a != build.next_line_items(text, n_items=50, seed=1)
    sh = load_text("shakespeare_heldout")
    assert build.word_choice_items(sh, n_items=50) == build.word_choice_items(sh, n_items=50)
    for task in MC:
        m = build.manifest(task)
        assert m == build.manifest(task) and m["n_docs"] >= 500


@pytest.mark.parametrize("task", MC)
def test_items_are_four_distinct_choices_from_evaluation_text(task):
    from eval.tasks import build

    split = build.LOCAL_SOURCES[task]
    assert EMBEDDED_SPLITS[split][1] == "evaluation"
    lines = [ln.strip() for ln in load_text(split).split("\n")]
    rows = _rows(task)
    assert len(rows) >= 500
    labels = [r["label"] for r in rows]
    assert set(labels) == {0, 1, 2, 3} and max(labels.count(k) for k in range(4)) < 0.35 * len(rows)  # ~uniform
    for r in rows:
        ch = r["choices"]
        assert len(ch) == 4 and len(set(ch)) == 4 and 0 <= r["label"] < 4
        line = lines[r["line"]]
        if task.startswith("next_line"):
            assert ch[r["label"]] == line  # the true next line, after the four before it
            assert r["context"] == "\n".join(lines[r["line"] - 4 : r["line"]])
            assert all(c in lines for c in ch)  # distractors: lines of the same work
        else:
            prefix = r["context"].split("\n")[-1]
            assert f"{prefix} {ch[r['label']]}" == line  # the right word, then the rest of the line
            rests = {c.split(" ", 1)[1] if " " in c else "" for c in ch}
            assert len(rests) == 1  # only the word differs


def test_a_calibration_split_is_refused(monkeypatch):
    from eval.tasks import build

    monkeypatch.setitem(build.LOCAL_SOURCES, "next_line_milton_mc4", "shakespeare_calib")
    with pytest.raises(ValueError, match="calibration split"):
        build.jsonl_path("next_line_milton_mc4")


@pytest.mark.slow
def test_lm_eval_loads_and_scores_the_tasks(smollm2_bf16_shared, tokenizer):
    from eval.lm_eval_adapter import HarnessLM
    from eval.tasks_eval import _source, local_task_names, resolve_tasks, run_tasks

    assert set(MC) <= set(local_task_names())
    tm = resolve_tasks(MC)  # local: no hub, no index of lm-eval's own tasks
    res = run_tasks(HarnessLM(smollm2_bf16_shared, tokenizer, batch_size=8), MC, tm, limit=2)
    for task in MC:
        row = res[task]
        assert row["n"] == 2
        for k in ("acc", "acc_norm") + (("acc_mutual_info",) if task.startswith("next_line") else ()):
            assert row[k] in (0.0, 0.5, 1.0) and row[f"{k}_stderr"] is not None
            items = row[f"{k}_items"]  # each item's 0/1 score, in doc order: what a paired comparison needs
            assert len(items) == 2 and set(items) <= {"0", "1"} and items.count("1") / 2 == row[k]
        assert "multiple choice" in _source(task)["source"] and _source(task)["n_docs"] >= 500
