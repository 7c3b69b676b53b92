"""Compose a RunConfig from conf/ with Hydra's compose API (as tests and non-Hydra entry points do), so scripts that
need their own command-line flags still take the same `group=option field=value` overrides as experiments.run.
Each quant option selects its method's config, registered when the method's package is imported: a caller imports
`quant` (it registers every method) before composing; a quant option whose config is not registered fails naming it.

Hydra's own errors about the user's overrides (an unknown field, whose advice `+quant.grop_size` would only add a
key the run then refuses; an option that does not exist; an override the shell split at a space) become the
harness's one-line ConfigError here (`composition_error`), for every entry point: compose() raises them, and
`hydra_errors_explained` does the same around a `@hydra.main` function."""
from __future__ import annotations

import contextlib
import difflib
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

from harness.config import QUANT_CONFIGS, ConfigError, RunConfig, register_schemas, to_run_config, user_error

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    check_split_overrides(overrides)
    try:
        return _compose(list(overrides))
    except Exception as e:
        if not is_hydra_error(e):
            raise
        raise composition_error(e, list(overrides)) from None


def _compose(overrides: list[str]) -> RunConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import MissingConfigException
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=overrides)
        except MissingConfigException as e:
            if "quant_schema" not in str(e):
                raise
            raise ConfigError(f"quant: {str(e).splitlines()[0]} — only {', '.join(QUANT_CONFIGS.names())} are "
                              f"registered — import quant (it registers every method's config) before composing") from None
    return to_run_config(cfg)


def is_hydra_error(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in ("hydra", "omegaconf")


def _first_line(e: BaseException | None) -> str:
    return str(e).strip().splitlines()[0] if e is not None and str(e).strip() else type(e).__name__


def options(group: str) -> list[str]:
    """The options of a config group: the YAML files under conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _override_of(key: str, overrides: Sequence[str]) -> str | None:
    """The override (as given) that sets `key`, with or without a +/++/~ prefix."""
    return next((o for o in overrides if o.partition("=")[0].lstrip("+~") == key), None)


def composition_error(e: Exception, overrides: list[str]) -> Exception:
    """Hydra's (or OmegaConf's) error about `overrides` as the harness's one-line ConfigError; the error itself when
    it is about something else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    msg = str(e)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
    if isinstance(e, MissingConfigException) and missing:
        group, option = missing.groups()
        given = _override_of(group, overrides)
        key = given.partition("=")[0] if given else group
        known = options(group)
        close = difflib.get_close_matches(option, known, n=1)
        fix = f"use {key}={close[0]}" if close else f"choose one of them, e.g. {key}={known[0] if known else '<option>'}"
        return user_error(key, option, f"no such option in conf/{group}/ (options: {', '.join(known)})", fix)
    unknown = re.match(r"Could not override '([^']+)'", msg)
    if isinstance(e, ConfigCompositionException) and unknown and "not in" in str(e.__cause__):
        # the key is not in its group's schema: add it with `+` so that the harness's own check (check_known_keys)
        # names the field, the known ones and the close match or the method that has it
        key = unknown.group(1)
        given = _override_of(key, overrides)
        if given is not None and not given.startswith("+"):
            try:
                _compose([("+" + o if o is given else o) for o in overrides])
            except ConfigError as err:
                return err
            except Exception:  # noqa: BLE001 (the message below says what Hydra said)
                pass
        return user_error(key, given.partition("=")[2] if given else "?", f"not a field ({_first_line(e.__cause__)})",
                          "check the field's name (python -m experiments.run --cfg job shows them)")
    if isinstance(e, OverrideParseException):
        return ConfigError(f"override: {_first_line(e)} — not an override Hydra can parse — quote an override whose "
                           f"value holds spaces, brackets or quotes as one shell word, e.g. "
                           f"'data.splits=[file:/path/with spaces.txt]'")
    if isinstance(e, ConfigCompositionException):
        return ConfigError(f"{_first_line(e)}: {_first_line(e.__cause__)}" if e.__cause__ else _first_line(e))
    return e


PAIRS = {"[": "]", "{": "}"}


def _unbalanced(value: str) -> bool:
    """Whether `value` leaves a bracket, brace or quote open (quoted text is skipped)."""
    depth, quote = 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth != 0 or quote is not None


def check_split_overrides(args: Sequence[str]) -> None:
    """An override that the shell split at a space (`data.splits=[file:/my notes.txt]` unquoted reaches Python as
    `data.splits=[file:/my` and `notes.txt]`): one line saying to quote it, instead of Hydra's grammar error."""
    args = list(args)
    for i, a in enumerate(args):
        key, eq, value = a.partition("=")
        if not eq or a.startswith("-") or not _unbalanced(value):
            continue
        joined = a
        for rest in args[i + 1:]:
            joined += " " + rest
            if not _unbalanced(joined.partition("=")[2]):
                break
        raise user_error(key.lstrip("+~"), value, "the override ends inside an open bracket or quote: the shell split "
                         "it at a space (a path with spaces?)", f"quote the whole override as one shell word: '{joined}'")


def _non_sweep(overrides: Sequence[str]) -> list[str]:
    """What Hydra composes a run's (or a sweep's master) config from: the overrides without flags, hydra's own
    settings and sweeps (`a=1,2`, `choice(...)`, `range(...)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [o for o in overrides if not o.startswith("-") and not o.lstrip("+~").startswith("hydra")]
    parsed = OverridesParser.create().parse_overrides(plain)
    return [o.input_line for o in parsed if not o.is_sweep_override()]


@contextlib.contextmanager
def hydra_errors_explained(argv: Sequence[str]) -> Iterator[None]:
    """Around a `@hydra.main` function: Hydra's multi-line composition errors become the harness's one-line
    ConfigError (composing the same overrides again through compose(), which says what is wrong). With
    HYDRA_FULL_ERROR or HARNESS_DEBUG set by the user, Hydra's own report is left as it is."""
    from harness.log import DEBUG_ENV

    if os.environ.get("HYDRA_FULL_ERROR") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its report and exiting 1
    try:
        yield
    except Exception as e:
        if not is_hydra_error(e):
            raise
        try:
            overrides = _non_sweep(argv)
        except Exception:  # noqa: BLE001 (unparsable: compose() below says so)
            overrides = [o for o in argv if not o.startswith("-")]
        err = composition_error(e, overrides)
        if err is e:  # not about the overrides alone: compose them again, which names what is wrong
            try:
                compose(overrides)
            except ConfigError as found:
                err = found
            except Exception:  # noqa: BLE001
                pass
        if err is e:
            raise
        raise err from None
