"""app.web_session end to end on the CPU: the page (a subprocess, web=endpoint) driven through gradio_client
against a stub OpenAI-compatible server that answers like LMDeploy's api_server (streamed chat completions, and an
HTTP 400 "Input length (N) must be smaller than the model context length (S)." for a prompt that does not fit). No
model loads: the page's own model path points nowhere. Also the checks that run before anything starts."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app import web_session
from app.browser import REPO
from tests.conftest import http_server

STUB_CONTEXT = 256  # the stub's session_len, counted in words of all messages


class _LMDeployStub(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions. Each answer names how many messages it was sent and the last one, so a
    follow-up shows whether the page sent the history."""

    requests: list = []

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "stub-awq-w4"}]})
        self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _LMDeployStub.requests.append(body)
        msgs = body["messages"]
        n = sum(len(m["content"].split()) for m in msgs)
        if n >= STUB_CONTEXT:  # LMDeploy 0.18: RequestError(CONTEXT_LENGTH_EXCEEDED) -> HTTP 400, OpenAI envelope
            return self._send(400, {"object": "error", "type": "invalid_request_error", "code": 400, "param": None,
                                    "message": f"Input length ({n}) must be smaller than the model context length "
                                               f"({STUB_CONTEXT})."})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = f"[{len(msgs)} messages] You said: {msgs[-1]['content'][:40]}".split(" ")

        def chunk(obj):
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        for i, w in enumerate(words):
            chunk({"choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}, "finish_reason": None}]})
        chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunk({"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": len(words),
                                        "total_tokens": n + len(words)}})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def stub():
    with http_server(_LMDeployStub) as url:
        yield url


def _group_gone(pgid: int, wait_s: float = 5.0) -> bool:
    """No live process left in the process group (a zombie no one has reaped yet counts as gone)."""
    t0 = time.monotonic()
    while True:
        live = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError, ValueError):
                continue
            if int(pgrp) == pgid and state != "Z":
                live.append(stat.parent.name)
        if not live or time.monotonic() - t0 > wait_s:
            return not live
        time.sleep(0.2)


