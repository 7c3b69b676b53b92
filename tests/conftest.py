"""Shared fixtures: the real embedded model (SmolLM2-135M) and real embedded text, loaded once per session."""
from __future__ import annotations

import contextlib
import threading
from http.server import ThreadingHTTPServer
from typing import Iterator

import pytest
import torch

import quant  # noqa: F401  (registers every method's config, which harness.compose and conf/quant/ need)

torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tiers: a test is `fast` unless it is marked `slow` or `browser` (`pytest -m fast` for every change; CI runs
    all three)."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("slow", "browser")):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def smollm2_resolved():
    from harness.config import ModelConfig
    from harness.models import resolve_model

    return resolve_model(ModelConfig(name="smollm2-135m-instruct", path="embedded:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer(smollm2_resolved):
    from harness.config import ModelConfig
    from harness.models import load_tokenizer

    return load_tokenizer(smollm2_resolved, ModelConfig(name="x", path="embedded:smollm2-135m-instruct"))


def _load(resolved, dtype):
    from harness.config import ModelConfig
    from harness.models import load_model

    return load_model(resolved, ModelConfig(name="x", path="embedded:smollm2-135m-instruct", dtype=dtype))


@pytest.fixture
def smollm2_fp32(smollm2_resolved):
    """A fresh fp32 copy (tests may modify it)."""
    return _load(smollm2_resolved, "float32")


@pytest.fixture
def smollm2_bf16(smollm2_resolved):
    """A fresh bf16 copy (tests may modify it)."""
    return _load(smollm2_resolved, "bfloat16")


@pytest.fixture(scope="session")
def smollm2_bf16_shared(smollm2_resolved):
    """One bf16 model for the whole session, for tests that only read it (never modify it: others see the change)."""
    return _load(smollm2_resolved, "bfloat16").eval()


@pytest.fixture(scope="session")
def smollm2_fp32_shared(smollm2_resolved):
    """One fp32 model for the whole session, for tests that only read it."""
    return _load(smollm2_resolved, "float32").eval()


@pytest.fixture(scope="session")
def milton_ids(tokenizer):
    from harness.data import load_text, tokenize_cached

    return tokenize_cached(tokenizer, load_text("milton"))


@pytest.fixture(scope="session")
def calib_ids(tokenizer):
    from harness.data import load_text, tokenize_cached

    return tokenize_cached(tokenizer, load_text("shakespeare_calib"))


@contextlib.contextmanager
def http_server(handler) -> Iterator[str]:
    """A local HTTP server on a free 127.0.0.1 port answering with `handler` (a BaseHTTPRequestHandler), in a
    thread; yields its base URL and shuts it down afterwards."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        th.join(5)
