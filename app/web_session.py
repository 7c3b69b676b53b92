"""A scripted session with the web page answering through an OpenAI-compatible server: LMDeploy's api_server started
from the run config (app.serve), or a server already running (--endpoint). Starts the page
(app.web, web=endpoint) on a free 127.0.0.1 port and drives it through its Gradio API with gradio_client:
a two-turn chat on one session (the follow-up refers to the first answer), a compare call, and a prompt longer than
the context, which the server refuses and the page shows as an error; then one more turn on that session, to show
the page still answers. Writes web_session.json (prompts, answers, wall times, both commands, versions) and both
logs under --out, stops both processes (their whole process groups) whatever happens, prints a summary table last.

    python -m app.web_session --out /tmp/ws -- model.path=/tmp/awq_ckpt quant=awq_w4 backend.session_len=2048
    python -m app.web_session --endpoint http://127.0.0.1:23333 --context-len 8192 --out /tmp/ws

Overrides after `--` are the run config's (as for app.serve; backend=lmdeploy is implied) and are passed to
the page too, so its title names the model and quantization that answer. A local AWQ checkpoint (AutoAWQ GEMM
format: `quantization_config.quant_method == "awq"` in config.json, as quant/export/awq.py writes) is served with
`--model-format awq --dtype float16`; its tokenizer files must be in the same directory. The page in endpoint mode
loads no local model: the server enforces its own context (session_len) and the page shows its refusal.

On the GPU machine (no internet; Python 3.12), four consecutive commands make results/gpu/web_session.json, the
machine kept warm between them (it keeps /tmp); each line's `carry` names what travels with it:

    mkdir -p /tmp/ppl && cp .device/ppl/parts/model.safetensors.part0 /tmp/ppl/      # carry .device/ppl/parts/model.safetensors.part0
    mkdir -p /tmp/ppl && cp .device/ppl/parts/model.safetensors.part1 /tmp/ppl/      # carry .device/ppl/parts/model.safetensors.part1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/gradio_whl/*.whl   # carry .device/gradio_whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl && export PYTHONPATH=$PWD/.device/lmdeploy:/tmp/site && mkdir -p /tmp/awq_ckpt && cp .device/ppl/ckpt/* /tmp/awq_ckpt/ && cat /tmp/ppl/model.safetensors.part0 /tmp/ppl/model.safetensors.part1 > /tmp/awq_ckpt/model.safetensors && python3 -m app.web_session --out $OUT -- model.path=/tmp/awq_ckpt quant=awq_w4 backend.cache_max_entry_count=0.4 backend.session_len=2048   # carry .device/whl, .device/lmdeploy, .device/ppl/ckpt

(The gradio wheels, 34 MiB, install in a call of their own: a call carries at most 64 MiB, working tree included. The
API server's first W4A16 request autotunes Triton kernels; a warm-up request straight to the server takes that cost
before the page's calls are timed.) Then, here: `cp <files_at>/web_session*.{json,log} results/gpu/`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from app.browser import REPO, free_port, log_tail, wait_page
from app.serve import start_server, stop_server, wait_healthy
from harness import exposure
from harness.log import logger

NAME = "web_session"
# the scripted conversation: the follow-up only makes sense with the first answer in the history
CHAT_TURNS = ("Name one river in Europe. Answer in one sentence.",
              "Which sea does the river you just named flow into?")
COMPARE_PROMPT = "Write one sentence about the sea."
AFTER_REFUSAL = "Say hello in one short sentence."
# ~13 tokens a sentence in any BPE vocabulary; the long prompt holds at least two words per context token
FILLER = "The river carries the silt of the hills down to the sea. "
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


log = logger("web_session")


class SessionSetupError(RuntimeError):
    """Something to fix before anything starts (a bad model path or config, a missing package)."""


@dataclass
class Call:
    """One request through the page's API and what came back."""

    step: str  # chat 1, chat 2, compare, too long, after refusal
    api: str  # /chat or /compare
    session: str  # which gradio_client session (one chat history each)
    prompt: str
    answer: str
    status: str
    wall_s: float
    ok: bool  # answered (or, for the long prompt, refused)
    prompt_chars: int = 0
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ before anything starts


def long_prompt(context_len: int) -> str:
    """A prompt that cannot fit `context_len` tokens: at least two words per token of the context."""
    words_per = len(FILLER.split())
    return FILLER * math.ceil(2 * context_len / words_per)