@pytest.mark.slow
def test_session_through_the_page_against_a_stub_server(stub, tmp_path):
    out = tmp_path / "ws"
    cmd = [sys.executable, "-m", "app.web_session", "--endpoint", stub, "--context-len", str(STUB_CONTEXT),
           "--max-new-tokens", "16", "--out", str(out), "--", "model.path=/nonexistent/no-local-model"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    rec = json.loads((out / "web_session.json").read_text())
    assert all(rec["checks"].values()), rec["checks"]
    assert rec["error"] is None and rec["mode"] == "endpoint" and rec["server"] is None
    calls = {c["step"]: c for c in rec["calls"]}
    assert list(calls) == ["chat 1", "chat 2", "compare", "too long", "after refusal"]

    # both turns answered by the stub on one session; the follow-up was sent with the first exchange
    c1, c2 = calls["chat 1"], calls["chat 2"]
    assert c1["answer"] == f"[1 messages] You said: {web_session.CHAT_TURNS[0][:40]}"
    assert c2["answer"].startswith("[3 messages] You said: ") and c2["extra"]["conversation_messages"] == 4
    sent = [r["messages"] for r in _LMDeployStub.requests if r["messages"][-1]["content"] == web_session.CHAT_TURNS[1]]
    assert sent == [[{"role": "user", "content": web_session.CHAT_TURNS[0]},
                     {"role": "assistant", "content": c1["answer"]},
                     {"role": "user", "content": web_session.CHAT_TURNS[1]}]]
    assert all(r["temperature"] == 0.0 and r["max_tokens"] == 16 and r["stream"] for r in _LMDeployStub.requests)

    cmp = calls["compare"]
    assert cmp["answer"] == f"[1 messages] You said: {web_session.COMPARE_PROMPT[:40]}"
    assert cmp["status"].startswith("Done.")
    assert [c["label"] for c in cmp["extra"]["columns"]] == [rec["web"]["chat_with"]]
    assert "tokens" in cmp["extra"]["columns"][0]["stats"]

    # the server's refusal, shown by the page; the same session answers afterwards
    long = calls["too long"]
    assert long["prompt_chars"] > 2 * STUB_CONTEXT and long["ok"]
    assert long["status"].startswith("**Error**") and "answered HTTP 400: Input length (" in long["status"]
    assert f"must be smaller than the model context length ({STUB_CONTEXT})" in long["answer"]
    assert calls["after refusal"]["answer"].startswith("[1 messages] You said: Say hello")
    assert all(c["wall_s"] > 0 for c in rec["calls"])

    # what produced it, and nothing left running
    assert rec["web"]["command"][1:3] == ["-m", "app.web"] and "web=endpoint" in rec["web"]["command"]
    assert f"web.endpoint.url={stub}" in rec["web"]["command"] and "web.host=127.0.0.1" in rec["web"]["command"]
    assert rec["session_command"][1:3] == ["-m", "app.web_session"]
    assert rec["versions"]["gradio"] and rec["versions"]["gradio_client"] and rec["versions"]["torch"]
    assert _group_gone(rec["web"]["pid"])
    web_log = (out / "web_session_web.log").read_text()
    assert "loading" not in web_log  # no local model: the page's model path does not even exist
    assert p.stdout.strip().splitlines()[0].split()[:3] == ["step", "session", "wall_s"]  # the summary table, last
    assert took < 180


def _alive(pid: int) -> bool:
    """Running (a zombie no one has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
def test_server_mode_stops_the_server_and_its_workers(tmp_path, monkeypatch):
    """The LMDeploy path with a fake api_server: this module run as a server process (the stub) that leaves a worker
    behind when it gets SIGINT, as an engine's workers may; the session must stop both and record the command."""
    from backends import lmdeploy as lb

    d = _checkpoint(tmp_path / "ckpt")
    real_command = lb.api_server_command
    monkeypatch.setattr(lb, "api_server_command", lambda cfg, model_dir, host, port, engine: [
        sys.executable, "-m", "tests.app.test_web_session", str(port), "--", *real_command(cfg, model_dir, host, port)])
    monkeypatch.setattr(web_session, "check_imports", lambda server: None)  # no lmdeploy on this machine
    monkeypatch.chdir(REPO)
    out = tmp_path / "ws"
    rc = web_session.main(["--out", str(out), "--max-new-tokens", "8", "--", f"model.path={d}", "quant=awq_w4",
                           "backend.cache_max_entry_count=0.4", f"backend.session_len={STUB_CONTEXT}"])
    rec = json.loads((out / "web_session.json").read_text())
    assert rc == 0 and all(rec["checks"].values()) and rec["mode"] == "lmdeploy", rec.get("error")
    srv = rec["server"]
    assert srv["model_format"] == "awq" and srv["engine_kwargs"]["cache_max_entry_count"] == 0.4
    cmd = " ".join(srv["command"])
    assert "--cache-max-entry-count 0.4 " in cmd and "--model-format awq" in cmd
    assert f"--session-len {STUB_CONTEXT}" in cmd
    assert rec["context_len"] == STUB_CONTEXT and rec["context_len_from"] == "backend.session_len"
    assert rec["web"]["title"].startswith("ckpt · AWQ w4 g64 (search+clip) · via http://127.0.0.1:")  # named by its path
    assert f"model.path={d}" in rec["web"]["command"] and "quant=awq_w4" in rec["web"]["command"]
    worker = int((out / "web_session_server.log").read_text().split("worker pid ")[1].split()[0])
    assert not _alive(worker) and _group_gone(srv["pid"]) and _group_gone(rec["web"]["pid"])


def test_down_endpoint_is_recorded_and_nothing_is_left(tmp_path):
    from app.browser import free_port

    out = tmp_path / "ws"
    rc = web_session.main(["--endpoint", f"http://127.0.0.1:{free_port()}", "--context-len", "64",
                           "--server-timeout", "1", "--out", str(out)])
    rec = json.loads((out / "web_session.json").read_text())
    assert rc == 1 and rec["error"].startswith("TimeoutError") and rec["calls"] == []
    assert not any(rec["checks"].values()) and "pid" not in rec["web"]  # the page was never started


@pytest.mark.parametrize("argv,match", [
    (["--endpoint", "http://127.0.0.1:9"], "--endpoint needs --context-len"),
    (["--", "model.path=/nonexistent/ckpt"], "model.path: local path /nonexistent/ckpt does not exist"),
    (["--", "backend.cache_max_entry_count=1.5"], "backend.cache_max_entry_count"),
    (["--endpoint", "http://127.0.0.1:9", "--context-len", "64", "--", "web.temperature=9"], "web.temperature"),
])
def test_bad_setup_fails_before_anything_starts(tmp_path, capsys, argv, match):
    rc = web_session.main(["--out", str(tmp_path / "ws"), *argv])
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def _checkpoint(d: Path, awq: bool = True, tokenizer: bool = True) -> Path:
    d.mkdir()
    cfg = {"model_type": "llama", "max_position_embeddings": 8192}
    if awq:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                      "version": "gemm"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"0" * 16)
    (d / "quant_meta.json").write_text(json.dumps({"file_bytes": 16, "format": "awq-gemm"}))
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


