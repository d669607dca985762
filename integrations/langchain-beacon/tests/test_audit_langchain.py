"""LangChain contracts a user relies on: streamed replies sent back in a history, token counts by the chat template,
the streaming switches, cancelled async calls ending their run, the LLM cache and per-call options, secrets."""

import asyncio
import time

import pytest

pytest.importorskip("langchain_core")

from langchain_beacon import BeaconLLM, ChatBeacon  # noqa: E402
from langchain_core.caches import InMemoryCache  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.load import dumpd  # noqa: E402
from langchain_core.messages import (  # noqa: E402
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
)

from beacon_llm import BeaconConfig, BeaconEngine  # noqa: E402
from beacon_llm.testing import tiny_beacon_model  # noqa: E402

BOOK = "Chapter one. The lighthouse keeper counted ships every night and wrote them in a red book. " * 20
MESSAGES = [("human", "Tell me about the keeper.")]


@pytest.fixture(scope="module")
def engine():
    return BeaconEngine(tiny_beacon_model())


class Events(BaseCallbackHandler):
    def __init__(self):
        self.tokens, self.events = [], []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)

    def on_chat_model_start(self, *args, **kwargs):
        self.events.append("start")

    def on_llm_start(self, *args, **kwargs):
        self.events.append("start")

    def on_llm_end(self, *args, **kwargs):
        self.events.append("end")

    def on_llm_error(self, *args, **kwargs):
        self.events.append("error")


# ---------------------------------------------------------------- chunks in a history
def _streamed(chat, messages):
    full = None
    for chunk in chat.stream(messages):
        full = chunk if full is None else full + chunk
    return full


def test_a_streamed_reply_kept_in_the_history_can_be_sent_back(engine):
    """Summed stream chunks are an AIMessageChunk (type "AIMessageChunk"): it was refused as "cannot be sent"."""
    chat = ChatBeacon(engine=engine, max_tokens=5)
    history = [SystemMessage("Be brief."), HumanMessage("Hi")]
    reply = _streamed(chat, history)
    assert isinstance(reply, AIMessageChunk)
    as_chunks = [SystemMessageChunk("Be brief."), HumanMessageChunk("Hi"), reply, HumanMessageChunk("And?")]
    as_messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage(reply.content), HumanMessage("And?")]
    assert chat.invoke(as_chunks).content == chat.invoke(as_messages).content
    thinking = AIMessageChunk(content=[{"type": "reasoning", "reasoning": "hm"}, {"type": "text", "text": "Hello"}])
    assert chat.get_num_tokens_from_messages([HumanMessage("Hi"), thinking]) == chat.get_num_tokens_from_messages(
        [HumanMessage("Hi"), AIMessage("Hello")]
    )


