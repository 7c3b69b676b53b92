"""The web page's chat and compare logic without a browser: history, fitting the context, the first divergence between
two token streams, and an OpenAI-compatible endpoint that answers, fails or is down (a stub server on 127.0.0.1 that
the tests start and stop)."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from harness.config import ConfigError
from app import openai_client
from app.chat_logic import (ContextTooLongError, EndpointError, SamplingSettings, Snapshot, add_exchange,
                                answer_html, build_messages, cap_new_tokens, describe_divergence, describe_speed,
                                divergence, divergence_char_offset, first_divergence, fit_to_context)
from tests.conftest import http_server

# ---- history ----------------------------------------------------------------------------------------------------


def test_messages_carry_system_history_and_the_new_turn():
    h = add_exchange([], "Hi", "Hello!")
    h2 = add_exchange(h, "And you?", "Fine.")
    assert h == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]  # not changed in place
    assert len(h2) == 4
    m = build_messages("  Be brief. ", h2, "Bye")
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert m[0]["content"] == "Be brief." and m[-1] == {"role": "user", "content": "Bye"}
    assert build_messages("   ", [], "x") == [{"role": "user", "content": "x"}]  # blank system: template default


def _words(messages):  # a stand-in tokenizer: one token per word plus 3 per message of template
    return sum(len(m["content"].split()) + 3 for m in messages)


def test_fit_drops_oldest_exchanges_keeps_system_and_new_message():
    hist = []
    for i in range(5):
        hist = add_exchange(hist, f"question {i} " + "w " * 10, f"answer {i} " + "w " * 10)
    msgs = build_messages("sys", hist, "last one")
    full = _words(msgs)
    fitted, n, dropped = fit_to_context(msgs, _words, context_len=full)  # no room for a new token: drop one exchange
    assert dropped == 1 and fitted[0]["role"] == "system" and fitted[1]["content"].startswith("question 1")
    assert n == _words(fitted) and n < full
    fitted, n, dropped = fit_to_context(msgs, _words, context_len=full + 1)
    assert dropped == 0 and fitted == msgs
    fitted, n, dropped = fit_to_context(msgs, _words, context_len=_words(msgs[:1] + msgs[-1:]) + 1)
    assert dropped == 5 and fitted == [msgs[0], msgs[-1]]


def test_prompt_longer_than_the_context_is_refused_naming_the_limit():
    msgs = build_messages("", [], "w " * 5000)
    with pytest.raises(ContextTooLongError, match=r"5,003 tokens; the model's context is 4,096 tokens"):
        fit_to_context(msgs, _words, context_len=4096)
    assert cap_new_tokens(4000, 256, 4096) == 96 and cap_new_tokens(10, 256, 4096) == 256


def test_real_tokenizer_context_refusal(smollm2_resolved):
    """The local side counts the chat-templated prompt with the model's own tokenizer."""
    from harness.config import ModelConfig
    from app.local_models import LocalModels

    lm = LocalModels(ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct"))
    assert lm.max_context() == 8192
    msgs = build_messages("", [], "Name a river.")
    fitted, ids, dropped, max_new = lm.fit(msgs, 64, context_len=8192)
    assert ids[-3:] == lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"][-3:]
    assert dropped == 0 and max_new == 64
    _, ids, _, max_new = lm.fit(msgs, 64, context_len=len(ids) + 5)
    assert max_new == 5
    with pytest.raises(ContextTooLongError, match="context is 20 tokens"):
        lm.fit(build_messages("", [], "word " * 40), 8, context_len=20)


# ---- divergence -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b,pos", [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 9, 3], 1),
    ([1, 2, 3], [7, 2, 3], 0),
    ([1, 2, 3], [1, 2], 2),  # one stopped earlier: they diverge where it ended
    ([1, 2], [1, 2, 3], 2),
    ([], [], None),
    ("abc", "abd", 2),
])
def test_first_divergence(a, b, pos):
    assert first_divergence(a, b) == pos


def test_divergence_uses_tokens_when_both_have_them_else_characters():
    ref = Snapshot(text="The cat sat", token_ids=[10, 11, 12], done=True)
    same_text_other_tokens = Snapshot(text="The cat sat", token_ids=[10, 99, 98, 12], done=True)
    d = divergence(ref, same_text_other_tokens)
    assert (d.position, d.unit) == (1, "token")
    endpoint = Snapshot(text="The cot sat", done=True)  # an endpoint streams text only
    d = divergence(ref, endpoint)
    assert (d.position, d.unit) == (5, "char")
    assert describe_divergence(d, "FP16") == "first divergence from FP16: char 5"
    assert describe_divergence(divergence(ref, Snapshot(text="x", token_ids=[10, 11, 12], done=True)), "FP16") == \
        "identical to FP16 (3 tokens)"


