"""One interface over the two kinds of model behind the web page: in-process variants (app.local_models) and an
OpenAI-compatible endpoint (app.openai_client). `Answerer.answer` yields status lines (str) while a variant is
loaded or built, then the answer as it streams (Snapshot); every failure a person can cause or meet (a prompt longer
than the context, an endpoint that is down, a variant that may not be built here) raises an error whose message is
meant for the page."""
from __future__ import annotations

import dataclasses
import threading
from typing import Iterator, Optional, Union

from app.web_config import Variant, WebSetup
from app import openai_client
from app.chat_logic import EndpointError, Messages, SamplingSettings, Snapshot
from app.local_models import LocalModels


class Note(str):
    """A status line worth keeping beside the answer (history dropped to fit the context, a shortened answer)."""


class VariantNotBuiltError(RuntimeError):
    """A quantized variant is not in the cache and web.build_missing is off; the message names the build command."""


class Answerer:
    def __init__(self, setup: WebSetup, local: Optional[LocalModels] = None):
        self.setup = setup
        self.web = setup.cfg.web
        self.local = local or LocalModels(setup.cfg.model, progress=setup.cfg.progress)

    def context_len(self) -> int:
        return self.web.context_len or self.local.max_context()

    def build_command(self, v: Variant) -> str:
        return f"python -m experiments.run model={self.setup.model_choice} +experiment={v.name}"

    def describe_state(self, v: Variant) -> str:
        """One line on whether a variant is ready, for its column header."""
        if v.run is None:
            try:
                ids = openai_client.list_models(self.web.endpoint.url, timeout_s=2.0)
                return f"up, serving {', '.join(ids) or 'no model'}"
            except EndpointError as e:
                return f"down: {e}"
        try:
            state = self.local.state(v.run)
        except Exception as e:  # the model itself cannot be had (offline hub id, missing path)
            return f"unavailable: {e}"
        if state == "loaded":
            return "loaded"
        if state == "cached":
            return "in the quantized cache: loads on first use" if v.run.quant.method != "fp16" else "loads on first use"
        how = "calibration and search: up to tens of minutes on a CPU" if self.local.needs_calibration(v.run) else "seconds"
        if self.web.build_missing:
            return f"not built yet: quantized on first use ({how}), or ahead with `{self.build_command(v)}`"
        return f"not built yet: build it with `{self.build_command(v)}`"

    def warm_up(self, v: Variant) -> list[str]:
        """Load (or build, if allowed) a local variant ahead of its first question; status lines for the log."""
        if v.run is None:
            return []
        if self.local.state(v.run) == "missing" and not self.web.build_missing:
            return [f"{v.label} is not built yet: `{self.build_command(v)}` builds it"]
        statuses: list[str] = []
        self.local.get(v.run, statuses.append)
        return statuses

    def answer(self, v: Variant, messages: Messages, settings: SamplingSettings,
               stop: Optional[threading.Event] = None) -> Iterator[Union[str, Snapshot]]:
        if v.run is None:
            ep = self.web.endpoint
            yield from openai_client.stream_chat(ep.url, ep.model, messages, settings, ep.timeout_s, stop=stop)
            return
        # the prompt is checked against the context before anything is loaded or built
        ctx = self.context_len()
        fitted, ids, dropped, max_new = self.local.fit(messages, settings.max_new_tokens, ctx)
        state = self.local.state(v.run)
        if state == "missing":
            if not self.web.build_missing:
                raise VariantNotBuiltError(f"{v.label} is not built yet; build it with `{self.build_command(v)}` "
                                           f"(or start the page with web.build_missing=true)")
            slow = (" (calibration and search: up to tens of minutes on a CPU)"
                    if self.local.needs_calibration(v.run) else "")
            yield f"building {v.label}{slow}: not in the quantized cache yet; `{self.build_command(v)}` builds it ahead"
        elif state == "cached":
            yield f"loading {v.label}"
        statuses: list[str] = []
        self.local.get(v.run, statuses.append)
        if statuses and state != "loaded":
            yield statuses[-1]
        if dropped:
            yield Note(f"dropped the {dropped} oldest exchange(s) to fit the {ctx:,}-token context")
        if max_new < settings.max_new_tokens:
            yield Note(f"at most {max_new} new tokens fit the {ctx:,}-token context after the {len(ids):,}-token prompt")
        settings = dataclasses.replace(settings, max_new_tokens=max_new)
        yield from self.local.stream(v.run, ids, settings, stop)
