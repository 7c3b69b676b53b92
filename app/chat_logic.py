"""The chat and compare logic behind the web page, with no UI and no model in it: conversation history as chat-template
messages, fitting a conversation into the context, the first position where two greedy token streams diverge, and
the speed of a stream. Every function here is pure, so tests check it without a browser or a model."""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

Messages = list[dict]


class ContextTooLongError(ValueError):
    """A prompt does not fit the model's context; the message names the limit."""


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint is down or answered with an error; the message is shown to the person."""


@dataclass(frozen=True)
class SamplingSettings:
    """What the chat and compare tabs send with each request. temperature 0 (or greedy) = argmax decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False

    @property
    def do_sample(self) -> bool:
        return not self.greedy and self.temperature > 0


@dataclass
class Snapshot:
    """A stream's state so far: the whole answer, not a delta, so a UI can redraw it at any point."""

    text: str = ""
    token_ids: Optional[list[int]] = None  # known for in-process models; an endpoint streams text only
    n_tokens: int = 0
    first_token_s: Optional[float] = None  # time from the request to the first token (prefill + queueing)
    elapsed_s: float = 0.0
    done: bool = False
    finish_reason: Optional[str] = None  # stop | length | stopped (by the person)
    # what n_tokens counts: "tokens", or "chunks" for an endpoint that reports no usage (a chunk may hold several)
    count_unit: str = "tokens"

    def copy(self) -> "Snapshot":
        return dataclasses.replace(self, token_ids=None if self.token_ids is None else list(self.token_ids))

    def decode_tok_s(self) -> Optional[float]:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        if self.first_token_s is None or self.n_tokens < 2 or self.elapsed_s <= self.first_token_s:
            return None
        return (self.n_tokens - 1) / (self.elapsed_s - self.first_token_s)


# ---- history ---------------------------------------------------------------------------------------------------


def build_messages(system: str, history: Messages, user: str) -> Messages:
    """The conversation sent to the model: an optional system message, the earlier turns, the new user message."""
    head = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return head + [{"role": m["role"], "content": m["content"]} for m in history] + [{"role": "user", "content": user}]


def add_exchange(history: Messages, user: str, answer: str) -> Messages:
    """A new history (the old one is never changed in place: it lives in one browser session's gr.State)."""
    return list(history) + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def fit_to_context(messages: Messages, count_tokens: Callable[[Messages], int], context_len: int,
                   min_new_tokens: int = 1) -> tuple[Messages, int, int]:
    """Drop the oldest exchanges (user + assistant) until the prompt leaves room for `min_new_tokens` in the context.

    Returns (messages, prompt tokens, exchanges dropped). The system message and the new user message are never
    dropped: if they alone do not fit, the prompt is refused with a message that names the limit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        n = count_tokens(system + turns)
        if n + min_new_tokens <= context_len:
            return system + turns, n, dropped
        if len(turns) <= 1:
            raise ContextTooLongError(
                f"The prompt is {n:,} tokens; the model's context is {context_len:,} tokens "
                f"(room is needed for at least {min_new_tokens} new token). Shorten the message or the system prompt.")
        turns = turns[2:] if len(turns) > 2 else turns[-1:]
        dropped += 1


def cap_new_tokens(prompt_tokens: int, max_new_tokens: int, context_len: int) -> int:
    """New tokens that still fit after the prompt."""
    return max(0, min(max_new_tokens, context_len - prompt_tokens))


# ---- compare ----------------------------------------------------------------------------------------------------


def first_divergence(reference: Sequence, other: Sequence) -> Optional[int]:
    """Index of the first position where two streams differ; None if they are identical. If one is a prefix of the
    other (one stopped earlier), they diverge where the shorter one ends."""
    n = min(len(reference), len(other))
    for i in range(n):
        if reference[i] != other[i]:
            return i
    return None if len(reference) == len(other) else n


@dataclass(frozen=True)
class Divergence:
    position: Optional[int]  # None = identical
    unit: str  # "token" (both streams have token ids) or "char" (an endpoint streamed text only)
    compared: int  # length of the shorter stream, in `unit`s


def divergence(reference: Snapshot, other: Snapshot) -> Divergence:
    """Where `other` first departs from the reference answer: over token ids when both have them, else characters.
    While `other` still streams, only a real mismatch counts (being shorter than the reference is not one yet)."""
    if reference.token_ids is not None and other.token_ids is not None:
        a, b, unit = reference.token_ids, other.token_ids, "token"
    else:
        a, b, unit = reference.text, other.text, "char"
    if not other.done and len(b) <= len(a):
        pos = first_divergence(a[: len(b)], b)
    else:
        pos = first_divergence(a, b)
    return Divergence(pos, unit, min(len(a), len(b)))


def describe_divergence(d: Divergence, reference_label: str, done: bool = True) -> str:
    if d.position is None:
        return f"identical to {reference_label} ({d.compared} {d.unit}s)" if done else f"same as {reference_label} so far"
    return f"first divergence from {reference_label}: {d.unit} {d.position}"


def describe_speed(s: Snapshot) -> str:
    parts = [f"{s.n_tokens} {s.count_unit}"]
    rate = s.decode_tok_s()
    if rate is not None:
        parts.append(f"{rate:.1f} {'tok' if s.count_unit == 'tokens' else s.count_unit}/s")
    if s.first_token_s is not None:
        parts.append(f"first token {s.first_token_s:.2f} s")
    if s.finish_reason == "length":
        parts.append("hit max new tokens")
    elif s.finish_reason == "stopped":
        parts.append("stopped")
    return " · ".join(parts)


def answer_html(text: str, split_at: Optional[int] = None) -> str:
    """An answer as HTML, with the part after the divergence point marked (text is escaped: it is model output)."""
    if split_at is None or split_at >= len(text):
        return f'<div class="answer">{html.escape(text)}</div>'
    return (f'<div class="answer">{html.escape(text[:split_at])}<mark class="diverged" title="differs from the '
            f'reference from here">{html.escape(text[split_at:])}</mark></div>')


def divergence_char_offset(other: Snapshot, d: Divergence, decode: Optional[Callable[[list[int]], str]]) -> Optional[int]:
    """Where in `other.text` the divergence starts, to mark it (tokens are decoded up to the divergence point)."""
    if d.position is None:
        return None
    if d.unit == "char":
        return d.position
    if decode is None or other.token_ids is None:
        return None
    return len(decode(other.token_ids[: d.position]))