@pytest.mark.filterwarnings("ignore::langchain_core._api.deprecation.LangChainDeprecationWarning")
def test_a_streamed_conversation_with_message_history_reuses_the_book_every_turn():
    from langchain_core.chat_history import InMemoryChatMessageHistory
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory

    fit = BeaconEngine(tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-256")))
    chat = ChatBeacon(engine=fit, max_tokens=4)
    book = BOOK[: len(BOOK) // 2]
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this book:\n{book}"), MessagesPlaceholder("history"), ("human", "{q}")]
    )
    history = InMemoryChatMessageHistory()
    talk = RunnableWithMessageHistory(
        prompt | chat, lambda _: history, input_messages_key="q", history_messages_key="history"
    )
    config = {"configurable": {"session_id": "s"}}
    reads = []
    for turn, question in enumerate(["Who?", "What?", "When?", "Why?"]):
        if turn % 2:  # streamed: the history keeps the summed chunks
            reply = _streamed(talk.with_config(config), {"book": book, "q": question})
        else:
            reply = talk.invoke({"book": book, "q": question}, config=config)
        reads.append(reply.usage_metadata["input_token_details"]["cache_read"])
    assert any(isinstance(m, AIMessageChunk) for m in history.messages)
    book_tokens = len(chat.get_token_ids(book))
    assert reads[0] == 0 and all(n >= book_tokens for n in reads[1:]), (reads, book_tokens)
    assert reads == sorted(reads)  # each turn reads from where the one before it began


# ---------------------------------------------------------------- token counts
def test_get_num_tokens_from_messages_counts_what_invoke_reads(engine):
    """The count LangChain's trim_messages budgets with: the chat template's tokens, as usage reports them (the base
    class counted "Human: ..." lines)."""
    chat = ChatBeacon(engine=engine, max_tokens=2)
    messages = [SystemMessage("Answer briefly."), HumanMessage("Who?"), AIMessage("Me."), ("human", "Why?")]
    counted = chat.get_num_tokens_from_messages(messages)
    assert counted == chat.invoke(messages).usage_metadata["input_tokens"]
    with pytest.raises(NotImplementedError, match="no tool calling"):
        chat.get_num_tokens_from_messages(messages, tools=[{"name": "f"}])


def test_custom_get_token_ids_is_honoured(engine):
    """LangChain's ``custom_get_token_ids`` field (a counter of the user's choice) was ignored."""
    custom = ChatBeacon(engine=engine, custom_get_token_ids=lambda text: [0] * len(text.split()))
    assert custom.get_num_tokens("three short words") == 3 == len(custom.get_token_ids("three short words"))
    assert custom.get_num_tokens_from_messages([HumanMessage("two words")]) == 3  # "Human: two words"
    assert BeaconLLM(engine=engine, custom_get_token_ids=lambda text: [7]).get_num_tokens("anything at all") == 1


# ---------------------------------------------------------------- streaming switches
@pytest.mark.parametrize(
    ("fields", "call"),
    [({"disable_streaming": True}, {}), ({"streaming": False}, {}), ({}, {"stream": False})],
    ids=["disable_streaming", "streaming=False", "stream=False"],
)
def test_streaming_switched_off_sends_no_tokens_to_callbacks(engine, fields, call):
    chat = ChatBeacon(engine=engine, max_tokens=6, **fields)
    handler = Events()
    reply = chat.invoke(MESSAGES, config={"callbacks": [handler]}, **call)
    areply = asyncio.run(chat.ainvoke(MESSAGES, config={"callbacks": [handler]}, **call))
    assert reply.content and areply.content == reply.content
    assert handler.tokens == []

    async def events():
        return [e["event"] async for e in chat.astream_events(MESSAGES, version="v2")]

    if fields:  # (astream_events streams whatever a call's stream= says: LangChain's astream sets it)
        assert "on_chat_model_stream" not in asyncio.run(events())
    default = Events()  # nothing switched off: invoke still hands over every token
    ChatBeacon(engine=engine, max_tokens=6).invoke(MESSAGES, config={"callbacks": [default]})
    assert "".join(default.tokens) == reply.content


# ---------------------------------------------------------------- cancelled async calls
def _slow_reading(monkeypatch, engine, delay=0.005):
    forward = engine.bm.forward

    def slow_forward(*args, progress=None, **kwargs):
        def step(n, cache):
            time.sleep(delay)
            if progress is not None:
                progress(n, cache)

        return forward(*args, progress=step, **kwargs)

    monkeypatch.setattr(engine.bm, "forward", slow_forward)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_cancelled_ainvoke_ends_its_run_with_an_error(monkeypatch, streaming):
    engine = BeaconEngine(tiny_beacon_model())
    _slow_reading(monkeypatch, engine)
    chat = ChatBeacon(engine=engine, max_tokens=5, streaming=streaming)
    handler = Events()

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                chat.ainvoke([("system", BOOK), ("human", "?")], config={"callbacks": [handler]}), 0.05
            )

    asyncio.run(main())
    assert handler.events == ["start", "error"]


