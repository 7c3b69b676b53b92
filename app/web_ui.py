"""The Gradio Blocks page: Chat, Compare and Results tabs over an `Answerer`. Layout and event wiring only; what an
answer is, how history fits the context and where two streams diverge live in app.chat_logic.

Each browser session has its own history (gr.State) and its own stop event (keyed by Gradio's session hash), so Stop
ends that session's answer, keeps what was said so far, and leaves other sessions alone. Local generation runs one
at a time (one concurrency group): on a CPU two at once would only halve each other's tokens/s."""
from __future__ import annotations

import html
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: this page runs offline

import gradio as gr  # noqa: E402

from app.answerer import Answerer, Note  # noqa: E402
from app.chat_logic import (SamplingSettings, Snapshot, add_exchange, answer_html, build_messages,  # noqa: E402
                                describe_divergence, describe_speed, divergence, divergence_char_offset)

CSS = """
.answer { white-space: pre-wrap; font-family: var(--font-mono); font-size: 0.92em; line-height: 1.45;
          min-height: 8em; padding: 8px; border: 1px solid var(--border-color-primary); border-radius: 6px; }
.answer mark.diverged { background: #ffe08a; color: inherit; }
.col-head p { margin: 0; }
.variant-state { font-size: 0.85em; opacity: 0.8; }
.stats { font-size: 0.9em; }
"""

MODEL_CONCURRENCY = "model"  # one local generation at a time, whichever tab asked


def title_of(ans: Answerer) -> str:
    """The model and the quantization config the chat answers with (and the endpoint, when it answers)."""
    cfg = ans.setup.cfg
    own = next(v for v in ans.setup.chat if v.name == "config")
    where = f" · via {cfg.web.endpoint.url}" if ans.setup.chat[0].run is None else ""
    return f"{cfg.model.name} · {own.label}{where}"


