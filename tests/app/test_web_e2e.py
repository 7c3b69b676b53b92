"""The web page end to end in headless Chromium (Debian's package, driven by Playwright; no browser is downloaded):
`python -m app.web` on the embedded model at a free 127.0.0.1 port, a prompt in compare mode answered by FP16
and RTN w4, a chat that keeps each session's history apart, an endpoint that is down shown as an error while the
app keeps serving, a prompt longer than the context refused with the limit named, Stop keeping what was said; and
the same app scripted through gradio_client (its API), one session per client."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.browser import CHROMIUM, chromium, free_port, run_compare, running_app

pytestmark = pytest.mark.browser


def _ensure_chromium() -> None:
    """Chromium is installed by .ci/run (Debian's package), never by a test. In CI (CI=true) a missing browser fails
    the test; elsewhere it skips, saying how to install it."""
    if Path(CHROMIUM).exists():
        return
    msg = f"{CHROMIUM} is missing: apt-get install -y chromium (as root; .ci/run does this)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    dead = free_port()  # nothing listens there: the endpoint that is down
    overrides = ["web.compare=[fp16,rtn_w4]", "web.compare_max_new_tokens=8", "web.max_new_tokens=8",
                 f"web.endpoint.url=http://127.0.0.1:{dead}"]
    log = tmp_path_factory.mktemp("web") / "app.log"
    with running_app(overrides, free_port(), log) as url:
        yield url


@pytest.fixture(scope="module")
def browser(app):
    _ensure_chromium()
    with chromium() as b:
        yield b


def _chat(page, text: str, expect: str, timeout_ms: int = 120_000) -> None:
    """Send a message; wait until the conversation grew and the status line says how the turn ended."""
    before = _bubbles(page)
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()
    page.wait_for_function(
        """([before, re]) => document.querySelectorAll('#chat-bot .message-row').length > before
                             && new RegExp(re).test(document.querySelector('#chat-status').innerText)""",
        arg=[before, expect], timeout=timeout_ms)


def _bubbles(page) -> int:
    return page.locator("#chat-bot .message-row").count()


def test_page_title_names_model_and_quant_config(app, browser):
    page = browser.new_page()
    page.goto(app)
    page.wait_for_function("() => document.title.length > 0")  # set by the page's script
    assert page.title() == "smollm2-135m-instruct · FP16"
    assert not page.locator("text=gradio.live").count()  # no public share link
    page.close()


def test_compare_answers_in_every_column(app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app)
    answers = run_compare(page, "Name a colour.", n_columns=2)
    assert all(a.strip() for a in answers), answers
    stats = [page.locator(f"#cmp-stats-{i}").inner_text() for i in range(2)]
    assert "8 tokens" in stats[0] and "tok/s" in stats[0]
    assert "tok/s" in stats[1] and ("identical to FP16" in stats[1] or "first divergence from FP16: token" in stats[1])
    page.close()


def test_chat_sessions_endpoint_errors_and_context_limit(app, browser):
    one = browser.new_context().new_page()
    two = browser.new_context().new_page()  # a second browser session
    one.goto(app)
    two.goto(app)
    _chat(one, "Hi! What is your name?", r"FP16 answered: \d+ tokens")
    assert _bubbles(one) == 2
    _chat(one, "And what can you do?", r"FP16 answered: \d+ tokens")
    assert _bubbles(one) == 4  # multi-turn: both exchanges shown, the history went with the second

    # the endpoint is down: an error in the page, then the app still answers
    one.locator("#chat-variant input").click()
    one.get_by_role("option", name="endpoint").click()
    _chat(one, "Hello?", r"Error")
    assert "not reachable" in one.locator("#chat-status").inner_text()
    one.locator("#chat-variant input").click()
    one.get_by_role("option", name="FP16").click()
    _chat(one, "Still there?", r"FP16 answered: \d+ tokens")

    # a prompt longer than the context (8,192 tokens) is refused, naming the limit
    _chat(one, "word " * 9000, r"Error")
    assert "context is 8,192 tokens" in one.locator("#chat-status").inner_text()

    # the other session saw none of it, and keeps its own history
    assert _bubbles(two) == 0
    _chat(two, "Name a fruit.", r"FP16 answered: \d+ tokens")
    assert _bubbles(two) == 2
    one.locator("#chat-clear").click()
    one.wait_for_function("() => document.querySelectorAll('#chat-bot .message-row').length === 0")
    assert _bubbles(two) == 2


def test_stop_keeps_the_partial_answer(app, browser):
    page = browser.new_page()
    page.goto(app)
    box = page.locator("#chat-max-new input[type=number]")
    box.fill("400")
    box.press("Enter")
    # Stop once a few tokens have streamed (a sampled answer may open with blank lines)
    _chat(page, "Count from 1 to 300, one number per line.", r"FP16 answering: ([5-9]|\d\d+) tokens")
    page.locator("#chat-stop").click()
    page.wait_for_function("() => /FP16 answered: .*stopped/.test(document.querySelector('#chat-status').innerText)",
                           timeout=60_000)
    n = int(page.locator("#chat-status").inner_text().split("answered: ")[1].split(" ")[0])
    assert 5 <= n < 400
    # what was said so far stays in the answer's bubble (which may re-render just after the status line: wait for it)
    page.wait_for_function("() => { const r = document.querySelectorAll('#chat-bot .bot-row');"
                           " return r.length > 0 && r[r.length - 1].innerText.trim().length > 0; }", timeout=10_000)
    page.close()


def test_gradio_client_sessions(app):
    """The page's API (what a scripted session uses): chat keeps one history per client, compare answers per column."""
    from gradio_client import Client

    a, b = Client(app, verbose=False), Client(app, verbose=False)
    a.predict("Hi!", "FP16", "", 0.0, 0.9, 4, api_name="/chat")
    conv, _, status = a.predict("Thanks.", "FP16", "", 0.0, 0.9, 4, api_name="/chat")
    assert [m["role"] for m in conv] == ["user", "assistant"] * 2 and status.startswith("FP16 answered: 4 tokens")
    conv, _, _ = b.predict("Hello?", "FP16", "", 0.0, 0.9, 4, api_name="/chat")
    assert len(conv) == 2
    *cols, status = a.predict("Name a colour.", "", ["FP16", "RTN w4 g64"], True, 4, 0.7, 0.9, api_name="/compare")
    answers, stats = cols[:2], cols[2:]
    assert all("answer" in h and len(h) > len('<div class="answer"></div>') for h in answers), answers
    assert "4 tokens" in stats[0] and ("identical to FP16" in stats[1] or "first divergence" in stats[1])
    assert status.startswith("Done.")
