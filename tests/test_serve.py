"""``beacon-llm serve`` over HTTP on a tiny model: answers, the OpenAI formats, condensed books reused and stored on
disk per API key, and a table of bad requests answered with clear 4xx errors."""

from __future__ import annotations

import json

import pytest
from serve_helpers import MAX_TOKENS, MODEL, ask, cached, chat_body, document, running, tiny_model

from beacon_llm import BeaconEngine, load_cache
from beacon_llm.cli import main
from beacon_llm.serve import ServeLimits, read_api_keys, tenant_name


@pytest.fixture(scope="module")
def bm():
    return tiny_model()


@pytest.fixture
def client(bm, tmp_path):
    with running(bm, tmp_path / "store") as c:
        yield c


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok", "model": MODEL}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 2000
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/gpt-4").status_code == 404


def test_chat_answers_like_the_engine_and_a_follow_up_reuses_the_document(bm, client, tmp_path):
    doc = document(0)
    first = ask(client, doc, "Who walked?")
    second = ask(client, doc, "How many crows?")
    assert first["object"] == "chat.completion" and first["id"].startswith("chatcmpl-")
    choice = first["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    engine = BeaconEngine(bm)
    expected = []
    for question in ("Who walked?", "How many crows?"):
        ids, boundary = engine.encode_chat([{"role": "system", "content": doc}, {"role": "user", "content": question}])
        expected.append((engine.complete(ids, boundary=boundary, max_new_tokens=MAX_TOKENS), boundary))
    for response, (completion, _) in zip((first, second), expected):
        assert response["choices"][0]["message"]["content"] == completion.text
        usage = response["usage"]
        assert usage["prompt_tokens"] == completion.usage.input_tokens
        assert usage["completion_tokens"] == completion.usage.output_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert cached(first) == 0 and cached(second) == expected[1][1] > 0  # the follow-up read only the question


def test_streaming_chat_and_completions_in_the_openai_chunk_format(client):
    doc = document(1)
    full = ask(client, doc, "Who walked?")
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat_body(doc, "Who walked?", stream=True, stream_options={"include_usage": True}),
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert cached(chunks[-1]) > 0  # the document was condensed by the first call
    assert all(c["usage"] is None for c in chunks[:-1])

    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": doc, "max_tokens": 5}).json()
    assert plain["object"] == "text_completion" and plain["usage"]["completion_tokens"] == 5
    with client.stream(
        "POST", "/v1/completions", json={"model": MODEL, "prompt": doc, "max_tokens": 5, "stream": True}
    ) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert "usage" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_reuse_the_longest_stored_prefix(client):
    doc = document(1)
    answers = [
        client.post("/v1/completions", json={"model": MODEL, "prompt": doc + ending, "max_tokens": 4}).json()
        for ending in ("The end.", "A moral:", "Later that day")
    ]
    # the second prompt shows the shared beginning (the engine's guess), which is stored; the third reuses it
    assert [cached(a) for a in answers[:2]] == [0, 0] and cached(answers[2]) >= len(doc)


def test_options_stop_seed_and_ignored_fields(client):
    doc = document(2)
    base = ask(client, doc, "Who?", max_tokens=12)["choices"][0]["message"]["content"]
    stop = base[3:5]
    cut = ask(client, doc, "Who?", max_tokens=12, stop=stop)["choices"][0]
    assert cut["message"]["content"] == base[: base.index(stop)] and cut["finish_reason"] == "stop"
    sampled = [
        ask(client, doc, "Who?", temperature=0.9, top_p=0.9, seed=7, user="u1", n=1, presence_penalty=0)
        for _ in range(2)
    ]
    assert sampled[0]["choices"][0]["message"]["content"] == sampled[1]["choices"][0]["message"]["content"]
    body = chat_body(doc, "Who?", max_completion_tokens=3, logprobs=False, frequency_penalty=0.0, tool_choice="none")
    body.pop("max_tokens")
    body["messages"][1] = {"role": "developer", "content": [{"type": "text", "text": "Who?"}], "name": "x"}
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["usage"]["completion_tokens"] == 3


def test_condensed_books_survive_a_restart(bm, tmp_path):
    store, doc = tmp_path / "store", document(3)
    with running(bm, store) as first:
        before = ask(first, doc, "Who walked?")
    assert list((store / "public").glob("*.safetensors"))
    with running(bm, store) as second:
        after = ask(second, doc, "Who walked?")
    assert cached(before) == 0 and cached(after) > 0
    assert after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]


