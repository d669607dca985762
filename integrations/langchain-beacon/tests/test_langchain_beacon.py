"""ChatBeacon / BeaconLLM behaviour on a tiny model: stops, streaming, async, batches, the document cache."""

import asyncio
import threading
import time

import pytest

pytest.importorskip("langchain_core")

from langchain_beacon import BeaconLLM, ChatBeacon  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402

import beacon_llm  # noqa: E402
from beacon_llm import BeaconEngine  # noqa: E402
from beacon_llm.testing import tiny_beacon_model  # noqa: E402

BOOK = "Chapter one. The lighthouse keeper counted ships every night and wrote them in a red book. " * 20


@pytest.fixture
def engine():
    return BeaconEngine(tiny_beacon_model())


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens, self.starts = [], 0

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)

    def on_chat_model_start(self, *args, **kwargs):
        self.starts += 1

    def on_llm_start(self, *args, **kwargs):
        self.starts += 1


def _free_text(model, messages, **kw):
    return model.invoke(messages, **kw).content


def test_stop_strings_in_invoke_stream_and_async(engine):
    chat = ChatBeacon(engine=engine, max_tokens=30)
    messages = [("human", "Tell me about the keeper.")]
    free = _free_text(chat, messages)
    assert len(free) >= 8
    stop = free[5:7]
    cut = free[: free.find(stop)]
    assert chat.invoke(messages, stop=[stop]).content == cut
    assert "".join(c.content for c in chat.stream(messages, stop=[stop])) == cut
    assert asyncio.run(chat.ainvoke(messages, stop=[stop])).content == cut

    async def astream():
        return "".join([c.content async for c in chat.astream(messages, stop=[stop])])

    assert asyncio.run(astream()) == cut
    assert ChatBeacon(engine=engine, max_tokens=30, stop=[stop]).invoke(messages).content == cut
    llm = BeaconLLM(engine=engine, max_tokens=30)
    text = llm.invoke("Once upon a time")
    s = text[3:5]
    assert llm.invoke("Once upon a time", stop=[s]) == text[: text.find(s)]
    assert "".join(llm.stream("Once upon a time", stop=[s])) == text[: text.find(s)]
    assert asyncio.run(llm.ainvoke("Once upon a time", stop=[s])) == text[: text.find(s)]


def test_streaming_callbacks_fire_per_token_and_no_prompt_echo(engine):
    handler = Tokens()
    chat = ChatBeacon(engine=engine, max_tokens=10, callbacks=[handler])
    chunks = [c.content for c in chat.stream([("human", "hi")])]
    assert handler.tokens and "".join(handler.tokens) == "".join(chunks)
    llm = BeaconLLM(engine=engine, max_tokens=10)
    handler2 = Tokens()
    out = llm.invoke("PROMPT-MARKER", config={"callbacks": [handler2]})
    assert "PROMPT-MARKER" not in out and "".join(handler2.tokens) == out


def test_batch_of_eight_concurrent_equals_sequential(engine):
    chat = ChatBeacon(engine=engine, max_tokens=12)
    prompts = [[("system", BOOK[: 200 + 40 * i]), ("human", f"Question {i}?")] for i in range(8)]
    sequential = [chat.invoke(p).content for p in prompts]
    engine.clear()
    parallel = [m.content for m in chat.batch(prompts, config={"max_concurrency": 8})]
    assert parallel == sequential
    assert [m.content for m in asyncio.run(chat.abatch(prompts))] == sequential


def test_second_question_reads_only_the_question(engine):
    chat = ChatBeacon(engine=engine, max_tokens=5)
    first = chat.invoke([("system", BOOK), ("human", "How many ships?")])
    u1 = first.usage_metadata
    assert u1["input_token_details"]["cache_read"] == 0
    second = chat.invoke([("system", BOOK), ("human", "What colour is the book?")])
    u2 = second.usage_metadata
    question_ids, boundary = engine.encode_chat(
        [{"role": "system", "content": BOOK}, {"role": "user", "content": "What colour is the book?"}]
    )
    assert u2["input_token_details"]["cache_read"] == boundary
    assert u2["input_tokens"] - u2["input_token_details"]["cache_read"] == len(question_ids) - boundary < 60


