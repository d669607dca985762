"""``beacon-llm serve`` under load and when things stop: concurrent clients, clients that disconnect, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import MAX_TOKENS, MODEL, RecordingEngine, ask, cached, chat_body, document, running, tiny_model

import beacon_llm
from beacon_llm.loading import inference_overrides
from beacon_llm.serve import ServeLimits, create_app, serve_in_thread
from beacon_llm.testing import tiny_base_model

LONG_ANSWER = 1500  # tokens: about 20 s of generation for the tiny model, far longer than any test waits


@pytest.fixture(scope="module")
def bm():
    return tiny_model()


def _questions():
    return [(document(d), f"Question {q}: who walked on day {d}?") for d in range(4) for q in range(4)]


def test_sixteen_concurrent_clients_get_the_sequential_answers(bm, tmp_path):
    questions = _questions()
    with running(bm, tmp_path / "sequential") as client:
        sequential = [ask(client, doc, q) for doc, q in questions]
    with running(bm, tmp_path / "concurrent") as client:
        with ThreadPoolExecutor(16) as pool:
            concurrent = list(pool.map(lambda dq: ask(client, *dq), questions))
    assert len(concurrent) == 16  # every request answered (ask asserts 200)
    texts = [r["choices"][0]["message"]["content"] for r in concurrent]
    assert texts == [r["choices"][0]["message"]["content"] for r in sequential]
    for d in range(4):  # each document read once: one request read it, three reused it
        reused = sorted(cached(r) for r in concurrent[4 * d : 4 * d + 4])
        assert reused[0] == 0 and reused[1] == reused[3] > 0, reused


def _recording_app(bm, store, finals, **limits):
    def factory(folder):
        return RecordingEngine(bm, cache_dir=folder, min_prefix=8, finals=finals)

    limits = ServeLimits(**{"max_concurrent": 2, **limits})
    return create_app(engine_factory=factory, model_name=MODEL, store_dir=store, limits=limits)


def _wait_for(finals, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while len(finals) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(finals) >= n, "the generation did not end"


def _long_stream(url, events, doc, headers=None):
    """Stream a long answer into ``events`` (one line per event) until the server ends or cuts the stream."""
    body = chat_body(doc, "Tell me everything.", max_tokens=LONG_ANSWER, stream=True)
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
            events.extend(line for line in response.iter_lines() if line)
    except httpx.HTTPError as exc:  # the server closed the connection
        events.append(f"closed: {exc}")


def test_a_client_that_disconnects_cancels_its_generation(bm, tmp_path):
    finals = []
    with serve_in_thread(_recording_app(bm, tmp_path / "store", finals)) as url:
        body = chat_body(document(0), "Tell me everything.", max_tokens=LONG_ANSWER, stream=True)
        with httpx.Client(base_url=url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert len(got) >= 3  # the stream was running; leaving the block closed the connection
            _wait_for(finals, 1)
            assert finals[0].finish_reason == "cancelled" and len(finals[0].token_ids) < LONG_ANSWER // 5

            with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up after 1 s
                client.post("/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
            _wait_for(finals, 2)
            assert finals[1].finish_reason == "cancelled" and len(finals[1].token_ids) < LONG_ANSWER // 3
            assert ask(client, document(0), "Who?")["usage"]["completion_tokens"] == MAX_TOKENS


def test_generation_never_blocks_the_event_loop(bm, tmp_path):
    finals = []
    with serve_in_thread(_recording_app(bm, tmp_path / "store", finals)) as url:
        body = chat_body(document(1), "Tell me everything.", max_tokens=LONG_ANSWER, stream=True)
        with httpx.Client(base_url=url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()  # kept: a dropped iterator closes the connection
                assert next(lines).startswith("data: ")
                while '"content": "' not in next(lines):  # the read is done: the answer is being generated
                    pass
                start = time.perf_counter()
                for _ in range(5):
                    assert client.get("/health").status_code == 200
                    assert client.get("/v1/models").status_code == 200
                assert time.perf_counter() - start < 2.0  # ten requests answered while the model generates
            _wait_for(finals, 1)
        assert finals[0].finish_reason == "cancelled"


def test_shutdown_cancels_generations_in_flight(bm, tmp_path):
    finals, events = [], []
    app = _recording_app(bm, tmp_path / "store", finals, shutdown_timeout=0.5)
    with serve_in_thread(app) as url:
        readers = [threading.Thread(target=_long_stream, args=(url, events, document(i))) for i in range(2)]
        for reader in readers:
            reader.start()
        while len(events) < 6:
            time.sleep(0.02)
        start = time.monotonic()
    assert time.monotonic() - start < 10  # the shutdown timeout, then the generations stop within a token
    for reader in readers:
        reader.join(30)
    assert events.count("data: [DONE]") == 2  # both streams ended properly, with an error event before [DONE]
    errors = [json.loads(e.removeprefix("data: ")) for e in events if '"error"' in e]
    assert len(errors) == 2 and all("cancelled" in e["error"]["message"] for e in errors)
    assert len(finals) == 2 and all(f.finish_reason == "cancelled" for f in finals)
    assert all(len(f.token_ids) < LONG_ANSWER // 3 for f in finals)
    assert not app.state.server.jobs  # every worker thread finished


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_cancels_requests_in_flight_exits_cleanly_and_keeps_stored_books(tmp_path):
    folder, store = tmp_path / "model", tmp_path / "store"
    bm = beacon_llm.testing.tiny_beacon_model()
    tiny_base_model().save_pretrained(folder / "base")
    bm.tokenizer.save_pretrained(folder / "base")
    beacon_llm.save_adapter(bm, str(folder / "adapter"))
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "beacon_llm.cli",
        "serve",
        "--model",
        str(folder / "base"),
        "--adapter",
        str(folder / "adapter"),
        "--port",
        str(port),
        "--store-dir",
        str(store),
        "--served-model-name",
        MODEL,
        "--shutdown-timeout",
        "2",
        "--api-key",
        "k1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BEACON_LLM_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer k1"})
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        doc = document(2)
        assert cached(ask(client, doc, "Who walked?")) == 0  # condenses and stores the document
        events: list[str] = []
        reader = threading.Thread(target=_long_stream, args=(url, events, doc, client.headers))
        reader.start()
        while len(events) < 3:
            assert reader.is_alive(), events
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - stopped < 30
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert f"model '{MODEL}'" in out and "1 API key(s)" in out  # the startup line
    assert events[-1] == "data: [DONE]"  # the stream ended properly: finished, or cancelled with an error event
    files = list(store.rglob("*.safetensors"))
    assert files and not list(store.rglob("*.tmp"))
    served = beacon_llm.load(str(folder / "base"), adapter=str(folder / "adapter"), **inference_overrides({}))
    for path in files:
        cache, extra = beacon_llm.load_cache(str(path), served)
        assert cache.state.n_seen == extra["n_tokens"]
    app = create_app(served, model_name=MODEL, store_dir=store, api_keys=["k1"], limits=ServeLimits(min_prefix=8))
    with serve_in_thread(app) as url:  # a new server on the same store reuses the document
        again = httpx.post(
            f"{url}/v1/chat/completions",
            json=chat_body(doc, "Who walked?"),
            headers={"Authorization": "Bearer k1"},
            timeout=60,
        )
    assert cached(again.json()) > 0
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