def test_divergence_while_streaming_counts_only_real_mismatches():
    ref = Snapshot(token_ids=[1, 2, 3, 4], done=True)
    assert divergence(ref, Snapshot(token_ids=[1, 2], done=False)).position is None  # shorter so far: not yet
    assert divergence(ref, Snapshot(token_ids=[1, 5], done=False)).position == 1
    assert divergence(ref, Snapshot(token_ids=[1, 2, 3, 4, 5], done=False)).position == 4  # past the reference's end
    assert divergence(ref, Snapshot(token_ids=[1, 2], done=True)).position == 2


def test_answer_html_escapes_and_marks_the_divergent_tail():
    ref = Snapshot(token_ids=[1, 2, 3], done=True)
    other = Snapshot(text="a <b>c", token_ids=[1, 2, 4], done=True)
    d = divergence(ref, other)
    split = divergence_char_offset(other, d, decode=lambda ids: "".join({1: "a", 2: " <b>", 4: "c"}[i] for i in ids))
    assert split == len("a <b>")
    out = answer_html(other.text, split)
    assert "&lt;b&gt;" in out and "<b>" not in out
    assert out.endswith('<mark class="diverged" title="differs from the reference from here">c</mark></div>')
    assert "mark" not in answer_html("same", None)


def test_speed_line():
    s = Snapshot(text="x", token_ids=[1] * 11, n_tokens=11, first_token_s=0.5, elapsed_s=2.5, done=True,
                 finish_reason="length")
    assert s.decode_tok_s() == pytest.approx(5.0)
    assert describe_speed(s) == "11 tokens · 5.0 tok/s · first token 0.50 s · hit max new tokens"
    assert Snapshot(n_tokens=1, first_token_s=0.1, elapsed_s=0.1).decode_tok_s() is None
    assert SamplingSettings(temperature=0.7, greedy=True).do_sample is False
    assert SamplingSettings(temperature=0.0).do_sample is False


