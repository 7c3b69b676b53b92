"""A hub dataset named while the hub cannot be reached fails in about two seconds, before the model loads, with one
line naming the field and the fix (issue 15), instead of half a minute of `datasets` retries."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import hub
from harness.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def closed_port_endpoint() -> str:
    """http://127.0.0.1:<a port nothing listens on>: a connection is refused at once, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_names_the_reason_within_the_timeout():
    assert "refused" in hub.unreachable(closed_port_endpoint(), 1.0).lower()
    # a server that accepts the connection and never answers (as a black-holed or intercepted route): the probe
    # gives up after its timeout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        t = time.monotonic()
        assert hub.unreachable(f"http://127.0.0.1:{s.getsockname()[1]}", 0.5) is not None
        assert time.monotonic() - t < 2.0


def test_an_answering_endpoint_is_reachable():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)  # any answer counts: the hub is there
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        assert hub.unreachable(f"http://127.0.0.1:{server.server_port}", 5.0) is None
    finally:
        server.server_close()


@pytest.mark.parametrize("env", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", None])
def test_require_hub_names_field_and_fix(monkeypatch, env):
    for name in hub.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    if env:
        monkeypatch.setenv(env, "1")
    monkeypatch.setattr(hub, "hub_endpoint", closed_port_endpoint)
    with pytest.raises(ConfigError) as e:
        hub.require_hub("quant.calib.dataset", "pileval", "the embedded text")
    msg = str(e.value)
    assert msg.startswith("quant.calib.dataset: pileval — a Hugging Face Hub dataset, and the hub (")
    assert (f"{env} is set" in msg) if env else "refused" in msg.lower()
    assert msg.endswith("— use a local file (quant.calib.dataset=file:<path>, text or .jsonl) or the embedded text")


@pytest.mark.parametrize("overrides,field", [(["data=wikitext2"], "data.splits: wikitext2"),
                                             (["quant=awq_w4", "quant.calib.dataset=pileval"],
                                              "quant.calib.dataset: pileval")])
def test_cli_fails_in_under_5_s_before_the_model_loads(tmp_path, overrides, field):
    env = {k: v for k, v in os.environ.items() if k not in (*hub.OFFLINE_ENV, "HARNESS_DEBUG")}
    env["HF_ENDPOINT"] = closed_port_endpoint()  # no network, also on a machine that has one
    p = subprocess.run([sys.executable, "-m", "experiments.run", *overrides, f"results_dir={tmp_path}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.splitlines()[-1].startswith(f"error: {field} — a Hugging Face Hub dataset")
    assert "Traceback" not in p.stderr and "[run] loading" not in p.stderr, p.stderr


def test_prepare_fails_in_under_5_s(tmp_path, monkeypatch):
    from experiments import pipeline
    from tests.experiments.test_pipeline import SMALL, cfg_of

    for name in hub.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "hub_endpoint", closed_port_endpoint)

    def boom(*a, **k):
        raise AssertionError("the model was resolved before the hub was checked")

    monkeypatch.setattr("harness.models.resolve_model", boom)
    cfg = cfg_of(SMALL + ["data=wikitext2", f"results_dir={tmp_path}"])
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"^data\.splits: wikitext2 — a Hugging Face Hub dataset"):
        pipeline.prepare(cfg)
    assert time.monotonic() - t < 5.0