# ---------------------------------------------------------------- the LLM cache
def test_the_llm_cache_keeps_apart_answers_to_other_per_call_options(engine):
    """LangChain keys a text LLM's cache on its fields and stop strings, not on per-call options: a max_tokens=3
    answer came back for max_tokens=20."""
    prompt = "Once upon a time"
    fresh = {n: BeaconLLM(engine=engine, max_tokens=n).invoke(prompt) for n in (3, 20)}
    assert fresh[3] != fresh[20]
    llm = BeaconLLM(engine=engine, max_tokens=20, cache=InMemoryCache())
    assert llm.invoke(prompt, max_tokens=3) == fresh[3]
    assert llm.invoke(prompt, max_tokens=20) == fresh[20]
    assert llm.invoke(prompt) == fresh[20]
    other = BeaconLLM(engine=engine, max_tokens=3, cache=InMemoryCache())
    assert asyncio.run(other.ainvoke(prompt)) == fresh[3]
    assert asyncio.run(other.ainvoke(prompt, max_tokens=20)) == fresh[20]
    assert other.batch([prompt, prompt], max_tokens=20) == [fresh[20]] * 2
    assert llm.max_tokens == 20 and other.max_tokens == 3  # the call's options never stick to the LLM
    with pytest.raises(ValueError, match="max_tokens=0"):
        llm.invoke(prompt, max_tokens=0)
    with pytest.raises(TypeError, match=r"unknown generation options \['frobnicate'\]"):
        llm.invoke(prompt, max_tokens=4, frobnicate=1)


# ---------------------------------------------------------------- secrets
@pytest.mark.parametrize("cls", [ChatBeacon, BeaconLLM])
def test_an_api_key_never_shows_in_repr_or_traces(engine, cls):
    model = cls(engine=engine, api_key="sk-do-not-print")
    assert model.api_key.get_secret_value() == "sk-do-not-print"
    assert "sk-do-not-print" not in repr(model)
    assert "sk-do-not-print" not in str(dumpd(model))  # what callbacks and tracers receive as `serialized`


# ---------------------------------------------------------------- tokens of a batch
class TokensByRun(BaseCallbackHandler):
    def __init__(self):
        self.tokens, self.texts = {}, {}

    def on_llm_new_token(self, token, *, run_id, **kwargs):
        self.tokens.setdefault(run_id, []).append(token)

    def on_llm_end(self, response, *, run_id, **kwargs):
        self.texts[run_id] = response.generations[0][0].text


@pytest.mark.parametrize("call", ["generate", "agenerate", "batch", "abatch", "invoke"])
def test_a_runs_tokens_are_its_own_prompts(engine, call):
    """LangChain hands a text LLM's ``_generate`` the first prompt's run only: every prompt's tokens were reported
    as the first prompt's (its callbacks saw both answers run together)."""
    llm = BeaconLLM(engine=engine, max_tokens=6)
    handler = TokensByRun()
    prompts = ["Once upon a time", "The keeper"]
    if call == "generate":
        llm.generate(prompts, callbacks=[handler])
    elif call == "agenerate":
        asyncio.run(llm.agenerate(prompts, callbacks=[handler]))
    elif call == "batch":
        llm.batch(prompts, config={"callbacks": [handler]})
    elif call == "abatch":
        asyncio.run(llm.abatch(prompts, config={"callbacks": [handler]}))
    else:
        llm.invoke(prompts[0], config={"callbacks": [handler]})
        assert handler.tokens  # one prompt: its tokens as they come
    assert len(handler.texts) == (1 if call == "invoke" else 2)
    for run_id, tokens in handler.tokens.items():
        assert "".join(tokens) == handler.texts[run_id]


def test_per_call_options_keep_reusing_the_condensed_book_of_a_model_given(engine):
    llm = BeaconLLM(engine=engine.bm, max_tokens=2)  # a BeaconModel: the LLM makes its own engine around it
    book = BOOK[:600]
    first, second = (llm.generate([book + q], max_tokens=3) for q in ("Who?", "Why?"))
    usage = second.generations[0][0].generation_info["usage"]
    assert usage["input_token_details"]["cache_read"] >= len(llm.get_token_ids(book)) - 16, usage
    assert first.generations[0][0].generation_info["usage"]["output_tokens"] == 3