def test_one_model_call_for_a_whole_document_chain(engine):
    """LCEL 'stuff documents' over a long text: no splitter, one model call."""
    handler = Tokens()
    chat = ChatBeacon(engine=engine, max_tokens=5, callbacks=[handler])
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this text:\n{context}"), ("human", "{question}")]
    )
    chain = prompt | chat | StrOutputParser()
    long_text = BOOK * 1  # 1,900 characters = 1,900 tokens of the character tokenizer, ~120 windows of 16
    answer = chain.invoke({"context": long_text, "question": "Who counted?"})
    assert isinstance(answer, str) and handler.starts == 1
    assert chat.get_num_tokens(long_text) == len(long_text)
    assert chat.profile["max_input_tokens"] == engine.capacity == 2000


def test_document_cache_persists_and_mismatch_or_corruption_is_refused(engine, tmp_path):
    chat = ChatBeacon(engine=engine, max_tokens=5)
    doc = [("system", BOOK)]
    path = str(tmp_path / "book.safetensors")
    chat.save_document_cache(doc, path)
    fresh = ChatBeacon(engine=BeaconEngine(engine.bm), max_tokens=5)
    n = fresh.load_document_cache(path)
    assert n > 1000
    reply = fresh.invoke(doc + [("human", "Who?")])
    assert reply.usage_metadata["input_token_details"]["cache_read"] == n
    other = ChatBeacon(engine=BeaconEngine(tiny_beacon_model(seed=5)), max_tokens=5)
    with pytest.raises(ValueError, match="by another model"):
        other.load_document_cache(path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="unreadable"):
        fresh.load_document_cache(str(tmp_path / "bad.safetensors"))


def test_cache_dir_round_trip_across_engines(engine, tmp_path):
    a = ChatBeacon(engine=BeaconEngine(engine.bm, cache_dir=tmp_path), max_tokens=5)
    a.invoke([("system", BOOK), ("human", "One?")])
    b = ChatBeacon(engine=BeaconEngine(engine.bm, cache_dir=tmp_path), max_tokens=5)
    reply = b.invoke([("system", BOOK), ("human", "Two?")])
    assert reply.usage_metadata["input_token_details"]["cache_read"] > 1000
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"broken")
    c = ChatBeacon(engine=BeaconEngine(engine.bm, cache_dir=tmp_path), max_tokens=5)
    reply = c.invoke([("system", BOOK), ("human", "Three?")])  # a corrupt file is ignored: read again
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 0