def test_api_keys_guard_every_endpoint_but_health(bm, tmp_path):
    with running(bm, tmp_path / "store", api_keys=["alpha-key", "beta-key"]) as client:
        probes = [
            ("GET", "/v1/models", None),
            ("GET", f"/v1/models/{MODEL}", None),
            ("POST", "/v1/chat/completions", chat_body("x", "y")),
            ("POST", "/v1/completions", {"model": MODEL, "prompt": "x"}),
        ]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic alpha-key"}):
            for method, path, body in probes:
                r = client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and "API key" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200
        ok = client.get("/v1/models", headers={"Authorization": "Bearer beta-key"})
        assert ok.status_code == 200


def test_one_key_never_reuses_another_keys_document(bm, tmp_path):
    store, doc = tmp_path / "store", document(0)
    with running(bm, store, api_keys=["alpha-key", "beta-key"]) as client:

        def ask_as(key):
            r = client.post(
                "/v1/chat/completions", json=chat_body(doc, "Who?"), headers={"Authorization": f"Bearer {key}"}
            )
            assert r.status_code == 200, r.text
            return r.json()

        a1, b1, a2, b2 = ask_as("alpha-key"), ask_as("beta-key"), ask_as("alpha-key"), ask_as("beta-key")
    assert cached(a1) == 0 and cached(b1) == 0  # the same text, but beta never sees alpha's condensed book
    assert cached(a2) > 0 and cached(b2) > 0
    assert a1["choices"] == b1["choices"]
    folders = sorted(p.name for p in store.iterdir())
    assert folders == sorted([tenant_name("alpha-key"), tenant_name("beta-key")])
    assert not any("alpha" in f or "beta" in f for f in folders)  # named by a hash, never the key
    for folder in folders:
        files = list((store / folder).glob("*.safetensors"))
        assert len(files) == 1
        load_cache(str(files[0]), bm)


