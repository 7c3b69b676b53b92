"""A streaming client for OpenAI-compatible chat endpoints (`lmdeploy serve api_server`, `python -m app.serve`),
in the standard library only, so the web page can talk to a server without the `openai` package.

Every failure (nothing listening, a timeout, an HTTP error, an error object in the stream, a connection closed
mid-answer, a malformed stream) becomes an `EndpointError` whose message says what happened at which URL, for the
page to show; nothing else escapes. The request follows the OpenAI chat-completions API: `stream: true` answers as
server-sent events `data: {json}` lines ending with `data: [DONE]`."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional

from app.serve import parse_models
from app.chat_logic import EndpointError, Messages, SamplingSettings, Snapshot
from harness import exposure

START_HINT = "is the server running? (python -m app.serve, or lmdeploy serve api_server)"


def base_url(url: str) -> str:
    """`http://host:port`, `http://host:port/` and `http://host:port/v1` all name the same server."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _describe(exc: BaseException, url: str, timeout_s: float) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        body = exc.read().decode(errors="replace") if exc.fp else ""
        return f"{url} answered HTTP {exc.code}: {_error_text(body) or exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return f"{url} is not reachable (connection refused): {START_HINT}"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"{url} did not answer within {timeout_s:g} s"
    if isinstance(reason, socket.gaierror):
        return f"{url}: unknown host ({reason})"
    return f"{url} failed: {type(reason).__name__}: {reason}"


def _error_text(body: str) -> str:
    """The message inside an error body ({"error": {"message": ...}}, {"message": ...}, {"detail": ...}) or its start."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or obj.get("detail") or err)[:300]
        return str(err)[:300]
    return str(obj)[:300]


def list_models(url: str, timeout_s: float = 10.0) -> list[str]:
    """Model ids served at `url` (GET /v1/models)."""
    full = f"{base_url(url)}/v1/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(full, headers=exposure.auth_headers()), timeout=timeout_s) as r:
            return parse_models(r.read().decode())
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise EndpointError(_describe(e, full, timeout_s)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EndpointError(f"{full} did not answer with a model list ({type(e).__name__}: {e})") from None


def resolve_model_id(url: str, model: Optional[str], timeout_s: float = 10.0) -> str:
    """The configured model id, or the first one the server lists."""
    if model:
        return model
    ids = list_models(url, timeout_s)
    if not ids:
        raise EndpointError(f"{base_url(url)}/v1/models lists no model")
    return ids[0]


def request_body(model: str, messages: Messages, s: SamplingSettings) -> dict:
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": s.max_new_tokens,
            "temperature": s.temperature if s.do_sample else 0.0, "stream_options": {"include_usage": True}}
    if s.do_sample:
        body["top_p"] = s.top_p
    return body


def stream_chat(url: str, model: Optional[str], messages: Messages, settings: SamplingSettings,
                timeout_s: float = 60.0, api_key: Optional[str] = None,
                stop: Optional[threading.Event] = None) -> Iterator[Snapshot]:
    """Stream one chat completion; yields the answer so far after every chunk, the last one with done=True.
    `api_key`: None = the first of $QH_API_KEYS (harness.exposure), sent as `Authorization: Bearer`."""
    model_id = resolve_model_id(url, model, min(timeout_s, 10.0))
    full = f"{base_url(url)}/v1/chat/completions"
    req = urllib.request.Request(full, data=json.dumps(request_body(model_id, messages, settings)).encode(),
                                 headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                                          **exposure.auth_headers(api_key)}, method="POST")
    t0 = time.perf_counter()
    snap = Snapshot(count_unit="chunks")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise EndpointError(_describe(e, full, timeout_s)) from None
    with resp:
        try:
            for event in _sse_data(resp):
                if stop is not None and stop.is_set():
                    snap.finish_reason = "stopped"
                    break
                if event == "[DONE]":
                    break
                try:
                    chunk = json.loads(event)
                except ValueError:
                    raise EndpointError(f"{full} sent a malformed stream chunk: {event[:120]!r}") from None
                if not isinstance(chunk, dict):
                    raise EndpointError(f"{full} sent a malformed stream chunk: {event[:120]!r}")
                if "error" in chunk:
                    raise EndpointError(f"{full} reported an error mid-answer: {_error_text(json.dumps(chunk))}")
                _apply_chunk(snap, chunk, time.perf_counter() - t0)
                yield snap.copy()
            else:
                if snap.finish_reason is None:
                    raise EndpointError(f"{full} closed the stream before the answer ended "
                                        f"(after {snap.n_tokens} {snap.count_unit})")
        except (OSError, http.client.HTTPException) as e:
            raise EndpointError(f"{full}: the connection failed mid-answer after {snap.n_tokens} "
                                f"{snap.count_unit} ({type(e).__name__}: {e})") from None
    snap.elapsed_s = time.perf_counter() - t0
    snap.done = True
    yield snap.copy()


def _sse_data(resp) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event stream (comments, other fields and blank lines skipped)."""
    for raw in resp:
        line = raw.decode("utf-8", errors="replace").strip()
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


def _apply_chunk(snap: Snapshot, chunk: dict, t: float) -> None:
    for choice in chunk.get("choices") or []:
        piece = (choice.get("delta") or {}).get("content") or ""
        if piece:
            if snap.first_token_s is None:
                snap.first_token_s = t
            snap.text += piece
            if snap.count_unit == "chunks":
                snap.n_tokens += 1
        if choice.get("finish_reason"):
            snap.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens") is not None:  # the server's own count (stream_options.include_usage)
        snap.n_tokens, snap.count_unit = int(usage["completion_tokens"]), "tokens"
    snap.elapsed_s = t


def terminal_chat(url: str, model: Optional[str], settings: SamplingSettings, system: Optional[str] = None,
                  timeout_s: float = 60.0, read=input, write=None) -> None:
    """The command-line client of an endpoint (streaming, multi-turn): app.chat's REPL over `stream_chat`.
    An endpoint error is printed and the conversation goes on."""
    import sys

    from app.chat import Conversation, repl

    def respond(messages: Messages) -> Iterator[str]:
        said = ""
        try:
            for snap in stream_chat(url, model, messages, settings, timeout_s):
                yield snap.text[len(said):]
                said = snap.text
        except EndpointError as e:
            yield f"[error] {e}"

    repl(respond, Conversation(system), read=read, write=write or sys.stdout.write)


def main(argv: list[str]) -> None:
    """python -m app.openai_client --url http://127.0.0.1:23333 [--system ...] [--max-new-tokens N]"""
    import argparse

    ap = argparse.ArgumentParser(description="terminal chat with an OpenAI-compatible endpoint (/reset, /exit)")
    ap.add_argument("--url", default="http://127.0.0.1:23333")
    ap.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    ap.add_argument("--system", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    a = ap.parse_args(argv)
    terminal_chat(a.url, a.model, SamplingSettings(a.max_new_tokens, a.temperature, a.top_p), a.system)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