def test_exported_awq_checkpoint_is_served_as_awq_with_the_cache_share(tmp_path):
    from backends import lmdeploy as lb
    from harness.compose import compose

    d = _checkpoint(tmp_path / "ckpt")
    cfg = compose(["backend=lmdeploy", f"model.path={d}", "quant=awq_w4", "backend.session_len=2048"])
    assert web_session.check_checkpoint(cfg, lb.resolve_model_dir(cfg))["model_format"] == "awq"
    cmd = " ".join(lb.api_server_command(cfg, lb.resolve_model_dir(cfg), port=1234))
    assert f"api_server {d} --backend pytorch" in cmd and "--server-name 127.0.0.1" in cmd
    assert "--cache-max-entry-count 0.4 " in cmd and "--model-format awq" in cmd and "--dtype float16" in cmd
    assert "--session-len 2048" in cmd
    assert web_session.model_context_len(d) == 8192
    words = web_session.long_prompt(2048).split()
    assert len(words) >= 2 * 2048


@pytest.mark.parametrize("awq,tokenizer,quant,match", [
    (True, False, "awq_w4", "has no tokenizer"),
    (False, True, "awq_w4", "is not an AWQ checkpoint"),
    (True, True, "awq_w3", "set quant.w_bit=4 quant.group_size=64"),  # awq_w3: w3, the checkpoint w4
])
def test_checkpoint_that_does_not_match_the_config_is_refused(tmp_path, awq, tokenizer, quant, match):
    from harness.compose import compose

    d = _checkpoint(tmp_path / "ckpt", awq, tokenizer)
    cfg = compose(["backend=lmdeploy", f"model.path={d}", f"quant={quant}"])
    with pytest.raises(web_session.SessionSetupError, match=match):
        web_session.check_checkpoint(cfg, d)


def test_short_copy_of_a_checkpoint_is_refused(tmp_path):
    from harness.compose import compose

    d = _checkpoint(tmp_path / "ckpt")
    (d / "model.safetensors").write_bytes(b"0" * 10)
    cfg = compose(["backend=lmdeploy", f"model.path={d}", "quant=awq_w4"])
    with pytest.raises(web_session.SessionSetupError, match="incomplete copy"):
        web_session.check_checkpoint(cfg, d)


def _serve_stub(port: int) -> None:
    """`python -m tests.test_web_session PORT -- <the real command>`: the stub as a server process, with a worker in
    its process group that ignores SIGINT and outlives it."""
    worker = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                               "signal.SIG_IGN); time.sleep(600)"])
    print(f"worker pid {worker.pid}", flush=True)
    server = ThreadingHTTPServer(("127.0.0.1", port), _LMDeployStub)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    _serve_stub(int(sys.argv[1]))