class Sessions:
    """A stop event per browser session."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fresh(self, request: gr.Request) -> threading.Event:
        with self._lock:
            ev = self._events[request.session_hash] = threading.Event()
            return ev

    def stop(self, request: gr.Request) -> None:
        with self._lock:
            ev = self._events.get(request.session_hash)
        if ev is not None:
            ev.set()

    def forget(self, request: gr.Request) -> None:
        with self._lock:
            self._events.pop(request.session_hash, None)


def build_app(ans: Answerer) -> gr.Blocks:
    setup, web = ans.setup, ans.setup.cfg.web
    chat_by_label = {v.label: v for v in setup.chat}
    compare = setup.compare
    ref_label = compare[0].label if compare else ""
    sessions = Sessions()
    title = title_of(ans)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {html.escape(title)}")
        gr.Markdown(_subtitle(ans), elem_classes=["variant-state"])
        with gr.Tabs():
            # ---------------------------------------------------------------- chat
            with gr.Tab("Chat", id="chat"):
                history = gr.State([])  # what the model is sent: the exchanges that were answered
                shown_state = gr.State([])  # what the page shows: those plus failed turns with their errors
                with gr.Row():
                    chat_variant = gr.Dropdown(list(chat_by_label), value=setup.chat[0].label, label="Answer with",
                                               elem_id="chat-variant", scale=3)
                    system = gr.Textbox(web.system_prompt, label="System prompt", lines=1, scale=5,
                                        placeholder="(the chat template's default)", elem_id="chat-system")
                chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="chat-bot", buttons=["copy"],
                                     feedback_options=None)
                with gr.Row():
                    msg = gr.Textbox(show_label=False, placeholder="Message (Enter sends)", scale=8, elem_id="chat-input")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
                    clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
                chat_status = gr.Markdown("", elem_id="chat-status", elem_classes=["stats"])
                with gr.Row():
                    temperature = gr.Slider(0.0, 2.0, web.temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, web.top_p, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, 2048, web.max_new_tokens, step=1, label="Max new tokens", elem_id="chat-max-new")

                # argument names are the API's (gradio_client: predict(message, answer_with, ..., api_name="/chat"))
                def chat_send(message, hist, seen, answer_with, system_prompt, temperature, top_p, max_new_tokens,
                              request: gr.Request, progress=gr.Progress(track_tqdm=True)):
                    user = (message or "").strip()
                    if not user:
                        yield seen, hist, seen, "", "Type a message first."
                        return
                    stop_ev = sessions.fresh(request)
                    v = chat_by_label[answer_with]
                    messages = build_messages(system_prompt, hist[-2 * web.max_turns:], user)
                    settings = SamplingSettings(int(max_new_tokens), float(temperature), float(top_p))
                    shown = list(seen) + [{"role": "user", "content": _clip(user)}, {"role": "assistant", "content": ""}]
                    notes, snap = [], Snapshot()
                    yield shown, hist, seen, "", f"{v.label}: waiting for the first token"
                    try:
                        for ev in ans.answer(v, messages, settings, stop_ev):
                            if isinstance(ev, str):
                                if isinstance(ev, Note):
                                    notes.append(ev)
                                yield shown, hist, seen, "", f"{v.label}: {ev}"
                                continue
                            snap = ev
                            shown[-1] = {"role": "assistant", "content": snap.text}
                            yield shown, hist, seen, "", " · ".join([f"{v.label} answering: {describe_speed(snap)}",
                                                                     *notes])
                    except Exception as e:  # shown in the page (the failed turn is not sent again); the app keeps serving
                        shown[-1] = {"role": "assistant", "content": f"⚠️ {e}"}
                        yield shown, hist, shown, user, f"**Error** ({v.label}): {html.escape(str(e))}"
                        return
                    shown[-1] = {"role": "assistant", "content": snap.text}
                    new_hist = add_exchange(hist, user, snap.text)
                    yield shown, new_hist, shown, "", " · ".join([f"{v.label} answered: {describe_speed(snap)}", *notes])

                chat_io = dict(fn=chat_send, inputs=[msg, history, shown_state, chat_variant, system, temperature,
                                                     top_p, max_new],
                               outputs=[chatbot, history, shown_state, msg, chat_status],
                               concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1, show_progress="minimal")
                send.click(**chat_io, api_name="chat")  # also the scripted (gradio_client) way in
                msg.submit(**chat_io, api_name=False)
                stop.click(sessions.stop, None, None, queue=False, api_name=False)
                chatbot.clear(lambda: ([], [], ""), None, [history, shown_state, chat_status], queue=False,
                              api_name=False)  # the chatbot's own trash button clears the history too
                clear.click(lambda: ([], [], [], "", ""), None, [chatbot, history, shown_state, msg, chat_status],
                            queue=False, api_name=False)

            # ---------------------------------------------------------------- compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", lines=2, scale=6, elem_id="cmp-prompt",
                                        placeholder="One prompt, answered by every selected variant in turn")
                    with gr.Column(scale=1, min_width=120):
                        run = gr.Button("Compare", variant="primary", elem_id="cmp-run")
                        cmp_stop = gr.Button("Stop", elem_id="cmp-stop")
                with gr.Row():
                    selected = gr.CheckboxGroup([v.label for v in compare], value=[v.label for v in compare],
                                                label="Variants", scale=4, elem_id="cmp-variants")
                    greedy = gr.Checkbox(True, label="Greedy", info="argmax decoding: differences come from "
                                         "quantization alone", scale=2, elem_id="cmp-greedy")
                    cmp_max_new = gr.Slider(1, 1024, web.compare_max_new_tokens, step=1, label="Max new tokens", scale=2)
                with gr.Accordion("System prompt and sampling (used when Greedy is off)", open=False):
                    with gr.Row():
                        cmp_system = gr.Textbox(web.system_prompt, label="System prompt", lines=1, scale=4,
                                                placeholder="(the chat template's default)")
                        cmp_temp = gr.Slider(0.0, 2.0, web.temperature, step=0.05, label="Temperature", scale=2)
                        cmp_top_p = gr.Slider(0.05, 1.0, web.top_p, step=0.05, label="Top-p", scale=2)
                cmp_status = gr.Markdown("", elem_id="cmp-status", elem_classes=["stats"])
                heads, answers, stats = [], [], []
                with gr.Row(equal_height=False):
                    for i, v in enumerate(compare):
                        with gr.Column(min_width=220, elem_id=f"cmp-col-{i}"):
                            role = " · reference" if i == 0 and len(compare) > 1 else ""
                            gr.Markdown(f"**{html.escape(v.label)}**{role}", elem_classes=["col-head"])
                            heads.append(gr.Markdown("", elem_id=f"cmp-state-{i}", elem_classes=["variant-state"]))
                            answers.append(gr.HTML(answer_html(""), elem_id=f"cmp-answer-{i}"))
                            stats.append(gr.Markdown("", elem_id=f"cmp-stats-{i}", elem_classes=["stats"]))
                if any(v.run is not None and v.run.quant.method != "fp16" for v in compare):
                    gr.Markdown("In-process variants hold their quantized weights dequantized (the harness's "
                                "simulation), so tokens/s differs from FP16's by noise only; W4A16 speed-ups need real "
                                "int4 kernels, e.g. LMDeploy behind `web=endpoint`.", elem_classes=["variant-state"])

                def compare_run(prompt, system_prompt, variants, greedy, max_new_tokens, temperature, top_p,
                                request: gr.Request, progress=gr.Progress(track_tqdm=True)):
                    text = (prompt or "").strip()
                    html_out, stat_out = [answer_html("")] * len(compare), [""] * len(compare)
                    if not text:
                        yield *html_out, *stat_out, "Type a prompt first."
                        return
                    stop_ev = sessions.fresh(request)
                    settings = SamplingSettings(int(max_new_tokens), float(temperature), float(top_p), greedy=bool(greedy))
                    messages = build_messages(system_prompt, [], text)
                    ref: Snapshot | None = None
                    for i, v in enumerate(compare):
                        if v.label not in variants:
                            stat_out[i] = "not selected"
                            continue
                        if stop_ev.is_set():
                            stat_out[i] = "stopped"
                            continue
                        status = f"answering with {v.label} ({i + 1}/{len(compare)})"
                        yield *html_out, *stat_out, status
                        notes: list[str] = []
                        try:
                            for ev in ans.answer(v, messages, settings, stop_ev):
                                if isinstance(ev, str):
                                    if isinstance(ev, Note):
                                        notes.append(ev)
                                    stat_out[i] = html.escape(ev)
                                    yield *html_out, *stat_out, status
                                    continue
                                html_out[i], stat_out[i] = _render(ans, ev, ref if i > 0 else None, ref_label, notes)
                                yield *html_out, *stat_out, status
                                if i == 0 and ev.done:
                                    ref = ev
                        except Exception as e:  # one column's failure (endpoint down) leaves the others running
                            html_out[i] = f'<div class="answer error">⚠️ {html.escape(str(e))}</div>'
                            stat_out[i] = "**Error**"
                            yield *html_out, *stat_out, status
                    done = "Stopped." if stop_ev.is_set() else "Done."
                    legend = (f" Highlighted: where an answer departs from {ref_label}'s."
                              if ref is not None and len(compare) > 1 else "")
                    yield *html_out, *stat_out, done + legend

                run.click(compare_run, [prompt, cmp_system, selected, greedy, cmp_max_new, cmp_temp, cmp_top_p],
                          [*answers, *stats, cmp_status], concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1,
                          show_progress="minimal", api_name="compare").then(
                    lambda: [_state_line(ans, v) for v in compare], None, heads, api_name=False)
                cmp_stop.click(sessions.stop, None, None, queue=False, api_name=False)

            # ---------------------------------------------------------------- results
            with gr.Tab("Results", id="results"):
                gr.Markdown(f"Read-only: the tables and figures under `{setup.cfg.results_dir}/` "
                            f"(`python -m report` writes them).")
                figures = gr.Gallery(label="Figures (click one to enlarge)", columns=3, fit_columns=False, height="auto",
                                     object_fit="contain", interactive=False, elem_id="results-figures")
                with gr.Row():
                    table_pick = gr.Dropdown([], label="Table", scale=5, elem_id="results-pick")
                    reload_btn = gr.Button("Reload", size="sm", scale=1)
                table_view = gr.Markdown("", elem_id="results-table")

        results_root, results_globs = Path(setup.cfg.results_dir), web.results_globs

        def load_results():
            tables, figs = _results(results_root, results_globs)
            first = next(iter(tables), None)
            return (gr.Dropdown(choices=list(tables), value=first), _table_text(results_root, first), figs)

        def on_load():
            return [_state_line(ans, v) for v in compare] + list(load_results())

        demo.load(on_load, None, [*heads, table_pick, table_view, figures], api_name=False)
        reload_btn.click(load_results, None, [table_pick, table_view, figures], api_name=False)
        table_pick.change(lambda name: _table_text(results_root, name), table_pick, table_view, api_name=False)
        demo.unload(sessions.forget)
    return demo


def _clip(text: str, limit: int = 1500) -> str:
    """A very long message as the page shows it (the model gets all of it)."""
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text):,} characters in all)"


def _render(ans: Answerer, snap: Snapshot, ref: Snapshot | None, ref_label: str, notes: list[str]) -> tuple[str, str]:
    parts = [describe_speed(snap)]
    split = None
    if ref is not None:
        d = divergence(ref, snap)
        decode = (lambda ids: ans.local.tokenizer.decode(ids, skip_special_tokens=True)) if d.unit == "token" else None
        what = describe_divergence(d, ref_label, done=snap.done)
        if decode is not None and d.position is not None:
            pair = [repr(decode(x.token_ids[d.position:d.position + 1])) if d.position < len(x.token_ids) else "(end)"
                    for x in (ref, snap)]
            what += f" ({pair[0]} → {pair[1]})"
        parts.append(what)
        split = divergence_char_offset(snap, d, decode)
    return answer_html(snap.text, split), " · ".join(parts + notes)


def _state_line(ans: Answerer, v) -> str:
    return html.escape(ans.describe_state(v))


def _subtitle(ans: Answerer) -> str:
    cfg = ans.setup.cfg
    bits = [f"model `{cfg.model.path}` ({cfg.model.dtype}, {cfg.model.device})"]
    if cfg.model.reference_note:
        bits.append(cfg.model.reference_note)
    if cfg.web.endpoint.url:
        bits.append(f"endpoint `{cfg.web.endpoint.url}`")
    return " · ".join(bits)


def _results(root: Path, globs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Markdown tables (paths relative to the results folder) and figures (path, caption) that match the globs."""
    tables, figures = [], []
    for pattern in globs:
        for p in sorted(root.glob(pattern)):
            rel = str(p.relative_to(root))
            if p.suffix == ".md":
                tables.append(rel)
            elif p.suffix.lower() in (".png", ".jpg", ".jpeg", ".svg"):
                figures.append((str(p), rel))
    return tables, figures


def _table_text(root: Path, rel: str | None) -> str:
    if not rel:
        return f"No tables under `{root}/` yet: `make demo` (runs, then `python -m report`) writes them."
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:  # only files under the results folder are shown
        return f"`{rel}` is not under `{root}/`"
    return path.read_text()
