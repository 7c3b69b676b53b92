"""Exposure needs a key (issue 15): a non-loopback web.host needs a login from the environment or the page refuses
to start; `lmdeploy serve api_server` gets `--api-keys` from $QH_API_KEYS and refuses a non-loopback host without
one; the harness's clients send the key; no key reaches a record or a log line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from harness import exposure
from harness.compose import compose
from harness.config import ConfigError
from tests.conftest import http_server

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-7f3a9c"
NO_KEYS = {k: v for k, v in os.environ.items() if k not in (exposure.API_KEYS_ENV, exposure.WEB_USER_ENV, exposure.WEB_PASSWORD_ENV)}


@pytest.fixture
def no_keys(monkeypatch):
    for k in (exposure.API_KEYS_ENV, exposure.WEB_USER_ENV, exposure.WEB_PASSWORD_ENV):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                                       ("127.0.0.2", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
                                       ("example.org", False)])
def test_is_loopback(host, loop):
    assert exposure.is_loopback(host) is loop


def test_web_credentials_from_the_environment_only():
    env = {exposure.WEB_USER_ENV: "ana", exposure.WEB_PASSWORD_ENV: "pw"}
    assert exposure.web_credentials("0.0.0.0", environ=env) == ("ana", "pw")
    assert exposure.web_credentials("127.0.0.1", environ=env) == ("ana", "pw")  # set: a login on loopback too
    assert exposure.web_credentials("127.0.0.1", environ={}) is None
    with pytest.raises(ConfigError) as e:
        exposure.web_credentials("0.0.0.0", environ={exposure.WEB_USER_ENV: "ana"})  # no password: refused
    msg = str(e.value)
    assert msg.startswith("web.host: 0.0.0.0 — ") and "QH_WEB_USER" in msg and "QH_WEB_PASSWORD" in msg
    assert "web.host=127.0.0.1" in msg and "\n" not in msg


def test_web_refuses_a_public_host_without_a_login_before_loading_anything():
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "app.web", "web.host=0.0.0.0"], cwd=ROOT, env=NO_KEYS,
                       capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: web.host: 0.0.0.0 — "), p.stderr
    assert "QH_WEB_USER" in lines[0] and "QH_WEB_PASSWORD" in lines[0] and "Traceback" not in p.stderr
    assert took < 30, took


def test_web_passes_the_login_to_gradio(monkeypatch):
    """With the credentials set, a public host starts and Gradio gets auth=(user, password); the password is not
    printed."""
    from app import answerer, web, web_ui

    launched = {}

    class Demo:
        def queue(self, **kw):
            return self

        def launch(self, **kw):
            launched.update(kw)

    class FakeAnswerer:
        def __init__(self, setup):
            pass

        def warm_up(self, variant):
            return []

    monkeypatch.setattr(answerer, "Answerer", FakeAnswerer)
    monkeypatch.setattr(web_ui, "build_app", lambda ans: Demo())
    monkeypatch.setattr(web_ui, "title_of", lambda ans: "page")
    monkeypatch.setattr(web, "port_free", lambda host, port: True)
    monkeypatch.setenv(exposure.WEB_USER_ENV, "ana")
    monkeypatch.setenv(exposure.WEB_PASSWORD_ENV, KEY)
    web.main(["web.host=0.0.0.0"])
    assert launched["auth"] == ("ana", KEY) and launched["server_name"] == "0.0.0.0" and launched["share"] is False


def test_api_server_command_carries_keys_and_refuses_a_public_host_without_one(tmp_path, no_keys, monkeypatch):
    from backends import lmdeploy as lb

    cfg = compose(["backend=lmdeploy"])
    assert "--api-keys" not in lb.api_server_command(cfg, tmp_path)  # loopback, no key: as before
    cmd = lb.api_server_command(cfg, tmp_path, host="0.0.0.0", api_keys=[KEY, "k2"])
    assert cmd[cmd.index("--api-keys"):] == ["--api-keys", KEY, "k2"]
    with pytest.raises(ConfigError) as e:
        lb.api_server_command(cfg, tmp_path, host="0.0.0.0")
    assert str(e.value).startswith("--host: 0.0.0.0 — ") and "QH_API_KEYS" in str(e.value)
    monkeypatch.setenv(exposure.API_KEYS_ENV, f" {KEY} ,k2")
    cmd = lb.api_server_command(cfg, tmp_path, host="0.0.0.0")
    assert cmd[-3:] == ["--api-keys", KEY, "k2"]
    shown = exposure.redact(cmd + ["--tp", "1"])
    assert KEY not in " ".join(shown) and shown[-5:] == ["--api-keys", "<redacted>", "<redacted>", "--tp", "1"]


def test_serve_refuses_a_public_host_without_a_key(no_keys, capsys):
    from app import serve

    with pytest.raises(SystemExit) as e:
        serve.main(["--host", "0.0.0.0", "--", "model=smollm2_135m"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host: 0.0.0.0 — ") and "QH_API_KEYS" in err and len(err.splitlines()) == 1


def test_serve_passes_the_key_but_never_records_or_prints_it(tmp_path, monkeypatch, capsys):
    from app import serve
    from backends import lmdeploy as lb

    started = {}

    class Proc:
        pid, returncode = 0, 0

        def poll(self):
            return 0

    def start(cmd, log_path=None, env=None):
        started["cmd"] = cmd
        return Proc()

    monkeypatch.setenv(exposure.API_KEYS_ENV, KEY)
    monkeypatch.setattr(lb, "resolve_model_dir", lambda cfg, root, tok: tmp_path)
    monkeypatch.setattr(lb, "choose_engine", lambda cfg: ("pytorch", None))
    # as on a GPU machine with LMDeploy (here: no GPU, and serve's preflight would stop first: tests/app/test_serve.py)
    monkeypatch.setattr(lb.LMDeployBackend, "preflight", lambda self, cfg, *a, **k: None)
    monkeypatch.setattr(serve, "start_server", start)
    monkeypatch.setattr(serve, "wait_healthy", lambda base, proc, timeout: (["m"], 0.5))
    monkeypatch.setattr(serve, "chat_completion", lambda base, model, messages, max_tokens: {"content": "hi"})
    monkeypatch.setattr(serve, "stop_server", lambda proc: None)
    out = tmp_path / "serve.json"
    serve.main(["--host", "0.0.0.0", "--ask", "Hello", "--out", str(out), "--", "model=smollm2_135m"])
    assert started["cmd"][-2:] == ["--api-keys", KEY]  # the server gets it
    said = capsys.readouterr()
    record = out.read_text()
    assert "--api-keys" in record and KEY not in record
    assert KEY not in said.out + said.err


class _Auth(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *a):
        pass

    def _answer(self, body: str, ctype: str = "application/json"):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer('{"object": "list", "data": [{"id": "m1"}]}')

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        chunk = {"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}
        self._answer(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n", "text/event-stream")


def test_clients_send_the_key_as_bearer(monkeypatch):
    from app import openai_client, serve
    from app.chat_logic import SamplingSettings

    monkeypatch.setenv(exposure.API_KEYS_ENV, f"{KEY},other")
    _Auth.seen = []
    with http_server(_Auth) as url:
        assert openai_client.list_models(url) == ["m1"]
        snaps = list(openai_client.stream_chat(url, None, [{"role": "user", "content": "x"}], SamplingSettings(4)))
        assert serve.wait_healthy(url, timeout_s=5)[0] == ["m1"]
    assert snaps[-1].text == "hi"
    assert [a for _, a in _Auth.seen] == [f"Bearer {KEY}"] * 4  # models, models (model id), completions, health


@pytest.mark.parametrize("user,password", [("   ", "pw"), ("ana", " \t"), (" ", " ")])
def test_blank_credentials_are_refused_without_printing_them(user, password):
    """Whitespace-only QH_WEB_USER / QH_WEB_PASSWORD (issue 27, finding 9): refused on any host, naming the variable,
    never accepted as a login no one can pass."""
    env = {exposure.WEB_USER_ENV: user, exposure.WEB_PASSWORD_ENV: password}
    for host in ("0.0.0.0", "127.0.0.1"):
        with pytest.raises(ConfigError) as e:
            exposure.web_credentials(host, environ=env)
        bad = exposure.WEB_USER_ENV if not user.strip() else exposure.WEB_PASSWORD_ENV
        msg = str(e.value)
        assert msg.startswith(f"{bad}: (") and "whitespace" in msg and "not blank" in msg and "\n" not in msg
    assert exposure.web_credentials("0.0.0.0", environ={exposure.WEB_USER_ENV: " ana ",
                                                        exposure.WEB_PASSWORD_ENV: " pw"}) == (" ana ", " pw")