def test_memory_is_bounded_and_evicted_engines_keep_their_disk_store(bm, tmp_path):
    keys = ["k1", "k2", "k3"]
    limits = ServeLimits(min_prefix=8, max_engines=2, max_prefixes=1)
    with running(bm, tmp_path / "store", api_keys=keys, limits=limits) as client:
        server = client.app.state.server
        for i in range(3):
            for key in keys:
                r = client.post(
                    "/v1/chat/completions",
                    json=chat_body(document(i), "Who?"),
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert r.status_code == 200 and cached(r.json()) == 0
                assert len(server.engines) <= 2
                assert all(len(e.stored_prefixes()) <= 1 for e in server.engines._engines.values())
        again = client.post(  # k1's engine was dropped from memory; its document comes back from disk
            "/v1/chat/completions", json=chat_body(document(0), "Who?"), headers={"Authorization": "Bearer k1"}
        )
        assert cached(again.json()) > 0


LONG = "The wind blew across the prairie. " * 100  # 3,400 tokens: beyond the tiny model's capacity of 2,000
GOOD = chat_body("A short document.", "Who?")


def _chat(**changes):
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def _with_message(message):
    return _chat(messages=[{"role": "system", "content": "doc"}, message])


BAD_REQUESTS = [
    # (name, path, body (dict, or raw bytes), status, message fragment)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("not UTF-8", "/v1/chat/completions", b"\xff\xfe{}", 400, "not valid JSON"),
    ("JSON array", "/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object, got list"),
    ("body too large", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x" * 30000}]), 413,
     "exceeds this server's limit of 20000 bytes"),
    ("unknown fields", "/v1/chat/completions", _chat(foo=1, bar=2), 400, "unknown field(s) 'bar', 'foo'"),
    ("missing model", "/v1/chat/completions", _chat(model=...), 400, "model must be the served model's name"),
    ("wrong model", "/v1/chat/completions", _chat(model="gpt-4o"), 404, "'gpt-4o' is not served here"),
    ("no messages", "/v1/chat/completions", _chat(messages=...), 400, "messages must be a non-empty list"),
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages must be a non-empty list"),
    ("message not an object", "/v1/chat/completions", _chat(messages=["hi"]), 400, "messages[0] must be an object"),
    ("bad role", "/v1/chat/completions", _with_message({"role": "wizard", "content": "x"}), 400,
     "messages[1].role=\"wizard\" must be one of"),
    ("content missing", "/v1/chat/completions", _with_message({"role": "user"}), 400, "messages[1].content is missing"),
    ("content wrong type", "/v1/chat/completions", _with_message({"role": "user", "content": 42}), 400,
     "must be a string or a list of text parts"),
    ("unknown message field", "/v1/chat/completions", _with_message({"role": "user", "content": "x", "mood": 1}), 400,
     "unknown field(s) 'mood' in messages[1]"),
    ("image part", "/v1/chat/completions",
     _with_message({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}), 400,
     "type 'image_url': this model reads text only"),
    ("audio part", "/v1/chat/completions",
     _with_message({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}), 400,
     "type 'input_audio'"),
    ("tool message", "/v1/chat/completions", _with_message({"role": "tool", "content": "42", "tool_call_id": "c1"}),
     400, "tool messages and tool calls are not supported"),
    ("tools", "/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tools are not supported"),
    ("tool_choice", "/v1/chat/completions", _chat(tool_choice="required"), 400, "tool_choice=\"required\""),
    ("functions", "/v1/chat/completions", _chat(functions=[{"name": "f"}]), 400, "functions are not supported"),
    ("json_schema", "/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {}}), 400,
     "response_format"),
    ("audio output", "/v1/chat/completions", _chat(modalities=["text", "audio"]), 400, "modalities="),
    ("audio options", "/v1/chat/completions", _chat(audio={"voice": "alloy", "format": "wav"}), 400,
     "audio output is not supported"),
    ("n=2", "/v1/chat/completions", _chat(n=2), 400, "n=2 is not supported"),
    ("max_tokens 0", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens=0 must be a positive int"),
    ("max_tokens text", "/v1/chat/completions", _chat(max_tokens="ten"), 400, "max_tokens='ten' must be a positive"),
    ("both lengths differ", "/v1/chat/completions", _chat(max_completion_tokens=9), 400, "differ: send one of them"),
    ("negative temperature", "/v1/chat/completions", _chat(temperature=-1), 400, "temperature=-1 must be a number"),
    ("top_p > 1", "/v1/chat/completions", _chat(top_p=1.5), 400, "top_p=1.5 must be in (0, 1]"),
    ("stop not text", "/v1/chat/completions", _chat(stop=5), 400, "stop must be a string or a list of strings"),
    ("stop entry not text", "/v1/chat/completions", _chat(stop=["a", 5]), 400, "stop strings must be non-empty"),
    ("empty stop string", "/v1/chat/completions", _chat(stop=[""]), 400, "stop strings must be non-empty str, got ''"),
    ("seed not int", "/v1/chat/completions", _chat(seed="x"), 400, "seed must be an integer"),
    ("stream not bool", "/v1/chat/completions", _chat(stream="yes"), 400, "stream must be a boolean"),
    ("stream_options unknown", "/v1/chat/completions", _chat(stream=True, stream_options={"foo": True}), 400,
     "unknown field(s) 'foo' in stream_options"),
    ("presence_penalty", "/v1/chat/completions", _chat(presence_penalty=0.5), 400, "presence_penalty=0.5 is not"),
    ("logprobs", "/v1/chat/completions", _chat(logprobs=True), 400, "logprobs=true is not supported"),
    ("prompt beyond capacity", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": LONG[:14000]}]),
     400, "more than this model's capacity of 2000 tokens"),
    ("answer beyond capacity", "/v1/chat/completions", _chat(max_tokens=5000), 400,
     "the answer may take 5000 more"),
    ("streamed, beyond capacity", "/v1/chat/completions", _chat(max_tokens=5000, stream=True), 400,
     "capacity of 2000 tokens"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt is empty"),
    ("batched prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "send one prompt per request"),
    ("token outside vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400,
     "token id 99999 is outside this model's vocabulary"),
    ("echo", "/v1/completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo=true is not supported"),
    ("chat field on completions", "/v1/completions", {"model": MODEL, "prompt": "a", "messages": []}, 400,
     "unknown field(s) 'messages' for /v1/completions"),
    ("lone surrogate in a message", "/v1/chat/completions",
     json.dumps(_chat(messages=[{"role": "user", "content": "a\ud800"}])).encode(), 400,
     "messages[0].content holds a lone surrogate"),
    ("lone surrogate in a stop", "/v1/chat/completions", json.dumps(_chat(stop=["\udfff"])).encode(), 400,
     "stop[0] holds a lone surrogate"),
    ("lone surrogate in a prompt", "/v1/completions", json.dumps({"model": MODEL, "prompt": "\ud800"}).encode(), 400,
     "prompt holds a lone surrogate"),
    ("stream_options without stream", "/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400,
     "stream_options is only for streamed answers"),
    ("include_obfuscation not bool", "/v1/chat/completions",
     _chat(stream=True, stream_options={"include_obfuscation": "yes"}), 400, "include_obfuscation must be a boolean"),
    ("tools as an object", "/v1/chat/completions", _chat(tools={}), 400, "tools are not supported"),
    ("functions as a string", "/v1/chat/completions", _chat(functions=""), 400, "functions are not supported"),
    ("temperature that overflows", "/v1/chat/completions", _chat(temperature=1e-40), 400,
     "temperature=1e-40 must be a number >= 0"),
]  # fmt: skip


def test_bad_requests_get_clear_4xx_errors_and_the_server_keeps_answering(bm, tmp_path):
    assert len(BAD_REQUESTS) >= 20
    with running(bm, tmp_path / "store", limits=ServeLimits(min_prefix=8, max_body_bytes=20000)) as client:
        for name, path, body, status, fragment in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = client.post(path, json=body)
            assert r.status_code == status, (name, r.status_code, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert fragment in error["message"], (name, error["message"])
        not_allowed = client.get("/v1/chat/completions")
        assert not_allowed.status_code == 405 and "GET is not allowed" in not_allowed.json()["error"]["message"]
        assert client.post("/v1/nothing", json={}).status_code == 404
        assert ask(client, "A short document.", "Who?")["usage"]["completion_tokens"] == MAX_TOKENS


def test_an_internal_error_is_a_500_object_and_the_connection_keeps_serving(bm, tmp_path, monkeypatch):
    import beacon_llm.serve

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(beacon_llm.serve, "parse_request", broken)
    with running(bm, tmp_path / "store") as client:
        for _ in range(10):  # the server closed the connection after some 500s: the next request then failed
            r = client.post("/v1/chat/completions", json=_chat())
            assert r.status_code == 500
            assert r.json()["error"]["message"] == "internal error: RuntimeError"
            assert client.get("/health").status_code == 200


@pytest.mark.parametrize("key", ["clé-secrète", "tab\x07bell"])
def test_api_keys_that_a_header_cannot_carry_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="printable ASCII"):
        read_api_keys([key], None)


def test_api_keys_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team A\nalpha-key\n\n  beta-key  \n")
    assert read_api_keys(["gamma"], str(keys)) == ["gamma", "alpha-key", "beta-key"]


def test_cli_serve_refuses_bad_options_with_exit_code_2(tmp_path, capsys):
    assert main(["serve", "--api-keys-file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --api-keys-file" in capsys.readouterr().err
    assert main(["serve", "--api-key", "has space"]) == 2
    assert "without spaces" in capsys.readouterr().err
    assert main(["serve", "--max-concurrent", "0"]) == 2
    assert "--max-concurrent=0 must be a positive int" in capsys.readouterr().err
    assert main(["serve", "--max-tokens", "-5"]) == 2
    assert "--max-tokens=-5 must be a positive int" in capsys.readouterr().err


def test_worker_slots_are_handed_out_in_arrival_order():
    import threading
    import time

    from beacon_llm.serve import FairSlots

    slots = FairSlots(1)
    assert slots.acquire(lambda: False)
    order, threads = [], []
    for i in range(6):
        t = threading.Thread(target=lambda i=i: (slots.acquire(lambda: False), order.append(i), slots.release()))
        t.start()
        threads.append(t)
        time.sleep(0.02)  # arrive one after another
    cancelled = threading.Event()
    late = threading.Thread(target=lambda: order.append("cancelled" if not slots.acquire(cancelled.is_set) else "x"))
    late.start()
    time.sleep(0.02)
    cancelled.set()
    late.join(5)
    slots.release()
    for t in threads:
        t.join(5)
    assert order == ["cancelled", 0, 1, 2, 3, 4, 5]
