"""Drive the web page in headless Chromium (Debian's /usr/bin/chromium through Playwright; no browser is downloaded):
start the app on a free 127.0.0.1 port, send one prompt in the Compare tab, wait for every column, screenshot it.

    python -m app.browser --out results/figures/web_compare.png     # what made the committed figure
    python -m app.browser --out /tmp/x.png -- 'web.compare=[fp16,rtn_w4]'

(The default compare list includes AWQ w4: built on first use when it is not in the quantized cache, which takes up to
tens of minutes on a CPU.)

The end-to-end test (tests/app/test_web_e2e.py) uses the same helpers."""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_page(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> float:
    """Poll the page until it answers; seconds waited. Fails with the log's tail if the app exits first."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the web app exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return time.monotonic() - t0
        except OSError:
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s:\n{log_tail(log_path)}") from None
            time.sleep(0.5)


def log_tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@contextlib.contextmanager
def running_app(overrides: list[str], port: int, log_path: Path, timeout_s: float = 300) -> Iterator[str]:
    """`python -m app.web` in a subprocess until its page answers; yields its URL, stops it afterwards."""
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "app.web", f"web.port={port}", *overrides], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_page(url, proc, log_path, timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def run_compare(page, prompt: str, n_columns: int, timeout_s: float = 240) -> list[str]:
    """Send `prompt` in the Compare tab; wait until every column's stats line reports its tokens; the answers."""
    page.get_by_role("tab", name="Compare").click()
    page.locator("#cmp-prompt textarea").fill(prompt)
    page.locator("#cmp-run").click()
    page.wait_for_function(
        """n => [...Array(n).keys()].every(i => {
               const s = document.querySelector(`#cmp-stats-${i}`);
               return s && /tok\\/s|Error|identical|divergence/.test(s.innerText) && !/so far/.test(s.innerText);
           }) && /^(Done|Stopped)\\./.test(document.querySelector("#cmp-status").innerText.trim())""",
        arg=n_columns, timeout=timeout_s * 1000)
    return [page.locator(f"#cmp-answer-{i}").inner_text() for i in range(n_columns)]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/figures/web_compare.png")
    ap.add_argument("--prompt", default="In two sentences, why does the moon have phases?")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("overrides", nargs="*", help="web config overrides, e.g. 'web.compare=[fp16,rtn_w4]'")
    a = ap.parse_args(argv)
    from app.web_config import compose_web

    n = len(compose_web(a.overrides).compare)
    port = free_port()
    overrides = [f"web.compare_max_new_tokens={a.max_new_tokens}", *a.overrides]
    with running_app(overrides, port, Path("/tmp") / f"web_screenshot_{port}.log", timeout_s=600) as url, \
            chromium() as browser:
        page = browser.new_page(viewport={"width": a.width, "height": 900})
        page.goto(url)
        answers = run_compare(page, a.prompt, n, timeout_s=3600)
        for i, text in enumerate(answers):
            print(f"[{i}] {text[:200]!r}")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=a.out, full_page=True)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
