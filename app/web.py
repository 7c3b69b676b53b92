"""The web page: chat with a model, compare FP16 with its quantized variants side by side, read the results.

    python -m app.web                                            # http://127.0.0.1:7860, embedded SmolLM2
    python -m app.web quant=rtn_w4 web.port=7861 'web.compare=[fp16,rtn_w4]'
    python -m app.web web=endpoint web.endpoint.url=http://127.0.0.1:23333   # client of an api_server

The arguments are Hydra overrides on conf/web.yaml: the run groups (model, quant, kv, +experiment=...) choose what
the chat answers with first, the web group (conf/web/, app/web_config.py) what the page offers. It binds
web.host (127.0.0.1) and never makes a public share link. Any host but 127.0.0.1/localhost/::1 needs a login from
the environment (QH_WEB_USER, QH_WEB_PASSWORD: Gradio's auth; harness.exposure), or the page refuses to start;
with them set, a loopback page asks for the login too. In-process models load through harness.models; quantized
variants come from the quantization cache, or are built on first use (RTN: seconds; AWQ: minutes on a CPU). The
page's logic is in app/ (chat_logic, openai_client, local_models, answerer, web_ui).
"""
from __future__ import annotations

import socket
import sys

from harness import exposure
from harness.log import logger


log = logger("web")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.config import ConfigError
    from app.web_config import compose_web

    try:
        setup = compose_web(argv)
        auth = exposure.web_credentials(setup.cfg.web.host)  # before the model loads
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    web = setup.cfg.web
    if not port_free(web.host, web.port):  # before the model loads, not after
        print(f"web.port: {web.host}:{web.port} is in use; choose another, e.g. web.port={web.port + 1}", file=sys.stderr)
        raise SystemExit(2)

    from app.answerer import Answerer
    from app.web_ui import CSS, build_app, title_of

    ans = Answerer(setup)
    first = setup.chat[0]
    if first.run is not None:  # load the chat model before the page opens, so its first answer is quick
        log(f"loading {setup.cfg.model.name} · {first.label}")
        for line in ans.warm_up(first):
            log(line)
    demo = build_app(ans)
    demo.queue(default_concurrency_limit=1)
    log(f"{title_of(ans)}: http://{web.host}:{web.port}" + (" (login required)" if auth else ""))
    demo.launch(server_name=web.host, server_port=web.port, share=False, inbrowser=False, show_error=True, auth=auth,
                css=CSS, footer_links=["api", "settings"], quiet=True, mcp_server=False, ssr_mode=False)


if __name__ == "__main__":
    main(sys.argv[1:])
