"""No stale reuse: every record carries the version of the code behind its numbers (and the machine); a record is
reused only while both match, else recomputed with the reason printed; the quantized-weight cache key moves with the
method's code."""
import json
import shutil

import pytest

import harness.environment as env
from eval.registry import EVALUATOR_SOURCES, EVALUATORS
from harness.assets import REPO_ROOT
from quant.registry import METHODS, method_sources
from tests.experiments.test_pipeline import SMALL, cfg_of


def test_every_registered_method_and_evaluator_names_its_sources():
    for name in METHODS.names():
        own = f"{type(METHODS.get(name)).__module__.replace('.', '/')}.py"
        assert own in method_sources(name), name  # a method's own file, and what it imports (quant.sources)
    for name in EVALUATORS.names():
        assert name in EVALUATOR_SOURCES, f"evaluator {name} has no entry in eval.registry.EVALUATOR_SOURCES"
    for paths in [*(method_sources(n) for n in METHODS.names()), *EVALUATOR_SOURCES.values()]:
        for p in paths:
            assert (REPO_ROOT / p).exists(), p


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """The sources under a temporary root, so a test can edit one."""
    for d in ("harness", "quant", "eval", "backends"):
        shutil.copytree(REPO_ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(env, "REPO_ROOT", tmp_path)
    return tmp_path


def test_editing_a_method_changes_its_part_and_the_quantized_cache_key(repo_copy):
    from experiments.pipeline import code_version_of
    from quant.awq.config import AWQConfig
    from quant.rtn import RTNConfig
    from quant.quantized_cache import quant_key

    awq, rtn = cfg_of(SMALL + ["quant=awq_w4"]), cfg_of(SMALL + ["quant=rtn_w4"])
    before = {c.quant.method: code_version_of(c) for c in (awq, rtn)}
    keys = {m: quant_key("m", {"awq": AWQConfig, "rtn": RTNConfig}[m](), "bfloat16") for m in ("awq", "rtn")}
    with open(repo_copy / "quant" / "awq" / "search.py", "a") as f:
        f.write("\n# a change\n")
    after = {c.quant.method: code_version_of(c) for c in (awq, rtn)}
    assert after["awq"]["hash"] != before["awq"]["hash"]
    assert env.changed_parts(before["awq"], after["awq"]) == ["quant.awq"]
    assert after["rtn"] == before["rtn"]  # RTN's numbers do not depend on AWQ's search
    assert quant_key("m", AWQConfig(), "bfloat16") != keys["awq"]
    assert quant_key("m", RTNConfig(), "bfloat16") == keys["rtn"]


def test_stale_reasons():
    from experiments.pipeline import code_version_of, stale_reason

    cfg = cfg_of(SMALL)
    cv = code_version_of(cfg)
    rec = {"status": "complete", "code_version": cv, "metrics": {}, "provenance": {"machine": "elsewhere"}}
    assert stale_reason(rec, cfg) is None  # no throughput: the machine does not matter
    assert "code_version" in stale_reason({**rec, "code_version": None}, cfg)
    other = json.loads(json.dumps(cv))
    other["hash"], other["parts"]["eval.perplexity"] = "x", "y"
    assert stale_reason({**rec, "code_version": other}, cfg) == "made by other code (eval.perplexity changed)"
    with_tp = {**rec, "metrics": {"throughput": {}}}
    assert "another machine (elsewhere" in stale_reason(with_tp, cfg)
    assert stale_reason({**with_tp, "provenance": {"machine": env.machine_name()}}, cfg) is None


def test_run_reuses_only_a_record_of_the_same_code(tmp_path, capsys):
    from experiments import pipeline

    cfg = cfg_of(SMALL + ["eval.perplexity.max_windows=1", f"results_dir={tmp_path}"])
    rec = pipeline.run(cfg)
    assert rec["code_version"]["hash"] and rec["provenance"]["machine"]
    assert "bos_token_id" in rec["provenance"] and rec["provenance"]["bos_token_id"] is None  # SmolLM2: no BOS
    path = next((tmp_path / "runs").glob("*.json"))
    assert path.stem == rec["run_id"]
    capsys.readouterr()
    pipeline.run(cfg)
    assert "reusing it" in capsys.readouterr().err
    rec["code_version"]["parts"]["quant.fp16"] = "old"
    rec["code_version"]["hash"] = "old"
    path.write_text(json.dumps(rec))
    again = pipeline.run(cfg)
    err = capsys.readouterr().err
    assert f"record {path} made by other code (quant.fp16 changed); recomputing" in err
    assert again["code_version"] == pipeline.code_version_of(cfg) and again["run_id"] == rec["run_id"]


def test_weights_computed_on_a_gpu_have_their_own_cache_key():
    """A cache shared between a GPU and a CPU machine never hands one's quantized weights to the other (a search on
    CUDA picks other scales); CPU keys are those of entries made before the device entered the key."""
    from quant.awq.config import AWQConfig
    from quant.quantized_cache import quant_key

    cpu = quant_key("m", AWQConfig(), "bfloat16", {"text": "x"})
    assert quant_key("m", AWQConfig(), "bfloat16", {"text": "x"}, device="cpu") == cpu
    assert quant_key("m", AWQConfig(), "bfloat16", {"text": "x"}, device="cuda") not in (cpu, None)


def test_a_methods_sources_are_what_its_file_imports(tmp_path):
    """A method's code version is derived from its imports (quant.sources), never listed: every quant module it
    imports, at the top or inside a function, transitively, and the harness modules those import; not the modules
    that never change a result (where blocks compute, the quantized cache, configs' schema)."""
    from quant.sources import NOT_RESULT_SOURCES, file_sources

    for rel, text in {"quant/m.py": "import torch\nfrom quant.a import f\nfrom quant import onload\n",
                      "quant/a.py": "def f():\n    from quant.b import g\n    import harness.h\n",
                      "quant/b.py": "from harness.config import QuantConfig\nimport quant.a\n",
                      "quant/onload.py": "import quant.c\n", "quant/c.py": "", "quant/unused.py": "",
                      "harness/h.py": "import harness.k\n", "harness/k.py": "", "harness/config.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert file_sources("quant/m.py", tmp_path) == ["harness/h.py", "quant/a.py", "quant/b.py", "quant/m.py"]
    assert "quant/onload.py" in NOT_RESULT_SOURCES and "harness/config.py" in NOT_RESULT_SOURCES
    # the real methods: GPTQ's Triton column kernel (imported by its algorithm) decides GPTQ's numbers, not RTN's
    assert "quant/kernels/gptq_columns.py" in method_sources("gptq")
    assert not any(p.startswith(("quant/awq/", "quant/gptq/")) for p in method_sources("rtn"))
    assert "harness/architectures.py" in method_sources("awq")


def test_a_recipes_sources_are_those_of_its_steps():
    from harness.compose import compose

    cfg = compose(["quant=recipe", "quant.steps=[{method: awq}, {method: rtn}]"]).quant
    own = set(method_sources(cfg))
    assert {"quant/recipe.py", "quant/rtn.py", "quant/awq/search.py"} <= own
    assert "quant/gptq/algorithm.py" not in own  # GPTQ is not one of its steps
    assert "quant/gptq/algorithm.py" in method_sources(compose(["quant=recipe_awq_gptq_w4"]).quant)
