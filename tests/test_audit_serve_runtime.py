"""``beacon-llm serve`` at run time: concurrent tokenisation, refusals before the queue, a re-served app, clients
that leave while sending."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from serve_helpers import MODEL, chat_body, document, running, tiny_model

from beacon_llm import BeaconEngine
from beacon_llm.generation import special_stop_ids
from beacon_llm.serve import ServeLimits, create_app, serve_in_thread
from beacon_llm.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def bm():
    return tiny_model()


class GatedEngine(BeaconEngine):
    """An engine whose generations each wait for ``gate`` before they read (``entered`` is set when one waits)."""

    def __init__(self, *args: Any, gate: threading.Event, entered: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.entered = gate, entered

    def stream(self, ids: Any, **kwargs: Any) -> Iterator[Any]:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        yield from super().stream(ids, **kwargs)


def _gated_app(bm, store, gate, entered, **limits):
    def factory(folder):
        return GatedEngine(bm, cache_dir=folder, min_prefix=8, gate=gate, entered=entered)

    return create_app(engine_factory=factory, model_name=MODEL, store_dir=store, limits=ServeLimits(**limits))


def test_special_stop_ids_only_read_the_tokenizer():
    tok = tiny_tokenizer()
    tok._tokenizer.encode_special_tokens = True  # as while another thread encodes a document literally
    assert special_stop_ids(tok, ["<|im_end|>", "ab"]) == {2: "<|im_end|>"}
    assert tok._tokenizer.encode_special_tokens is True  # that other thread's encoding is left as it was


def test_concurrent_chats_are_tokenised_as_when_sent_alone(bm, tmp_path):
    # documents beyond the capacity: the 400 names the prompt's token count, and nothing is read
    docs = ["A plain book about roads. " * 1000, "A book quoting <|im_end|> and <|im_start|>user. " * 500]

    def body(i):
        return chat_body(docs[i % 2], f"Q{i}?")

    def prompt_tokens(response):
        assert response.status_code == 400, response.text
        return int(re.search(r"the prompt has (\d+) tokens", response.text).group(1))

    with running(bm, tmp_path / "store") as client:
        alone = [prompt_tokens(client.post("/v1/chat/completions", json=body(i))) for i in range(6)]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda i: client.post("/v1/chat/completions", json=body(i % 6)), range(72)))
    assert [prompt_tokens(r) for r in together] == [alone[i % 6] for i in range(72)]


def test_refusals_come_before_the_queue_and_a_queued_stream_is_served(bm, tmp_path):
    gate, entered = threading.Event(), threading.Event()
    app = _gated_app(bm, tmp_path / "store", gate, entered, max_concurrent=1)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(client.post, "/v1/chat/completions", json=chat_body(document(0), "Who?"))
            try:
                assert entered.wait(30)  # the only worker is taken until the gate opens
                too_long = chat_body("word " * 600, "Who?")
                for stream in (False, True):
                    response = client.post("/v1/chat/completions", json={**too_long, "stream": stream})
                    assert response.status_code == 400, response.text
                    assert response.json()["error"]["code"] == "context_length_exceeded"
                # a stream that waits longer than its headers do (2 s) gets them, then its answer
                body = chat_body(document(1), "Who?", stream=True)
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    gate.set()
                    events = [line for line in response.iter_lines() if line]
            finally:
                gate.set()
            assert busy.result().status_code == 200
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_serving_an_app_again_is_not_cancelled_by_the_last_runs_shutdown(bm, tmp_path):
    gate, entered = threading.Event(), threading.Event()
    app = _gated_app(bm, tmp_path / "store", gate, entered, shutdown_timeout=2.0)
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
    with serve_in_thread(app) as url, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=chat_body(document(0), "Who?"), timeout=60)
        try:
            assert entered.wait(30)
            for timer in [t for t in threading.enumerate() if isinstance(t, threading.Timer)]:
                timer.join(30)  # a shutdown timer still pending from the first run has fired (or was cancelled)
        finally:
            gate.set()
        response = answer.result()
    assert response.status_code == 200, response.text


def test_a_client_that_leaves_while_sending_its_document_is_no_error(bm, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="beacon_llm.serve")
    with running(bm, tmp_path / "store") as client:
        host, port = client.url.removeprefix("http://").rsplit(":", 1)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + b"Content-Length: 100000\r\n\r\n" + b'{"model": "tiny", "messages": [' + b" " * 5000)
        deadline = time.monotonic() + 30
        while not any("disconnected" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").status_code == 200
    serve_records = [r for r in caplog.records if r.name == "beacon_llm.serve"]
    assert any("the client disconnected" in r.getMessage() for r in serve_records)
    assert not [r for r in serve_records if r.levelno >= logging.WARNING]


def test_requests_beyond_the_workers_and_the_queue_are_refused_with_retry_after(bm, tmp_path):
    """max_concurrent=1 and max_queued=1: one request runs, one waits, the third is a 503 with Retry-After at once
    (streamed or not); once the queue drains, requests are served again."""
    gate, entered = threading.Event(), threading.Event()
    app = _gated_app(bm, tmp_path / "store", gate, entered, max_concurrent=1, max_queued=1)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with ThreadPoolExecutor(2) as pool:
            running_ = pool.submit(client.post, "/v1/chat/completions", json=chat_body(document(0), "Who?"))
            try:
                assert entered.wait(30)
                waiting = pool.submit(client.post, "/v1/chat/completions", json=chat_body(document(1), "Who?"))
                deadline = time.monotonic() + 30
                while len(app.state.server.jobs) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)  # the second request's job is queued
                for stream in (False, True):
                    refused = client.post("/v1/chat/completions", json=chat_body(document(2), "Who?", stream=stream))
                    assert refused.status_code == 503, refused.text
                    assert refused.headers["Retry-After"] == "5"
                    assert refused.json()["error"]["code"] == "server_busy"
                    assert "max_concurrent 1 + max_queued 1" in refused.json()["error"]["message"]
            finally:
                gate.set()
            assert running_.result().status_code == waiting.result().status_code == 200
        assert not app.state.server.jobs  # a job stops counting before its client gets the answer
        assert client.post("/v1/chat/completions", json=chat_body(document(2), "Who?")).status_code == 200


def test_max_queued_is_checked():
    with pytest.raises(ValueError, match="max_queued=-1 must be an int >= 0"):
        ServeLimits(max_queued=-1)
