"""BeaconLLM / BeaconQueryEngine as LlamaIndex uses them: response synthesizers over a book past the capacity,
pickling and deep copies, constructor validation, token counting, ``Settings.llm`` and the LLM's system prompt.

Names new to the package are looked up inside the tests (``li_beacon.X``) so that each test fails on its own."""

import asyncio
import copy
import pickle
import re
import threading

import pytest

pytest.importorskip("llama_index.core")

import llama_index.core  # noqa: E402
import llama_index.llms.beacon as li_beacon  # noqa: E402
import llama_index.llms.beacon.base as li_base  # noqa: E402
from llama_index.core import Document, Settings, SummaryIndex  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.llms.beacon import BeaconLLM, BeaconQueryEngine  # noqa: E402

import beacon_llm  # noqa: E402
from beacon_llm import BeaconEngine  # noqa: E402
from beacon_llm.testing import tiny_beacon_model  # noqa: E402

MSGS = [ChatMessage(role="user", content="Hi")]


@pytest.fixture(scope="module")
def engine():
    return BeaconEngine(tiny_beacon_model())  # capacity 2,000 tokens of a character-level tokenizer


def _book(engine: BeaconEngine, tokens: int) -> list[Document]:
    sentence = "Dorothy lives in Kansas with Aunt Em. "
    return [Document(text=sentence * (tokens // engine.count_tokens(sentence) + 1))]


# ------------------------------------------------------------------ 1. a prompt past the capacity
def test_compact_mode_over_a_book_past_the_capacity_says_why_not_empty_response(engine):
    """LlamaIndex's refine / compact synthesizers catch ValueError and TypeError from the LLM and answer "Empty
    Response": the capacity refusal must not be one of them."""
    llm = BeaconLLM(engine=engine, max_new_tokens=4)
    index = SummaryIndex.from_documents(_book(engine, 3000))  # tiktoken counts far fewer tokens than the model
    with pytest.raises(li_beacon.BeaconCapacityError, match=r"capacity of 2000 tokens.*Settings\.tokenizer"):
        index.as_query_engine(llm=llm, response_mode="compact").query("Where does Dorothy live?")


@pytest.mark.parametrize("how", ["complete", "stream_complete", "acomplete", "chat", "astream_chat"])
def test_a_prompt_past_the_capacity_raises_before_reading(engine, monkeypatch, how):
    llm = BeaconLLM(engine=engine, max_new_tokens=4)
    reads = []
    monkeypatch.setattr(engine, "stream", lambda *a, **k: reads.append(1) or iter(()))
    long = "x" * 2500

    async def drain(gen):
        return [r async for r in await gen]

    calls = {
        "complete": lambda: llm.complete(long),
        "stream_complete": lambda: list(llm.stream_complete(long)),
        "acomplete": lambda: asyncio.run(llm.acomplete(long)),
        "chat": lambda: llm.chat([ChatMessage(role="user", content=long)]),
        "astream_chat": lambda: asyncio.run(drain(llm.astream_chat([ChatMessage(role="user", content=long)]))),
    }
    with pytest.raises(li_beacon.BeaconCapacityError, match=r"the prompt has 25\d\d tokens .* capacity of 2000"):
        calls[how]()
    assert reads == []


@pytest.mark.parametrize("mode", ["tree_summarize", "simple_summarize", "compact"])
def test_synthesizers_counting_the_models_tokens_pack_prompts_that_fit(engine, monkeypatch, mode):
    """With ``Settings.tokenizer = llm.tokenizer_fn`` (what the capacity error advises) LlamaIndex's prompt helpers
    fill ``context_window`` to the brim, counting the messages' text and role names but not the chat template's turn
    markers: ``context_window`` keeps room for them."""
    llm = BeaconLLM(engine=engine, max_new_tokens=4)
    monkeypatch.setattr(llama_index.core, "global_tokenizer", llm.tokenizer_fn)  # Settings.tokenizer, undone after
    assert Settings.tokenizer == llm.tokenizer_fn
    index = SummaryIndex.from_documents(_book(engine, 3000))
    response = index.as_query_engine(llm=llm, response_mode=mode).query("Where does Dorothy live?")
    assert isinstance(response.response, str)
    assert llm.metadata.context_window == engine.capacity - li_base.TEMPLATE_RESERVE


# ------------------------------------------------------------------ 2. pickling and deep copies
def _brackets(prompt: str) -> str:
    return f"[{prompt}]"


def test_pickling_and_deep_copies_keep_the_original_and_its_prompt_functions(engine, monkeypatch):
    complete_fn = lambda prompt: f"<<{prompt}>>"  # noqa: E731  (unpicklable, as users write them)
    chat_fn = lambda messages: "".join(m.content for m in messages)  # noqa: E731
    llm = BeaconLLM(engine=engine, max_new_tokens=2, completion_to_prompt=complete_fn, messages_to_prompt=chat_fn)
    pickle.loads(pickle.dumps(llm))  # LlamaIndex drops the lambdas from the pickled state only
    assert llm.completion_to_prompt is complete_fn and llm.messages_to_prompt is chat_fn
    clone = copy.deepcopy(llm)
    assert llm.completion_to_prompt is complete_fn and llm.messages_to_prompt is chat_fn
    assert clone.completion_to_prompt is complete_fn and clone.messages_to_prompt is chat_fn
    assert clone._lock is not llm._lock and clone._explicit_engine
    seen = []
    for each in (llm, clone):  # the copy reads with a copy of the engine given
        original = each._engine.stream
        monkeypatch.setattr(
            each._engine, "stream", lambda ids, _read=original, **k: seen.append(ids) or _read(ids, **k)
        )
    assert llm.complete("Once").text == clone.complete("Once").text
    assert seen == [engine.encode("<<Once>>")] * 2


def test_a_lazily_loaded_engine_is_not_copied_and_the_copy_shares_it(engine, monkeypatch):
    monkeypatch.setattr(beacon_llm, "get_engine", lambda *a, **k: engine)
    llm = BeaconLLM(max_new_tokens=2, completion_to_prompt=_brackets)
    assert llm.get_engine() is engine
    for clone in (copy.deepcopy(llm), pickle.loads(pickle.dumps(llm))):
        assert clone._engine is None and clone.get_engine() is engine
        assert clone.completion_to_prompt is _brackets


# ------------------------------------------------------------------ 3. constructor validation as per call
@pytest.mark.parametrize(
    ("name", "value"),
    [("max_new_tokens", True), ("max_new_tokens", 5.0), ("max_new_tokens", "5"), ("top_k", True), ("top_k", 2.0),
     ("temperature", "0.5"), ("top_p", True), ("top_p", "0.9"), ("repetition_penalty", "1.2")],
)  # fmt: skip
def test_the_constructor_refuses_what_a_call_refuses_with_the_same_message(engine, name, value):
    message = re.escape(f"{name}={value!r}")
    with pytest.raises(ValueError, match=message):
        BeaconLLM(engine=engine, **{name: value})
    with pytest.raises(ValueError, match=message):
        BeaconLLM(engine=engine).complete("Once", **{name: value})


def test_json_round_trip_keeps_the_options(engine):
    llm = BeaconLLM(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, repetition_penalty=1.1, seed=4, stop="x")
    again = BeaconLLM.from_json(llm.to_json())
    assert again.to_dict() == llm.to_dict() and again.to_dict()["class_name"] == "BeaconLLM"


# ------------------------------------------------------------------ 4. token counting
@pytest.mark.parametrize("how", ["complete", "stream_complete", "chat", "astream_chat"])
def test_token_counting_handler_reports_the_models_usage(engine, how):
    """LlamaIndex's TokenCountingHandler reads ``response.raw["usage"]``; without it, it re-counts the prompt (a
    whole book) with its own tokenizer."""
    counter = TokenCountingHandler(tokenizer=lambda text: [0])  # a count of 1 shows a re-count
    llm = BeaconLLM(engine=engine, max_new_tokens=3, callback_manager=CallbackManager([counter]))

    async def drain(gen):
        return [r async for r in await gen]

    calls = {
        "complete": lambda: llm.complete("Once upon a time"),
        "stream_complete": lambda: list(llm.stream_complete("Once upon a time"))[-1],
        "chat": lambda: llm.chat(MSGS),
        "astream_chat": lambda: asyncio.run(drain(llm.astream_chat(MSGS)))[-1],
    }
    final = calls[how]()
    usage = final.raw["usage"]
    assert usage == final.additional_kwargs["usage"] and usage["prompt_tokens"] > 1
    assert counter.prompt_llm_token_count == usage["prompt_tokens"]
    assert counter.completion_llm_token_count == usage["completion_tokens"]


# ------------------------------------------------------------------ 5. the query engine
def test_from_documents_without_llm_takes_a_beacon_settings_llm(engine, monkeypatch):
    llm = BeaconLLM(engine=engine, max_new_tokens=2)
    docs = [Document(text="Toto is a dog.")]
    monkeypatch.setattr(Settings, "_llm", llm)
    assert BeaconQueryEngine.from_documents(docs).llm is llm
    monkeypatch.setattr(Settings, "_llm", MockLLM())  # another LLM: the embedded beacon model, loaded lazily
    other = BeaconQueryEngine.from_documents(docs, check_capacity=False).llm
    assert isinstance(other, BeaconLLM) and other.model is None and other._engine is None


def test_query_engine_applies_the_llms_system_prompt_unless_given_one(engine, monkeypatch):
    streams = []
    original = engine.stream
    monkeypatch.setattr(engine, "stream", lambda ids, **k: streams.append(list(ids)) or original(ids, **k))
    docs = [Document(text="Toto is a small black dog.")]
    llm = BeaconLLM(engine=engine, max_new_tokens=2, system_prompt="Answer in French.")
    qe = BeaconQueryEngine.from_documents(docs, llm=llm)
    assert qe.system_prompt == "Answer in French."
    qe.query("Who is Toto?")
    assert streams[-1] == engine.document_prompt(qe.documents_text, "Who is Toto?", system="Answer in French.")[0]
    assert BeaconQueryEngine.from_documents(docs, llm=llm, system_prompt="Be brief.").system_prompt == "Be brief."
    plain = BeaconQueryEngine.from_documents(docs, llm=BeaconLLM(engine=engine))
    assert plain.system_prompt == li_beacon.query_engine.SYSTEM


def test_aquery_loads_the_model_off_the_event_loop(engine, monkeypatch):
    threads = []

    def get_engine(*args, **kwargs):
        threads.append(threading.current_thread())
        return engine

    monkeypatch.setattr(beacon_llm, "get_engine", get_engine)
    llm = BeaconLLM(max_new_tokens=2)
    qe = BeaconQueryEngine.from_documents([Document(text="Toto is a dog.")], llm=llm, check_capacity=False)
    assert threads == []
    asyncio.run(qe.aquery("Who is Toto?"))
    assert threads and threading.main_thread() not in threads
