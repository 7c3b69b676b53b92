"""Serve a model behind LMDeploy's OpenAI-compatible API, from the harness's config, and talk to it.

    python -m app.serve -- model=smollm2_135m backend=lmdeploy kv=int8          # serve until Ctrl-C
    python -m app.serve --ask "Say hello." --out results/gpu/serve_chat.json -- model=smollm2_135m_synthetic

The server is `lmdeploy serve api_server` started with the run's cache share (backend.cache_max_entry_count), KV
quant policy (kv.bits), max batch size, session length and tp, and `--model-format awq` for AWQ checkpoints
(backends.lmdeploy.api_server_command). A weight quant (`quant=awq_w4`, `rtn_w4`, ...) of a real model is first
exported through experiments.export (the quantized-weight cache, then the AWQ GEMM checkpoint) into
`--export-dir` (default <cache>/serve/<run_id>, replaced on each start when the harness wrote it), and that folder is
served; a method the AWQ format cannot hold (e.g. SmoothQuant) is refused in one line, and so is a machine without
a GPU or LMDeploy (the preflight experiments.run gives backend=lmdeploy), before anything is resolved or written.
A synthetic model is written in the quant's format directly (harness.synthetic); a folder that already holds a
quantized checkpoint is served as it is. It binds 127.0.0.1. Another --host needs API keys, from the environment
only (QH_API_KEYS=key1,key2: `--api-keys` of the server, never printed or recorded; harness.exposure); without one
it refuses to start. Health is polled on /v1/models (start-up takes a minute or more: the engine loads the weights
and captures CUDA graphs). The clients here send the first key as `Authorization: Bearer`. The client is the
`openai` package.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from harness import exposure
from harness.log import logger


log = logger("serve")


def parse_models(body: str) -> list[str]:
    """The model ids in a /v1/models answer ({"object": "list", "data": [{"id": ...}, ...]})."""
    return [m["id"] for m in json.loads(body).get("data", [])]


def wait_healthy(base_url: str, proc: Optional[subprocess.Popen] = None, timeout_s: float = 600,
                 interval_s: float = 2.0, fetch=None) -> tuple[list[str], float]:
    """Poll GET {base_url}/v1/models until it lists a model; (model ids, seconds waited). Fails early if the server
    process exits."""
    fetch = fetch or (lambda url: urllib.request.urlopen(
        urllib.request.Request(url, headers=exposure.auth_headers()), timeout=5).read().decode())
    t0 = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"api_server exited with {proc.returncode} before it was healthy")
        try:
            ids = parse_models(fetch(f"{base_url}/v1/models"))
            if ids:
                return ids, time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{base_url}/v1/models did not answer within {timeout_s:.0f} s")
        time.sleep(interval_s)


def chat_completion(base_url: str, model: str, messages: list[dict], max_tokens: int = 64,
                    temperature: float = 0.0) -> dict:
    """One chat completion through the openai client; the answer and its usage as a plain dict."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=exposure.client_api_key())
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature)
    return {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
            "usage": r.usage.model_dump() if r.usage else None, "latency_s": time.perf_counter() - t0,
            "response": r.model_dump()}


