"""BeaconLLM / BeaconQueryEngine on tiny models: one LLM call per question over whole documents."""

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, SimpleDirectoryReader  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent  # noqa: E402
from llama_index.llms.beacon import BeaconLLM, BeaconQueryEngine  # noqa: E402
from llama_index.llms.beacon.base import TEMPLATE_RESERVE  # noqa: E402

from beacon_llm import BeaconConfig, BeaconEngine  # noqa: E402
from beacon_llm.testing import tiny_beacon_model  # noqa: E402


class CountLLMCalls(BaseEventHandler):
    calls: int = 0

    @classmethod
    def class_name(cls) -> str:
        return "CountLLMCalls"

    def handle(self, event, **kwargs):
        if isinstance(event, (LLMCompletionStartEvent, LLMChatStartEvent)):
            self.calls += 1


@pytest.fixture
def counter():
    handler = CountLLMCalls()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    yield handler
    dispatcher.event_handlers.remove(handler)


@pytest.fixture(scope="module")
def big_engine():
    """Window 64 and ratio 64 over 2,048 positions: capacity (2048 - 64) x 64 + 64 = 127,040 tokens."""
    bm = tiny_beacon_model(BeaconConfig(window=64, ratios=(64,)), max_position_embeddings=2048)
    return BeaconEngine(bm)


@pytest.fixture
def small_llm():
    return BeaconLLM(engine=BeaconEngine(tiny_beacon_model()), max_new_tokens=6)


def test_a_100k_token_document_is_read_once_in_one_llm_call(big_engine, counter):
    llm = BeaconLLM(engine=big_engine, max_new_tokens=4)
    assert llm.metadata.context_window == 127_040 - TEMPLATE_RESERVE  # the capacity less the chat template's
    text = "".join(f"Line {i}: the river keeper logged {i % 97} boats. " for i in range(2400))
    doc = Document(text=text, metadata={"file_name": "log.txt"})
    assert big_engine.count_tokens(text) >= 100_000
    qe = BeaconQueryEngine.from_documents([doc], llm=llm)
    first = qe.query("How many boats on line 7?")
    usage = first.metadata["usage"]
    assert counter.calls == 1
    assert usage["read_tokens"] == usage["prompt_tokens"] > 100_000 and usage["cache_read_tokens"] == 0
    second = qe.query("Who logged?")
    usage2 = second.metadata["usage"]
    assert counter.calls == 2
    prefix, rest = qe._prompt("Who logged?")
    assert usage2["read_tokens"] == big_engine.count_tokens(rest) < 40
    assert usage2["cache_read_tokens"] == big_engine.count_tokens(prefix)
    assert [n.node.metadata["file_name"] for n in second.source_nodes] == ["log.txt"]


def test_capacity_error_states_tokens_and_capacity(small_llm):
    doc = Document(text="word " * 1000)
    with pytest.raises(ValueError, match=r"the documents need 5\d\d\d tokens .* capacity of 2000 tokens"):
        BeaconQueryEngine.from_documents([doc], llm=small_llm)


def test_query_engine_answer_equals_direct_complete(small_llm):
    doc = Document(text="Toto is a small black dog who lives in Kansas. " * 10)
    qe = BeaconQueryEngine.from_documents([doc], llm=small_llm)
    answer = qe.query("Who is Toto?").response
    prefix, rest = qe._prompt("Who is Toto?")
    other = BeaconLLM(engine=BeaconEngine(small_llm.get_engine().bm), max_new_tokens=6)
    assert other.complete(prefix + rest).text == answer


def test_streaming_async_and_chat(small_llm):
    doc = Document(text="The tin woodman wanted a heart. " * 12)
    qe = BeaconQueryEngine.from_documents([doc], llm=small_llm)
    full = qe.query("What did he want?").response
    streaming = BeaconQueryEngine.from_documents([doc], llm=small_llm, streaming=True)
    assert "".join(streaming.query("What did he want?").response_gen) == full
    assert asyncio.run(qe.aquery("What did he want?")).response == full

    async def astream():
        response = await streaming.aquery("What did he want?")
        return "".join([d async for d in response.async_response_gen()])

    assert asyncio.run(astream()) == full
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hello?")]
    reply = small_llm.chat(msgs)
    assert reply.message.role == "assistant"
    assert "".join(r.delta for r in small_llm.stream_chat(msgs)) == reply.message.content
    assert asyncio.run(small_llm.achat(msgs)).message.content == reply.message.content

    async def astream_chat():
        gen = await small_llm.astream_chat(msgs)
        return "".join([r.delta async for r in gen])

    assert asyncio.run(astream_chat()) == reply.message.content
    text = small_llm.complete("Once").text
    assert "".join(r.delta for r in small_llm.stream_complete("Once")) == text
    assert asyncio.run(small_llm.acomplete("Once")).text == text


def test_reader_folder_in_three_lines(small_llm, tmp_path):
    (tmp_path / "a.txt").write_text("Dorothy lives in Kansas. " * 5)
    (tmp_path / "b.md").write_text("# Oz\nThe Emerald City is green. " * 5)
    docs = SimpleDirectoryReader(str(tmp_path)).load_data()
    qe = BeaconQueryEngine.from_documents(docs, llm=small_llm)
    response = qe.query("Where does Dorothy live?")
    assert sorted(n.node.metadata["file_name"] for n in response.source_nodes) == ["a.txt", "b.md"]
    assert "a.txt" in qe.documents_text and "b.md" in qe.documents_text  # metadata headers


def test_bad_options_and_tokenizer(small_llm):
    with pytest.raises(TypeError, match=r"unknown generation options \['frobnicate'\]"):
        small_llm.complete("hi", frobnicate=1)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        small_llm.complete("hi", max_new_tokens=0)
    with pytest.raises(ValueError):
        BeaconLLM(max_new_tokens=-1)
    assert small_llm.tokenizer_fn("abc") == small_llm.get_engine().encode("abc")
