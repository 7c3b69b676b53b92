"""Whether the Hugging Face Hub can be reached, found out once per process in about two seconds, so a run that names
a hub dataset fails at once offline instead of after `datasets`' half a minute of retries (issue 15). Torch-free."""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from functools import lru_cache
from urllib.parse import urlparse

from harness.config import user_error

PROBE_TIMEOUT_S = 2.0
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_endpoint() -> str:
    """The endpoint huggingface_hub talks to (its own default, or HF_ENDPOINT)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline_mode() -> str | None:
    """The offline switch that is set (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1), or None."""
    for name in OFFLINE_ENV:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


@lru_cache(maxsize=None)
def unreachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `endpoint` answers an HTTP HEAD (any status) within `timeout_s`; otherwise why not. An HTTP request
    rather than a bare TCP connect, so proxies from the environment are honoured and an intercepting proxy that
    accepts every connection is not taken for the hub. Name resolution has no timeout of its own, so the request runs
    in a daemon thread that is waited on for `timeout_s`."""
    if not urlparse(endpoint).hostname:
        return f"endpoint {endpoint!r} names no host"
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # the server answered: reachable
            outcome.append(None)
        except (OSError, ValueError) as e:  # URLError, timeouts, refused connections are OSErrors
            reason = getattr(e, "reason", e)
            outcome.append(f"{type(reason).__name__}: {getattr(reason, 'strerror', None) or reason}")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def require_hub(field: str, name: str, embedded_hint: str) -> None:
    """ConfigError naming `field` unless the hub dataset `name` can be fetched now: offline mode set, or the hub's
    host not reachable within PROBE_TIMEOUT_S."""
    switch = offline_mode()
    endpoint = hub_endpoint()
    why = f"{switch} is set" if switch else unreachable(endpoint)
    if why is None:
        return
    raise user_error(field, name, f"a Hugging Face Hub dataset, and the hub ({endpoint}) cannot be reached ({why})",
                     f"use a local file ({field}=file:<path>, text or .jsonl) or {embedded_hint}")

