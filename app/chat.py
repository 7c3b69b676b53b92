"""Chat with a model in the terminal, from the harness's config (the seed's `lmdeploy chat`).

    python -m app.chat                                      # embedded SmolLM2 on the CPU (transformers)
    python -m app.chat -- backend=lmdeploy kv=int8          # the same through LMDeploy on a GPU
    python -m app.chat --prompt "Name three rivers." --max-new-tokens 32

backend=hf loads the model through harness.models (so it works offline here on the embedded model); backend=lmdeploy
starts LMDeploy's engine from the run's config (backends.lmdeploy). Type /reset to forget the conversation,
/exit (or Ctrl-D) to leave.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterator

from harness.registry import Registry

Messages = list[dict]
# a chat backend: (config, options) -> a function from the conversation so far to a stream of text pieces
CHAT_BACKENDS: Registry[Callable[..., Callable[[Messages], Iterator[str]]]] = Registry("chat backend (backend.name)")


class Conversation:
    """The message history, trimmed from the oldest turn when it outgrows `max_turns` exchanges."""

    def __init__(self, system: str | None = None, max_turns: int = 16):
        self.system, self.max_turns = system, max_turns
        self.turns: Messages = []

    def messages(self) -> Messages:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})
        while len(self.turns) > 2 * self.max_turns:
            self.turns = self.turns[2:]

    def reset(self) -> None:
        self.turns = []


@CHAT_BACKENDS.register("hf")
def _hf(cfg, opts) -> Callable[[Messages], Iterator[str]]:
    import threading

    from transformers import TextIteratorStreamer

    from harness.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(cfg.model)
    tok = load_tokenizer(resolved, cfg.model)
    model = load_model(resolved, cfg.model)

    def respond(messages: Messages) -> Iterator[str]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(model.device) for k, v in ids.items()}
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kw = dict(**ids, max_new_tokens=opts.max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id,
                  do_sample=opts.temperature > 0)
        if opts.temperature > 0:
            kw.update(temperature=opts.temperature, top_p=0.9)
        th = threading.Thread(target=model.generate, kwargs=kw, daemon=True)
        th.start()
        yield from streamer
        th.join()

    return respond


@CHAT_BACKENDS.register("lmdeploy")
def _lmdeploy(cfg, opts) -> Callable[[Messages], Iterator[str]]:
    from app.serve import serving_dir
    from backends import lmdeploy as lb
    from harness import synthetic

    # the folder app.serve would serve: a weight quant's exported AWQ checkpoint, never the FP16 folder under its name
    model_dir, _ = serving_dir(cfg, opts.synthetic_root, opts.tokenizer)
    synthetic.check_tokenizer_fits(model_dir)
    pipe, engine, _ = lb.make_pipeline(cfg, model_dir)
    from lmdeploy import GenerationConfig

    print(f"[chat] LMDeploy {engine} engine on {model_dir}", file=sys.stderr)
    gen = GenerationConfig(max_new_tokens=opts.max_new_tokens, temperature=max(opts.temperature, 1e-5),
                           do_sample=opts.temperature > 0, top_p=0.9)

    def respond(messages: Messages) -> Iterator[str]:
        for out in pipe.stream_infer([messages], gen_config=gen):
            yield out.text

    return respond


def repl(respond: Callable[[Messages], Iterator[str]], conv: Conversation, read=input, write=sys.stdout.write) -> None:
    while True:
        try:
            line = read("\n>>> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            conv.reset()
            write("(conversation cleared)\n")
            continue
        conv.add("user", line)
        pieces = []
        for piece in respond(conv.messages()):
            pieces.append(piece)
            write(piece)
            sys.stdout.flush()
        write("\n")
        conv.add("assistant", "".join(pieces))


def main(argv: list[str]) -> None:
    from harness import synthetic
    from harness.compose import compose
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

    ap = argparse.ArgumentParser(description="terminal chat from the harness config")
    ap.add_argument("--prompt", help="answer this one message and exit (no interactive loop)")
    ap.add_argument("--system", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--synthetic-root", default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. backend=lmdeploy kv=int8")
    opts = ap.parse_args(argv)
    cfg = compose(opts.overrides)
    if cfg.model.weights == "random":
        print(f"[chat] {synthetic.NOTE}: the answers are noise", file=sys.stderr)
    if cfg.backend.name == "hf" and cfg.model.path.startswith(synthetic.PREFIX):
        raise SystemExit("backend=hf chats with real checkpoints; synthetic weights are for backend=lmdeploy")
    respond = CHAT_BACKENDS.get(cfg.backend.name)(cfg, opts)
    conv = Conversation(opts.system)
    if opts.prompt:
        conv.add("user", opts.prompt)
        for piece in respond(conv.messages()):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    print(f"[chat] {cfg.model.name} via {cfg.backend.name}; /reset clears, /exit leaves", file=sys.stderr)
    repl(respond, conv)


if __name__ == "__main__":
    main(sys.argv[1:])
