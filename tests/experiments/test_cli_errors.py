"""Issue 27, finding 8: Hydra's own errors about an override become the harness's one line (`error: <field>: <value>
— <allowed> — <fix>`, exit 2), in every entry point: compose() (export, serve, chat), a sweep's jobs, and the
`@hydra.main` of experiments.run. Hydra's advice for an unknown field (`+quant.grop_size=64`) is wrong: the run would
refuse that key; the harness names the field it meant instead."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.compose import check_split_overrides, compose
from harness.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("overrides, starts, has", [
    (["quant=rtn_w4", "quant.grop_size=64"], "quant.grop_size: 64 — not a field of quant (method rtn)",
     "use quant.group_size=64"),
    (["+experiment=nonexistent"], "+experiment: nonexistent — no such option in conf/experiment/ (options: ",
     "e.g. +experiment="),
    (["quant=awq_w5"], "quant: awq_w5 — no such option in conf/quant/", "use quant=awq_w4"),
    (["quant=smoothquant_w8a8", "quant.layer_overrides=[{pattern: model.layers.0.*, skip: true}]"],
     "quant.layer_overrides: ", "layer_overrides is a field of {owners}: choose one of"),
    (["quant=rtn_w4", "quant.calib.n_samples=8"], "quant.calib: ",
     "calib is a field of {owners}: choose one of"),
    (["data.splits=[file:/tmp/my", "notes.txt]"], "data.splits: [file:/tmp/my — the override ends inside an open",
     "quote the whole override as one shell word: 'data.splits=[file:/tmp/my notes.txt]'"),
])
def test_override_mistakes_are_one_line_config_errors(overrides, starts, has):
    import dataclasses

    import quant  # noqa: F401  (every method's config)
    from harness.config import QUANT_CONFIGS

    if "{owners}" in has:  # the methods whose config has that field, from the registry (a new method joins the list)
        field = has.split(" is a field")[0]
        has = has.format(owners=", ".join(sorted(n for n in QUANT_CONFIGS.names() if field in {
            f.name for f in dataclasses.fields(QUANT_CONFIGS.get(n))})))
        assert {"awq", "gptq", "recipe"} <= set(has.split(" of ")[1].split(":")[0].split(", "))
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    msg = str(e.value)
    assert msg.startswith(starts) and has in msg and "\n" not in msg, msg
    assert "+quant" not in msg.replace("(no +)", "")  # never Hydra's advice to add the key


def test_a_quoted_path_with_spaces_is_no_split_override():
    check_split_overrides(["data.splits=[file:/tmp/my notes.txt]", "quant.calib.dataset='file:/tmp/a b.txt'",
                           'quant.layer_overrides=[{pattern: "re:.*", skip: true}]', "-m", "hydra.verbose=true"])


def test_a_bad_job_of_a_sweep_is_named_in_one_line():
    from tests.experiments.test_sweep_check import _check as check

    with pytest.raises(ConfigError, match=r"^quant: awq_w5 — no such option in conf/quant/ .* \(sweep job "
                                          r"`quant=awq_w5`; none of the 2 jobs ran\)$"):
        check(["quant=rtn_w4,awq_w5"])


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_DEBUG", "HYDRA_FULL_ERROR")}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("args, line", [
    (["quant=rtn_w4", "quant.grop_size=64"], "error: quant.grop_size: 64 — not a field of quant (method rtn); "),
    (["+experiment=nonexistent", "data.splits=[file:/tmp/my", "notes.txt]"],
     "error: data.splits: [file:/tmp/my — the override ends inside an open bracket or quote"),
    (["-m", "quant=rtn_w4,awq_w4", "quant.grop_size=64"], "error: quant.grop_size: 64 — not a field of quant"),
])
def test_the_command_line_prints_one_line_and_exits_2(args, line):
    p = _run(*args)
    assert p.returncode == 2 and p.stderr.startswith(line) and len(p.stderr.strip().splitlines()) == 1, p.stderr
