"""The report's GPU serving table reads the LMDeploy throughput benchmark's own summaries under <results>/gpu/."""
import json
import shutil
from pathlib import Path

from harness.assets import REPO_ROOT
from report import serving

TP_RUN = REPO_ROOT / "results" / "gpu" / "lmdeploy_13b_tp" / "lmdeploy_throughput_13b_tp.json"


def _results_with(tmp_path: Path, summary: dict) -> Path:
    d = tmp_path / "results" / "gpu" / "run"
    d.mkdir(parents=True)
    (d / "lmdeploy_throughput.json").write_text(json.dumps(summary))
    (d / "kv_check.json").write_text(json.dumps({"results": [{"benchmark": "kv_check"}]}))  # another benchmark
    (d / "broken.json").write_text("{not json")
    return tmp_path / "results"


def test_every_batch_of_every_variant_is_a_row_with_the_benchmarks_numbers(tmp_path):
    summary = json.loads(TP_RUN.read_text())
    summary["results"].append({"benchmark": "lmdeploy_throughput", "label": "broken", "error": "engine died"})
    results = _results_with(tmp_path, summary)
    tables = serving.build(results)
    assert len(tables) == 1  # the other benchmark's file and the unreadable one are not serving summaries
    frame = tables[0].frame
    ok = [r for r in summary["results"] if "error" not in r]
    assert len(frame) == sum(len(r["batches"]) for r in ok)
    for r in ok:
        for b in r["batches"]:
            row = frame[(frame.config == r["label"]) & (frame.tp == r["tp"]) & (frame.batch == b["batch"])]
            assert len(row) == 1
            assert row.decode_tok_s.iloc[0] == b["measured"]["decode_tok_s"]
            assert row.roofline_tok_s.iloc[0] == b["roofline"]["decode_tok_s"]
    assert set(frame.tp) == {1, 2}
    assert tables[0].machine.startswith("2x NVIDIA H200")  # the tp=1 variant saw one GPU; the machine had two


def test_write_gives_markdown_csv_and_one_figure_per_summary(tmp_path):
    results = _results_with(tmp_path, json.loads(TP_RUN.read_text()))
    shutil.copy(TP_RUN, results / "gpu" / "second.json")
    tables, figures, md = serving.write(results)
    assert [p.name for p in tables] == ["serving.md", "serving.csv"]
    assert sorted(p.name for p in figures if p.suffix == ".png") == ["serving_lmdeploy_throughput.png", "serving_second.png"]
    assert md.count("### Serving:") == 2 and "Synthetic weights" in md and "Command: `bash" in md


def test_no_gpu_results_means_no_serving_table(tmp_path):
    assert serving.write(tmp_path) == ([], [], "")