def model_context_len(model_dir: Path) -> int:
    """What LMDeploy uses for session_len when none is given: the config's max_position_embeddings."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    n = text.get("max_position_embeddings") or text.get("max_sequence_length") or text.get("seq_length")
    if not n:
        raise SessionSetupError(f"{model_dir}/config.json names no context length; set backend.session_len")
    return int(n)


def check_checkpoint(cfg, model_dir: Path) -> dict:
    """The served directory must be a complete HF checkpoint with its tokenizer, and an AWQ one when the config says
    AWQ (else LMDeploy would serve it unquantized and the page would name the wrong variant)."""
    from harness.config import ConfigError
    from backends import lmdeploy as lb

    if not (model_dir / "config.json").exists():
        raise SessionSetupError(f"model.path: {model_dir} has no config.json (not a HF checkpoint)")
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise SessionSetupError(f"model.path: {model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}); LMDeploy "
                                f"loads it from the model directory: copy the tokenizer files there")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise SessionSetupError(f"model.path: {model_dir} has no weights (*.safetensors, *.bin)")
    try:
        fmt = lb.checkpoint_format(model_dir)
    except ConfigError as e:
        raise SessionSetupError(str(e)) from None
    meta_path = model_dir / "quant_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta and meta.get("file_bytes") and (model_dir / "model.safetensors").exists():
        size = (model_dir / "model.safetensors").stat().st_size
        if size != meta["file_bytes"]:  # a checkpoint that travelled in parts and was joined short
            raise SessionSetupError(f"{model_dir}/model.safetensors is {size:,} bytes; quant_meta.json says "
                                    f"{meta['file_bytes']:,} (incomplete copy?)")
    q = cfg.quant
    if q.method != "fp16":
        if fmt != "awq":
            raise SessionSetupError(f"quant.method={q.method} but {model_dir} is not an AWQ checkpoint (no "
                                    f"quantization_config with quant_method 'awq' in config.json); LMDeploy would "
                                    f"serve it unquantized")
        qcfg = json.loads((model_dir / "config.json").read_text())["quantization_config"]
        if (q.w_bit, q.group_size) != (qcfg.get("bits"), qcfg.get("group_size")):
            raise SessionSetupError(f"quant: w{q.w_bit} g{q.group_size} but {model_dir} holds w{qcfg.get('bits')} "
                                    f"g{qcfg.get('group_size')}; set quant.w_bit={qcfg.get('bits')} "
                                    f"quant.group_size={qcfg.get('group_size')}")
    elif fmt == "awq":
        log(f"note: {model_dir} is an AWQ checkpoint but the config says quant=fp16 (the page will label it FP16); "
            f"add quant=awq_w4")
    return {"model_format": fmt, "quant_meta": meta}


def check_imports(server: bool) -> None:
    import importlib.util

    need = ["gradio", "gradio_client"] + (["lmdeploy"] if server else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise SessionSetupError(f"{', '.join(missing)} cannot be imported here; on the GPU machine install "
                                f".device/gradio_whl and .device/whl into /tmp/site and put .device/lmdeploy and "
                                f"/tmp/site on PYTHONPATH (see this module's docstring)")


def web_command(base_url: str, port: int, overrides: list[str], max_new_tokens: int,
                timeout_s: float) -> list[str]:
    """The page as the web client of `base_url` (web=endpoint: no local model loads), loopback only."""
    return [sys.executable, "-m", "app.web", *overrides, "web=endpoint", f"web.endpoint.url={base_url}",
            "web.host=127.0.0.1", f"web.port={port}", f"web.max_new_tokens={max_new_tokens}",
            f"web.compare_max_new_tokens={max_new_tokens}", f"web.endpoint.timeout_s={timeout_s:g}"]


def web_labels(web_cmd: list[str]) -> tuple[str, list[str], str]:
    """(the chat choice that is the endpoint, the compare columns, the page title), composed here the way the page
    composes them; a bad override fails here, before any server starts."""
    from app.web_config import ENDPOINT, compose_web
    from app.local_models import variant_label

    setup = compose_web(web_cmd[3:])
    endpoint = next(v.label for v in setup.chat if v.name == ENDPOINT)
    own = variant_label(setup.cfg.run_config())
    title = f"{setup.cfg.model.name} · {own} · via {setup.cfg.web.endpoint.url}"  # app.web_ui.title_of
    return endpoint, [v.label for v in setup.compare], title


# ------------------------------------------------------------------------------------------------- the processes


def stop_group(proc: Optional[subprocess.Popen], what: str, grace_s: float = 20) -> None:
    """SIGINT to the process group (app.serve.stop_server), SIGKILL after `grace_s`; then SIGKILL whatever
    of the group outlived its leader (an engine's worker processes)."""
    if proc is None:
        return
    stop_server(proc, grace_s)
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        log(f"stopped {what} (pid {proc.pid}, exit {proc.returncode})")
        return
    os.killpg(proc.pid, signal.SIGKILL)
    log(f"stopped {what} (pid {proc.pid}, exit {proc.returncode}); killed the rest of its process group")


# --------------------------------------------------------------------------------------------------- the session


def _text(content) -> str:
    """A chatbot message's content as text (a string, or Gradio's list of {type: text, text} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return "" if content is None else str(content)


def _strip_html(s: str) -> str:
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", s)).strip()


def run_session(app_url: str, endpoint_label: str, compare_labels: list[str], context_len: int,
                max_new_tokens: int) -> list[Call]:
    """The scripted session through the page's API (app/web_ui.py: /chat and /compare; greedy throughout)."""
    from gradio_client import Client

    calls: list[Call] = []

    def chat(client, session: str, step: str, prompt: str, refusal: bool = False) -> Call:
        t0 = time.perf_counter()
        conv, _msg, status = client.predict(prompt, endpoint_label, "", 0.0, 0.9, max_new_tokens, api_name="/chat")
        wall = time.perf_counter() - t0
        answer = _text(conv[-1]["content"]) if conv and conv[-1]["role"] == "assistant" else ""
        failed = status.startswith("**Error**")
        if refusal:  # the server's refusal names the limit (LMDeploy: "Input length (N) must be smaller than the
            # model context length (S)."), which a server that is down or failing would not
            failed = failed and bool(re.search(r"length|context|too long|exceed", status, re.I))
        c = Call(step, "/chat", session, prompt if len(prompt) <= 500 else f"{prompt[:120]}… ({len(prompt):,} "
                 f"characters: {FILLER.strip()!r} repeated)", answer, status, wall,
                 ok=failed if refusal else (not failed and bool(answer.strip())), prompt_chars=len(prompt),
                 extra={"conversation_messages": len(conv)})
        log(f"{step}: {wall:.2f} s · {status[:160]}")
        calls.append(c)
        return c

    a = Client(app_url, verbose=False, analytics_enabled=False)
    for i, p in enumerate(CHAT_TURNS, 1):
        chat(a, "A", f"chat {i}", p)
    t0 = time.perf_counter()
    *cols, status = a.predict(COMPARE_PROMPT, "", compare_labels, True, max_new_tokens, 0.0, 0.9, api_name="/compare")
    wall = time.perf_counter() - t0
    n = len(compare_labels)
    answers, stats = [_strip_html(h) for h in cols[:n]], list(cols[n:])
    calls.append(Call("compare", "/compare", "A", COMPARE_PROMPT, answers[0], status, wall,
                      ok=status.startswith("Done.") and all(x and "⚠️" not in x for x in answers),
                      prompt_chars=len(COMPARE_PROMPT),
                      extra={"columns": [{"label": lab, "answer": ans, "stats": st}
                                         for lab, ans, st in zip(compare_labels, answers, stats)]}))
    log(f"compare: {wall:.2f} s · {status[:160]} · {stats[0][:160] if stats else ''}")
    b = Client(app_url, verbose=False, analytics_enabled=False)
    chat(b, "B", "too long", long_prompt(context_len), refusal=True)
    chat(b, "B", "after refusal", AFTER_REFUSAL)
    return calls


def summary_table(calls: list[Call]) -> str:
    def cut(s: str, n: int) -> str:
        s = " ".join(s.split())
        return s if len(s) <= n else s[: n - 1] + "…"

    rows = [("step", "session", "wall_s", "ok", "prompt", "answer / status")]
    for c in calls:
        shown = c.answer if c.ok and c.step != "too long" else c.status
        rows.append((c.step, c.session, f"{c.wall_s:.2f}", "yes" if c.ok else "NO", cut(c.prompt, 34), cut(shown, 70)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def versions() -> dict:
    """torch, CUDA, GPU and LMDeploy (harness.environment.environment), plus the page's packages."""
    from importlib import metadata

    from harness.environment import environment

    env = environment()
    for pkg in ("gradio", "gradio_client", "huggingface_hub", "httpx", "fastapi", "uvicorn"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    return env


# ----------------------------------------------------------------------------------------------------------- main


def _on_sigterm(signum, frame):  # a run killed at its time limit still stops both processes (the finally below)
    raise SystemExit(128 + signum)


@dataclass
class Plan:
    """What the session will start, worked out (and checked) before anything starts."""

    base_url: str  # the OpenAI-compatible server
    context_len: int
    context_from: str
    server_cmd: Optional[list[str]]  # None: --endpoint, a server already running
    server_env: Optional[dict]
    server: dict  # the record's description of the server
    web_cmd: list[str]
    web_port: int
    endpoint_label: str
    compare_labels: list[str]
    title: str


def make_plan(a: argparse.Namespace, server_log: Path) -> Plan:
    """Raises SessionSetupError, ConfigError, ModelUnavailableError, Hydra's errors on a bad setup."""
    server_cmd = server_env = None
    server: dict = {}
    if a.endpoint:
        from app.openai_client import base_url

        base = base_url(a.endpoint)
        if a.context_len is None:
            raise SessionSetupError("--endpoint needs --context-len (the server's session_len in tokens), to size "
                                    "the prompt it must refuse")
        context_len, context_from = a.context_len, "--context-len"
    else:
        from backends import lmdeploy as lb
        from harness import synthetic
        from harness.compose import compose
        import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

        cfg = compose(["backend=lmdeploy", *a.overrides])
        from app.serve import serving_dir

        model_dir, _ = serving_dir(cfg, a.synthetic_root, a.tokenizer)  # a weight quant: its exported AWQ checkpoint
        synthetic.check_tokenizer_fits(model_dir)
        checkpoint = check_checkpoint(cfg, Path(model_dir))
        engine, reason = lb.choose_engine(cfg)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server_cmd, server_env = lb.api_server_command(cfg, model_dir, "127.0.0.1", port, engine), lb.engine_env(cfg)
        if a.context_len:
            context_len, context_from = a.context_len, "--context-len"
        elif cfg.backend.session_len:
            context_len, context_from = cfg.backend.session_len, "backend.session_len"
        else:
            context_len, context_from = model_context_len(Path(model_dir)), "config.json max_position_embeddings"
        server = {"command": exposure.redact(server_cmd), "engine": engine, "engine_fallback_reason": reason,
                  "engine_kwargs": lb.engine_kwargs(cfg, model_dir, engine), "model_dir": str(model_dir),
                  "synthetic": synthetic.is_synthetic(model_dir), **checkpoint, "log": server_log.name}
    web_port = free_port()
    web_cmd = web_command(base, web_port, a.overrides, a.max_new_tokens, a.request_timeout)
    endpoint_label, compare_labels, title = web_labels(web_cmd)
    check_imports(server=server_cmd is not None)
    return Plan(base, context_len, context_from, server_cmd, server_env, server, web_cmd, web_port, endpoint_label,
                compare_labels, title)


def checks(calls: list[Call]) -> dict:
    """What the session is meant to show, one flag each."""
    steps = {c.step: c for c in calls}

    def ok(step: str) -> bool:
        return step in steps and steps[step].ok

    return {"chat_turns_answered": all(ok(f"chat {i}") for i in range(1, len(CHAT_TURNS) + 1)),
            # the page's conversation on that session holds both exchanges: the follow-up was sent with the first
            "one_session_history": ok("chat 2")
            and steps["chat 2"].extra.get("conversation_messages") == 2 * len(CHAT_TURNS),
            "compare_answered": ok("compare"),
            "long_prompt_refused": ok("too long"),
            "answers_after_refusal": ok("after refusal")}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="a scripted gradio_client session with the web page over an "
                                             "OpenAI-compatible server (LMDeploy's api_server by default)")
    ap.add_argument("--out", required=True, help="folder for web_session.json and the two logs")
    ap.add_argument("--endpoint", help="use this running server (http://host:port) instead of starting LMDeploy")
    ap.add_argument("--context-len", type=int, help="the server's context in tokens, to size the prompt it must "
                                                    "refuse (default: backend.session_len, else the model config's "
                                                    "max_position_embeddings; needed with --endpoint)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--server-timeout", type=float, default=360, help="seconds for /v1/models to answer")
    ap.add_argument("--web-timeout", type=float, default=300, help="seconds for the page to answer")
    ap.add_argument("--request-timeout", type=float, default=300,
                    help="the page's web.endpoint.timeout_s (the first W4A16 request autotunes Triton kernels)")
    ap.add_argument("--synthetic-root", default=None)
    ap.add_argument("--tokenizer", help="tokenizer files for a synthetic checkpoint (as app.serve)")
    ap.add_argument("overrides", nargs="*", help="run config overrides, e.g. model.path=/tmp/ckpt quant=awq_w4")
    a = ap.parse_args(argv)
    out = Path(a.out)
    server_log, web_log, record_path = out / f"{NAME}_server.log", out / f"{NAME}_web.log", out / f"{NAME}.json"

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.config import ConfigError
    from harness.models import ModelUnavailableError

    try:  # everything that can be wrong is found before anything starts
        plan = make_plan(a, server_log)
    except (SessionSetupError, ConfigError, ModelUnavailableError, HydraException, OmegaConfBaseException,
            ValueError) as e:
        print(f"web_session: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    app_url = f"http://127.0.0.1:{plan.web_port}/"
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": "endpoint" if a.endpoint else "lmdeploy",
              "session_command": [Path(sys.executable).name, "-m", "app.web_session", *argv],
              "overrides": a.overrides, "base_url": plan.base_url, "context_len": plan.context_len,
              "context_len_from": plan.context_from, "max_new_tokens": a.max_new_tokens,
              "sampling": "greedy (temperature 0)", "server": plan.server or None,
              "web": {"command": plan.web_cmd, "url": app_url, "title": plan.title, "chat_with": plan.endpoint_label,
                      "compare_columns": plan.compare_labels, "log": web_log.name}}

    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.perf_counter()
    srv = web = None
    calls: list[Call] = []
    error = None
    try:
        if plan.server_cmd is not None:
            log(("SYNTHETIC weights: the answers are noise. " if plan.server["synthetic"] else "")
                + " ".join(exposure.redact(plan.server_cmd)))
            srv = start_server(plan.server_cmd, server_log, env=plan.server_env)
            record["server"]["pid"] = srv.pid
        models, waited = wait_healthy(plan.base_url, srv, a.server_timeout)
        record["models"] = models
        if plan.server:
            record["server"]["healthy_after_s"] = waited
        log(f"server healthy after {waited:.0f} s at {plan.base_url}; models {models}")
        record["warmup"] = warm_up(plan.base_url, models[0], a.max_new_tokens, a.request_timeout)
        log(f"warm-up request (straight to the server, not through the page): {record['warmup']['wall_s']:.2f} s")
        log(" ".join(plan.web_cmd))
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # from any directory
        web = start_server(plan.web_cmd, web_log, env=dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1",
                                                            GRADIO_ANALYTICS_ENABLED="False"))
        record["web"]["pid"] = web.pid
        record["web"]["ready_after_s"] = wait_page(app_url, web, web_log, a.web_timeout)
        log(f"page up after {record['web']['ready_after_s']:.0f} s at {app_url}")
        calls = run_session(app_url, plan.endpoint_label, plan.compare_labels, plan.context_len, a.max_new_tokens)
    except BaseException as e:  # recorded, then raised again once both processes are stopped
        error = e
    finally:
        try:
            stop_group(web, "the web app")
        finally:
            stop_group(srv, "the api_server")
            signal.signal(signal.SIGTERM, previous_sigterm)
    record.update(calls=[asdict(c) for c in calls], checks=checks(calls),
                  error=None if error is None else f"{type(error).__name__}: {error}",
                  total_s=time.perf_counter() - t_start)
    try:
        record["versions"] = versions()
    except Exception as e:  # the record is written whatever this says
        record["versions"] = {"error": f"{type(e).__name__}: {e}"}
    from harness.records import write_json_atomic

    write_json_atomic(record_path, record)
    log(f"wrote {record_path}")
    if error is not None and not isinstance(error, Exception):
        raise error  # KeyboardInterrupt, SystemExit (SIGTERM): after the record, as it was
    if error is not None:
        for path in (server_log, web_log):
            if path.exists():
                log(f"the end of {path}:\n{log_tail(path, 2000)}")
        log(f"FAILED: {record['error']}")
    log("checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in record["checks"].items()))
    if calls:
        print(summary_table(calls), flush=True)
    return 0 if error is None and all(record["checks"].values()) else 1


def warm_up(base: str, model: str, max_new_tokens: int, timeout_s: float) -> dict:
    """One request straight to the server before the page's calls, so their wall times leave out the first
    request's one-off costs (kernel autotuning, graph capture)."""
    from app.chat_logic import SamplingSettings
    from app.openai_client import stream_chat

    t0 = time.perf_counter()
    snap = None
    for snap in stream_chat(base, model, [{"role": "user", "content": "Hello."}],
                            SamplingSettings(max_new_tokens, greedy=True), timeout_s):
        pass
    return {"wall_s": time.perf_counter() - t0, "tokens": snap.n_tokens if snap else 0,
            "finish_reason": snap.finish_reason if snap else None}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
