"""Who may reach what the harness serves. A server bound to a loopback address (127.0.0.1, localhost, ::1) is reached
only from this machine; any other address needs a key, taken from the environment only, so that it never lands in
a config file, a record, a log line or a command line that is printed:

    QH_WEB_USER, QH_WEB_PASSWORD   the web page's login (Gradio's auth), needed for a non-loopback web.host
    QH_API_KEYS                    API keys of `lmdeploy serve api_server` (comma-separated), needed for a
                                   non-loopback --host; the first is also what the harness's own clients send
"""
from __future__ import annotations

import ipaddress
import os
from typing import Mapping, Optional, Sequence

from harness.config import user_error

WEB_USER_ENV, WEB_PASSWORD_ENV = "QH_WEB_USER", "QH_WEB_PASSWORD"
API_KEYS_ENV = "QH_API_KEYS"
LOOPBACK = "127.0.0.1, localhost or ::1"
REDACTED = "<redacted>"


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def web_credentials(host: str, field: str = "web.host", environ: Optional[Mapping[str, str]] = None) -> Optional[tuple[str, str]]:
    """(user, password) from the environment, or None on a loopback host without them; raises ConfigError for a
    non-loopback host without them."""
    env = os.environ if environ is None else environ
    user, password = env.get(WEB_USER_ENV, ""), env.get(WEB_PASSWORD_ENV, "")
    for name, value in ((WEB_USER_ENV, user), (WEB_PASSWORD_ENV, password)):
        if value and not value.strip():  # set, but blank: the page would sit behind a login no one can pass
            raise user_error(name, f"({len(value)} whitespace character{'s' if len(value) > 1 else ''})",
                             "a login needs a user and a password that are not blank",
                             f"set {name} to a real value, or unset {WEB_USER_ENV} and {WEB_PASSWORD_ENV} and bind "
                             f"{field}=127.0.0.1")
    if user and password:
        return user, password
    if is_loopback(host):
        return None
    raise user_error(field, host, f"an address other than {LOOPBACK} needs a login",
                     f"set {WEB_USER_ENV} and {WEB_PASSWORD_ENV} in the environment, or bind {field}=127.0.0.1")


def api_keys(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    env = os.environ if environ is None else environ
    return [k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip()]


def server_api_keys(host: str, field: str = "--host", environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The keys ($QH_API_KEYS) an api_server on `host` is started with; raises ConfigError for a non-loopback host
    without one."""
    return check_server_keys(host, api_keys(environ), field)


def check_server_keys(host: str, keys: Sequence[str], field: str = "--host") -> list[str]:
    if not keys and not is_loopback(host):
        raise user_error(field, host, f"an address other than {LOOPBACK} needs an API key",
                         f"set {API_KEYS_ENV}=<key>[,<key>...] in the environment, or bind {field} 127.0.0.1")
    return list(keys)


def client_api_key(environ: Optional[Mapping[str, str]] = None) -> str:
    """What the harness's clients send as `Authorization: Bearer`: the first key, or "none" (a server without keys
    ignores it)."""
    keys = api_keys(environ)
    return keys[0] if keys else "none"


def auth_headers(api_key: Optional[str] = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key or client_api_key()}"}


def redact(cmd: Sequence[str], flag: str = "--api-keys") -> list[str]:
    """A command line fit to print or record: every value after `flag` (up to the next option) replaced."""
    out, hiding = [], False
    for part in cmd:
        hiding = (hiding and not part.startswith("--")) or part == flag
        out.append(REDACTED if hiding and part != flag else part)
    return out