def test_bad_parameters_are_clear_errors(engine):
    with pytest.raises(ValueError, match="max_tokens=-1"):
        ChatBeacon(engine=engine, max_tokens=-1)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ChatBeacon(engine=engine, frobnicate=True)
    chat = ChatBeacon(engine=engine)
    with pytest.raises(TypeError, match=r"unknown generation options \['frobnicate'\]"):
        chat.invoke("hi", frobnicate=1)
    with pytest.raises(ValueError, match="max_tokens=0"):
        chat.invoke("hi", max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens=-3"):
        BeaconLLM(engine=engine, max_tokens=-3)


def test_construction_is_lazy_and_loading_is_shared(tmp_path, monkeypatch):
    bm = tiny_beacon_model()
    bm.model.save_pretrained(tmp_path / "m")
    bm.tokenizer.save_pretrained(tmp_path / "m")
    beacon_llm.save_adapter(bm, str(tmp_path / "a"))
    calls = []
    real = beacon_llm.loading.from_pretrained
    monkeypatch.setattr(beacon_llm.loading, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    x = ChatBeacon(model=str(tmp_path / "m"), adapter=str(tmp_path / "a"), max_tokens=3)
    y = BeaconLLM(model=str(tmp_path / "m"), adapter=str(tmp_path / "a"), max_tokens=3)
    assert calls == []
    assert x.profile["max_input_tokens"] == 2000  # from the config files, no weights loaded (fit-N's capacity)
    x.invoke("hello")
    y.invoke("hello")
    assert len(calls) == 1 and x.get_engine().bm is y.get_engine().bm
    assert x.get_engine().bm.config.is_fit and x.get_engine().capacity == 2000  # the files said what loading gives


def test_async_prefill_does_not_block_the_event_loop(engine):
    chat = ChatBeacon(engine=engine, max_tokens=3)

    async def main():
        ticks = 0
        task = asyncio.create_task(chat.ainvoke([("system", BOOK), ("human", "?")]))
        start = time.perf_counter()
        while not task.done():
            await asyncio.sleep(0.001)
            ticks += 1
        await task
        return ticks, time.perf_counter() - start

    ticks, elapsed = asyncio.run(main())
    assert ticks >= 5, (ticks, elapsed)


def test_llm_usage_is_per_call_and_the_stream_ends_once(engine):
    """BeaconLLM: each generation carries its own finish reason and usage (no shared last-call field); the stream's
    final chunk comes once (the end callback used to see "lengthlength")."""
    llm = BeaconLLM(engine=engine, max_tokens=4)
    result = llm.generate(["A short prompt.", BOOK + " And a long one."])
    infos = [g[0].generation_info for g in result.generations]
    assert infos[0]["usage"]["input_tokens"] < infos[1]["usage"]["input_tokens"]
    assert all(i["finish_reason"] in ("length", "eos", "stop") for i in infos)
    chunks = list(llm.stream("A short prompt."))
    assert sum(1 for c in chunks if isinstance(c, str) and c == "") <= 1
    final = [c for c in llm._stream("A short prompt.") if c.generation_info]
    assert len(final) == 1 and final[0].generation_info["finish_reason"] in ("length", "eos", "stop")


# ---------------------------------------------------------------- timeouts
def _slow_windows(monkeypatch, engine, delay):
    """Every window step of the engine's reads takes ``delay`` seconds more; returns the list of steps done."""
    steps = []
    forward = engine.bm.forward

    def slow_forward(*args, progress=None, **kwargs):
        def step(n, cache):
            steps.append(n)
            time.sleep(delay)
            if progress is not None:
                progress(n, cache)

        return forward(*args, progress=step, **kwargs)

    monkeypatch.setattr(engine.bm, "forward", slow_forward)
    return steps


def test_timeout_stops_the_read_within_a_window_and_names_the_fix(engine, monkeypatch):
    messages = [("system", BOOK), ("human", "Who counted?")]
    windows = len(engine.encode_chat([{"role": "system", "content": BOOK}])[0]) // engine.bm.config.window
    steps = _slow_windows(monkeypatch, engine, 0.005)
    fix = r"raise timeout= .* or set timeout=None for no limit"
    chat, llm = ChatBeacon(engine=engine, max_tokens=5, timeout=0.001), BeaconLLM(engine=engine, max_tokens=5)
    calls = [
        lambda: chat.invoke(messages),
        lambda: list(chat.stream(messages)),
        lambda: asyncio.run(chat.ainvoke(messages)),
        lambda: ChatBeacon(engine=engine, max_tokens=5).invoke(messages, timeout=0.02),  # per call
        lambda: llm.invoke(BOOK, timeout=0.001),
        lambda: asyncio.run(llm.ainvoke(BOOK, timeout=0.02)),
    ]
    for call in calls:
        steps.clear()
        with pytest.raises(TimeoutError, match=r"timeout=0\.0(01|2) s while reading the prompt .*" + fix):
            call()
        assert len(steps) <= 10 < windows // 10, (len(steps), windows)  # 0: out of time before the first window
    assert not engine.stored_prefixes()  # nothing half-read was kept
    monkeypatch.undo()
    generous = ChatBeacon(engine=engine, max_tokens=8, timeout=60).invoke(messages)
    unlimited = ChatBeacon(engine=BeaconEngine(engine.bm), max_tokens=8).invoke(messages)
    assert generous.content == unlimited.content and generous.response_metadata["finish_reason"] != "cancelled"


def test_cancelled_ainvoke_stops_the_read(engine, monkeypatch):
    """``asyncio.wait_for`` cancelling ``ainvoke`` while the book is read stops the worker's read within a window."""
    messages = [("system", BOOK), ("human", "Who counted?")]
    windows = len(engine.encode_chat([{"role": "system", "content": BOOK}])[0]) // engine.bm.config.window
    steps = _slow_windows(monkeypatch, engine, 0.005)
    chat = ChatBeacon(engine=engine, max_tokens=5)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(chat.ainvoke(messages), 0.05)

    asyncio.run(main())
    for t in [t for t in threading.enumerate() if t.name == "beacon-generate"]:
        t.join(10)
    assert len(steps) < windows // 4 and not engine.stored_prefixes(), (len(steps), windows)


def test_timeout_while_generating_stops_within_a_token(engine):
    chat = ChatBeacon(engine=engine, max_tokens=60, timeout=1.0)
    chunks = chat.stream([("human", "Tell me about the keeper.")])
    assert next(chunks).content
    time.sleep(1.05)
    with pytest.raises(TimeoutError, match=r"timeout=1\.0 s while generating the answer \(\d+ tokens generated\)"):
        list(chunks)


# ---------------------------------------------------------------- option validation
BAD_OPTIONS = [
    {"top_p": 0},
    {"top_p": 1.5},
    {"top_k": 0},
    {"top_k": -2},
    {"temperature": -0.5},
    {"repetition_penalty": 0},
    {"repetition_penalty": -1.0},
    {"max_tokens": 0},
    {"timeout": 0},
    {"timeout": -3},
]


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
@pytest.mark.parametrize("cls", [ChatBeacon, BeaconLLM])
def test_bad_options_raise_at_construction_and_per_call_before_reading(engine, monkeypatch, cls, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name}="):
        cls(engine=engine, **bad)
    model = cls(engine=engine, max_tokens=3)
    monkeypatch.setattr(engine, "encode", lambda *a, **k: pytest.fail("tokenised before validating"))
    monkeypatch.setattr(engine, "encode_chat", lambda *a, **k: pytest.fail("tokenised before validating"))
    with pytest.raises(ValueError, match=f"{name}="):
        model.invoke("hi", **bad)
    with pytest.raises(ValueError, match=f"{name}="):
        asyncio.run(model.ainvoke("hi", **bad))


# ---------------------------------------------------------------- no tools, text only
def test_tools_and_structured_output_are_refused_with_what_to_do(engine):
    from pydantic import BaseModel

    class Answer(BaseModel):
        name: str

    chat = ChatBeacon(engine=engine)
    with pytest.raises(NotImplementedError, match="no tool calling.*use a chat model with tool calling"):
        chat.bind_tools([Answer])
    for kwargs in ({}, {"method": "json_mode"}, {"method": "function_calling"}):
        with pytest.raises(NotImplementedError, match="no structured output.*JsonOutputParser"):
            chat.with_structured_output(Answer, **kwargs)


def test_non_text_content_and_tool_messages_are_refused(engine):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    chat = ChatBeacon(engine=engine, max_tokens=3)
    text = {"type": "text", "text": "What is in the picture?"}
    blocks = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image", "source_type": "base64", "data": "iVBORw0KGgo=", "mime_type": "image/png"},
        {"type": "audio", "source_type": "base64", "data": "UklGRg==", "mime_type": "audio/wav"},
        {"type": "file", "source_type": "url", "url": "https://example.com/a.pdf"},
    ]
    for block in blocks:
        with pytest.raises(ValueError, match=f"type '{block['type']}' in a HumanMessage: this model reads text only"):
            chat.invoke([HumanMessage(content=[text, block])])
    with pytest.raises(ValueError, match="type 'image_url' in a SystemMessage"):
        chat.invoke([SystemMessage(content=[blocks[0]]), HumanMessage(content="hi")])
    called = AIMessage(content="", tool_calls=[{"name": "lookup", "args": {}, "id": "1"}])
    with pytest.raises(ValueError, match="AIMessage with tool calls.*no tool calling"):
        chat.invoke([HumanMessage(content="hi"), called, HumanMessage(content="and?")])
    with pytest.raises(ValueError, match="ToolMessage cannot be sent.*no tool calling"):
        chat.invoke([HumanMessage(content="hi"), ToolMessage(content="42", tool_call_id="1")])
    with pytest.raises(ValueError, match="type 'tool_use' in a AIMessage"):
        chat.invoke([AIMessage(content=[{"type": "tool_use", "id": "1", "name": "f", "input": {}}]), ("human", "?")])
    # text blocks (and strings) are read, as the same text in one string
    as_blocks = chat.invoke([HumanMessage(content=[text, " Tell me."])]).content
    assert as_blocks == chat.invoke([HumanMessage(content="What is in the picture? Tell me.")]).content


def test_a_batch_of_questions_about_one_document_reads_it_once(engine):
    """``batch`` runs the calls on threads at once: the first reads the document, the others wait and fork it."""
    doc = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry and Aunt Em. " * 10
    chat = ChatBeacon(engine=engine, max_tokens=4)
    questions = [f"Who is person number {i}?" for i in range(6)]
    answers = chat.batch([[("system", doc), ("human", q)] for q in questions], config={"max_concurrency": 6})
    cached = sorted(a.usage_metadata["input_token_details"]["cache_read"] for a in answers)
    assert cached[0] == 0 and len(set(cached[1:])) == 1 and cached[1] > 0  # one read, five forks


def test_a_generate_call_with_prompts_about_one_document_reads_it_once(engine):
    """``BeaconLLM.batch`` / ``generate`` with several prompts that begin with the same book: one read, then forks."""
    doc = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry and Aunt Em. " * 10
    llm = BeaconLLM(engine=engine, max_tokens=4)
    result = llm.generate([doc + f"Question {i}: who is Toto?" for i in range(4)])
    cached = [g[0].generation_info["usage"]["input_token_details"]["cache_read"] for g in result.generations]
    assert cached[0] == 0 and len(set(cached[1:])) == 1 and cached[1] > 0