# ---- an OpenAI-compatible endpoint ------------------------------------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    """/<mode>/v1/models and /<mode>/v1/chat/completions; the mode picks a behaviour."""

    requests: list = []

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        mode = self.path.split("/")[1]
        if self.path.endswith("/v1/models"):
            ids = [] if mode == "nomodel" else ["stub-model"]
            return self._send(200, json.dumps({"object": "list", "data": [{"id": i} for i in ids]}))
        self._send(404, '{"detail": "Not Found"}')

    def do_POST(self):
        mode = self.path.split("/")[1]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.requests.append((mode, body))
        if mode == "http500":
            return self._send(500, json.dumps({"object": "error", "message": "engine crashed: out of KV blocks"}))
        if mode == "toolong":
            return self._send(400, json.dumps({"error": {"message": "prompt of 9000 tokens exceeds session_len 8192"}}))
        if mode == "slow":
            time.sleep(3)
            return self._send(200, "{}")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = ["Hello", ",", " world", "!"]

        def chunk(obj):
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        for i, w in enumerate(words):
            if mode == "truncated" and i == 2:
                return  # the connection closes mid-answer, without a finish_reason or [DONE]
            if mode == "errorchunk" and i == 1:
                return chunk({"error": {"message": "worker died"}})
            if mode == "garbage" and i == 1:
                self.wfile.write(b"data: {not json\n\n")
                return
            chunk({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w},
                                                                             "finish_reason": None}]})
        chunk({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunk({"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def stub():
    with http_server(_Stub) as url:
        yield url


@pytest.fixture
def dead_url():
    """A loopback port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


MSGS = [{"role": "user", "content": "Say hello."}]


def test_endpoint_streams_an_answer(stub):
    snaps = list(openai_client.stream_chat(f"{stub}/ok/v1/", None, MSGS, SamplingSettings(16, greedy=True)))
    final = snaps[-1]
    assert final.done and final.text == "Hello, world!" and final.finish_reason == "stop"
    assert [s.text for s in snaps[:4]] == ["Hello", "Hello,", "Hello, world", "Hello, world!"]
    assert final.n_tokens == 4 and final.count_unit == "tokens"  # the server's usage count
    assert final.token_ids is None and final.first_token_s is not None
    mode, body = _Stub.requests[-1]
    assert body["model"] == "stub-model" and body["stream"] is True and body["messages"] == MSGS
    assert body["temperature"] == 0.0 and "top_p" not in body and body["max_tokens"] == 16  # greedy
    list(openai_client.stream_chat(f"{stub}/ok", "my-model", MSGS, SamplingSettings(8, 0.7, 0.9)))
    body = _Stub.requests[-1][1]
    assert body["model"] == "my-model" and body["temperature"] == 0.7 and body["top_p"] == 0.9


def test_endpoint_down_is_a_message_not_a_crash(dead_url):
    with pytest.raises(EndpointError, match=r"not reachable \(connection refused\): is the server running"):
        list(openai_client.stream_chat(dead_url, None, MSGS, SamplingSettings(8)))
    with pytest.raises(EndpointError, match="not reachable"):
        list(openai_client.stream_chat(dead_url, "named-model", MSGS, SamplingSettings(8)))


@pytest.mark.parametrize("mode,match", [
    ("http500", r"answered HTTP 500: engine crashed: out of KV blocks"),
    ("toolong", r"answered HTTP 400: prompt of 9000 tokens exceeds session_len 8192"),
    ("truncated", r"closed the stream before the answer ended \(after 2 chunks\)"),
    ("errorchunk", r"reported an error mid-answer: worker died"),
    ("garbage", r"malformed stream chunk"),
    ("nomodel", r"lists no model"),
])
def test_endpoint_failures_become_messages(stub, mode, match):
    with pytest.raises(EndpointError, match=match):
        list(openai_client.stream_chat(f"{stub}/{mode}", None, MSGS, SamplingSettings(8)))


def test_endpoint_timeout(stub):
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=r"did not answer within 0.5 s"):
        list(openai_client.stream_chat(f"{stub}/slow", "m", MSGS, SamplingSettings(8), timeout_s=0.5))
    assert time.monotonic() - t0 < 2.5


def test_stop_ends_an_endpoint_answer_early(stub):
    stop = threading.Event()
    texts = []
    for s in openai_client.stream_chat(f"{stub}/ok", None, MSGS, SamplingSettings(8), stop=stop):
        texts.append(s.text)
        stop.set()
    assert texts[-1] == "Hello" and s.finish_reason == "stopped" and s.done


def test_answerer_routes_the_endpoint_column_and_keeps_its_error(dead_url, stub):
    from app.web_config import compose_web
    from app.answerer import Answerer

    setup = compose_web([f"web.endpoint.url={dead_url}", "web.compare=[fp16,endpoint]"])
    assert [v.name for v in setup.compare] == ["fp16", "endpoint"]
    ans = Answerer(setup)
    ep = setup.compare[1]
    assert ans.describe_state(ep).startswith("down:")
    with pytest.raises(EndpointError, match="not reachable"):
        list(ans.answer(ep, MSGS, SamplingSettings(8)))
    setup = compose_web([f"web.endpoint.url={stub}/ok", "web=endpoint"])
    ans = Answerer(setup)
    assert setup.chat[0].name == "endpoint" and ans.describe_state(setup.chat[0]) == "up, serving stub-model"
    assert list(ans.answer(setup.chat[0], MSGS, SamplingSettings(8)))[-1].text == "Hello, world!"


# ---- config -----------------------------------------------------------------------------------------------------


def test_web_config_composes_presets_with_the_reference_first():
    from app.web_config import compose_web

    s = compose_web(["web.compare=[rtn_w4,awq_w4_kv8]", "quant=rtn_w4"])
    assert [v.label for v in s.compare] == ["FP16", "RTN w4 g64", "AWQ w4 g64 (search+clip) + KV int8"]
    assert s.compare[2].run.kv.bits == 8 and s.compare[2].run.quant.method == "awq"
    assert s.chat[0].label == "RTN w4 g64" and "RTN w4 g64" not in [v.label for v in s.chat[1:]]
    assert s.cfg.web.host == "127.0.0.1" and s.model_choice == "smollm2_135m"


def test_every_method_is_a_compare_column_with_its_own_label():
    """Every method of the platform (GPTQ, AWQ->GPTQ, SmoothQuant int8/fp8, KV fp8) is an experiment preset the compare
    view takes, each under a label of its own: a KV fp8 column is not called "KV int8" (the label once ignored the
    KV format), and FP16 + KV fp8 counts as a variant of its own, not as the FP16 reference."""
    from app.web_config import compose_web, presets

    new = ["gptq_w4", "gptq_w4_mse", "awq_gptq_w4", "smoothquant_w8a8", "smoothquant_w8a8_fp8", "fp16_kv_fp8_e4m3",
           "fp16_kv_fp8_e5m2"]
    assert set(new) <= set(presets())
    s = compose_web([f"web.compare=[fp16,awq_w4_kv8,{','.join(new)}]"])
    labels = [v.label for v in s.compare]
    assert len(set(labels)) == len(labels) == 9, labels
    assert "GPTQ w4 g64 (mse grid)" in labels
    assert labels[0] == "FP16" and "FP16 + KV fp8 e4m3" in labels and "FP16 + KV fp8 e5m2" in labels
    assert any(lab.startswith("GPTQ w4") for lab in labels) and any("SmoothQuant" in lab for lab in labels)
    methods = {v.run.quant.method for v in s.compare}
    assert {"gptq", "awq_gptq", "smoothquant"} <= methods


@pytest.mark.parametrize("overrides,match", [
    (["web.compare=[fp16,rtn_w5]"], r"web.compare: \['rtn_w5'\] are not experiment presets; allowed: .*rtn_w4"),
    (["web.port=70000"], r"web.port: must be in 1..65535"),
    (["web.chat=endpoint"], r"web.endpoint.url: is needed"),
    (["web.chat=lmdeploy"], r"web.chat: 'lmdeploy' is not one of local, endpoint"),
    (["web.top_p=0"], r"web.top_p"),
    (["model.stream=true"], r"model.stream: the web app loads each model whole"),
])
def test_bad_web_config_fails_naming_the_field(overrides, match):
    from app.web_config import compose_web

    with pytest.raises(ConfigError, match=match):
        compose_web(overrides)


# ---- the in-process model ---------------------------------------------------------------------------------------


def test_local_stream_matches_greedy_generate_and_stops():
    """Streaming through the pool gives generate()'s greedy tokens; a stop event ends the answer early."""
    import torch

    from harness.config import ModelConfig, RunConfig
    from app.local_models import LocalModels

    mc = ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct", dtype="float32")
    lm = LocalModels(mc, progress=False)
    cfg = RunConfig(model=mc)
    ids = lm.prompt_ids(build_messages("", [], "Name a colour."))
    snaps = list(lm.stream(cfg, ids, SamplingSettings(6, greedy=True)))
    final = snaps[-1]
    assert final.done and final.n_tokens == 6 and final.finish_reason == "length"
    assert [s.n_tokens for s in snaps[:-1]] == [1, 2, 3, 4, 5, 6]
    model = lm.get(cfg)
    x = torch.tensor([ids])
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)[0, len(ids):]
    assert final.token_ids == ref.tolist()
    assert final.text == lm.tokenizer.decode(ref, skip_special_tokens=True)
    stop = threading.Event()
    seen = []
    for s in lm.stream(cfg, ids, SamplingSettings(50, greedy=True), stop):
        seen.append(s.n_tokens)
        if s.n_tokens == 2:
            stop.set()
    assert s.finish_reason == "stopped" and s.n_tokens <= 4 and seen[-1] == s.n_tokens


def test_terminal_client_streams_multi_turn_and_survives_errors(stub, dead_url):
    out = []
    lines = iter(["Say hello.", "Again.", "/exit"])
    openai_client.terminal_chat(f"{stub}/ok", None, SamplingSettings(8), system="Be brief.",
                                read=lambda prompt: next(lines), write=out.append)
    assert "".join(out).count("Hello, world!") == 2
    body = _Stub.requests[-1][1]
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == "Hello, world!"
    out.clear()
    lines = iter(["Anyone?", "/exit"])
    openai_client.terminal_chat(dead_url, None, SamplingSettings(8), read=lambda prompt: next(lines), write=out.append)
    assert "[error]" in "".join(out) and "not reachable" in "".join(out)


def test_a_quantized_variant_runs_in_the_real_int4_kernel(tmp_path):
    """The page's W4A16 variants answer through the int4 kernel (so a compare's tokens/s is the deployed speed), and
    say so; eval.throughput.kernel=dequant keeps the dense simulation."""
    from harness.config import ModelConfig
    from app.local_models import LocalModels
    from quant.kernels.int4_linear import Int4WeightOnlyLinear
    from tests.experiments.test_pipeline import cfg_of

    lm = LocalModels(ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct"), progress=False)
    said = []
    model = lm.get(cfg_of(["quant=rtn_w4", "progress=false"]), said.append)
    assert sum(isinstance(m, Int4WeightOnlyLinear) for m in model.modules()) == 210
    assert "torch int4" in said[-1]
    snaps = list(lm.stream(cfg_of(["quant=rtn_w4", "progress=false"]), lm.prompt_ids(build_messages("", [], "Hi.")),
                           SamplingSettings(4, greedy=True)))
    assert snaps[-1].done and snaps[-1].n_tokens == 4
    dense = LocalModels(lm.model_cfg, progress=False).get(cfg_of(["quant=rtn_w4", "eval.throughput.kernel=dequant",
                                                                   "progress=false"]), said.append)
    assert not any(isinstance(m, Int4WeightOnlyLinear) for m in dense.modules()) and "dense" in said[-1]