def start_server(cmd: list[str], log_path: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.Popen:
    """`env`: the server's environment (backends.lmdeploy.engine_env keeps NVLink multicast off for tp > 1)."""
    out = open(log_path, "w") if log_path else None
    # its own process group, so stopping it stops the engine's workers too
    return subprocess.Popen(cmd, stdout=out or None, stderr=subprocess.STDOUT if out else None, start_new_session=True,
                            env=env)


def stop_server(proc: subprocess.Popen, grace_s: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def export_dir_of(cfg, export_root: Optional[Path] = None) -> Path:
    """Where serving puts cfg's exported checkpoint: <export_root or <cache>/serve>/<run_id>."""
    from harness.assets import cache_root
    from harness.records import run_id

    return Path(export_root or cache_root() / "serve") / run_id(cfg)


def serving_dir(cfg, synthetic_root=None, tokenizer_dir=None, export_root: Optional[Path] = None,
                export=None) -> tuple[Path, bool]:
    """(the folder LMDeploy serves for cfg, whether it was exported now): a synthetic checkpoint in the quant's format;
    the model's own folder when nothing is quantized or it already holds a quantized checkpoint; else cfg's AWQ
    checkpoint, exported (`export`: experiments.export.export, through the quantized-weight cache) into
    export_dir_of(cfg, export_root), which may only replace a folder the harness wrote there."""
    from backends import lmdeploy as lb
    from harness import synthetic

    if cfg.quant.method == "fp16" or synthetic.arch_name(cfg.model.path) is not None:
        return lb.resolve_model_dir(cfg, synthetic_root, tokenizer_dir), False
    from quant.export.awq import check_awq_config

    check_awq_config(cfg.quant)  # a method LMDeploy cannot load from an AWQ checkpoint: one line, nothing resolved
    model_dir = lb.resolve_model_dir(cfg)
    if lb.checkpoint_format(model_dir) is not None:  # already quantized (e.g. an earlier export): served as it is
        return model_dir, False
    if export is None:
        from experiments.export import export
    out = export_dir_of(cfg, export_root)
    log(f"quant.method={cfg.quant.method}: exporting the AWQ checkpoint to {out} (quantized weights are cached)")
    return Path(export(cfg, out, force=True)), True


def server_argv(cfg, model_dir, host: str = "127.0.0.1", port: int = 23333, engine: str = "pytorch",
                api_keys=None) -> list[str]:
    """The `lmdeploy serve api_server` command line for cfg serving `model_dir` (pure: nothing is started). A weight
    quant over an unquantized folder is refused: it would serve FP16 weights under the quant's name."""
    from backends import lmdeploy as lb
    from harness.config import user_error

    if cfg.quant.method != "fp16" and lb.checkpoint_format(model_dir) is None:
        raise user_error("quant.method", cfg.quant.method, f"{model_dir} holds unquantized weights",
                         "serve the folder serving_dir exports (app.serve does), or quant=fp16")
    return lb.api_server_command(cfg, model_dir, host, port, engine, api_keys=api_keys)


def main(argv: list[str]) -> None:
    from harness.compose import compose
    from harness.log import one_line_errors
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)
    from harness.config import ConfigError

    ap = argparse.ArgumentParser(description="lmdeploy serve api_server from the harness config")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=23333)
    ap.add_argument("--ask", help="send this user message once the server is healthy, print the answer, stop")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", help="write the exchange (command, timings, answer) to this JSON file")
    ap.add_argument("--server-log", help="the server's output goes here (default: this terminal)")
    ap.add_argument("--synthetic-root", default=None)
    ap.add_argument("--tokenizer", help="tokenizer files for a synthetic checkpoint")
    ap.add_argument("--export-dir", help="where a weight quant's AWQ checkpoint is exported (default: <cache>/serve)")
    ap.add_argument("--timeout", type=float, default=480)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model=smollm2_135m kv=int8")
    a = ap.parse_args(argv)

    from backends import BACKENDS
    from backends import lmdeploy as lb
    from harness import synthetic

    with one_line_errors(ConfigError):  # before any model is resolved or written
        keys = exposure.server_api_keys(a.host, "--host")
        cfg = compose(["backend=lmdeploy", *a.overrides])
        BACKENDS.get("lmdeploy").preflight(cfg)  # no GPU or no LMDeploy: the line experiments.run gives
    from experiments.export import user_errors

    with one_line_errors(*user_errors()):
        model_dir, exported = serving_dir(cfg, a.synthetic_root, a.tokenizer, a.export_dir)
        synthetic.check_tokenizer_fits(model_dir)
        engine, reason = lb.choose_engine(cfg)
        cmd = server_argv(cfg, model_dir, a.host, a.port, engine, api_keys=keys)
    shown = exposure.redact(cmd)  # what is printed and recorded: never the keys
    log(("SYNTHETIC weights: the answers are noise. " if synthetic.is_synthetic(model_dir) else "") + " ".join(shown))
    base = f"http://{a.host}:{a.port}"
    t0 = time.perf_counter()
    proc = start_server(cmd, Path(a.server_log) if a.server_log else None, env=lb.engine_env(cfg))
    try:
        models, waited = wait_healthy(base, proc, a.timeout)
        log(f"healthy after {waited:.0f} s at {base}; models {models}")
        if not a.ask:
            log("serving; Ctrl-C stops it")
            proc.wait()
            return
        messages = [{"role": "user", "content": a.ask}]
        answer = chat_completion(base, models[0], messages, a.max_tokens)
        print(answer["content"])
        record = {"command": shown, "engine": engine, "engine_fallback_reason": reason, "base_url": base,
                  "models": models, "healthy_after_s": waited, "messages": messages, "answer": answer,
                  "synthetic": synthetic.is_synthetic(model_dir), "checkpoint": synthetic.read_marker(model_dir),
                  "engine_kwargs": lb.engine_kwargs(cfg, model_dir, engine), "overrides": a.overrides,
                  "model_dir": str(model_dir), "exported": exported,
                  "total_s": time.perf_counter() - t0, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if a.out:
            from harness.environment import environment
            from harness.records import write_json_atomic

            record["environment"] = environment()
            write_json_atomic(Path(a.out), record)
            log(f"wrote {a.out}")
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main(sys.argv[1:])
