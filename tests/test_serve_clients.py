"""Real OpenAI clients against ``beacon-llm serve`` on a tiny model: the ``openai`` package (sync, async, streaming),
LangChain's ``ChatOpenAI`` and LlamaIndex's ``OpenAILike``; all greedy, so each must give the server's own answer."""

from __future__ import annotations

import openai
import pytest
from serve_helpers import MAX_TOKENS, MODEL, ask, document, running, tiny_model

KEY = "test-key-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (keys on, so every client must send its key) and the answers it gives directly."""
    with running(tiny_model(), tmp_path_factory.mktemp("store"), api_keys=[KEY]) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client


def _expected(server, doc, question):
    return ask(server, doc, question)["choices"][0]["message"]["content"]


def _messages(doc, question):
    return [{"role": "system", "content": doc}, {"role": "user", "content": question}]


def test_openai_client_sync_and_streaming(server):
    doc, question = document(0), "Who walked?"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    answer = client.chat.completions.create(
        model=MODEL, messages=_messages(doc, question), max_tokens=MAX_TOKENS, temperature=0
    )
    follow_up = client.chat.completions.create(model=MODEL, messages=_messages(doc, "Crows?"), max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == _expected(server, doc, question)
    assert answer.usage.prompt_tokens > follow_up.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=_messages(doc, question),
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and chunks[-1].usage.prompt_tokens_details.cached_tokens
    text = client.completions.create(model=MODEL, prompt=doc, max_tokens=4)
    assert text.usage.completion_tokens == 4 and text.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="tools are not supported"):
        client.chat.completions.create(
            model=MODEL,
            messages=_messages(doc, question),
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


async def test_openai_async_client(server):
    doc, question = document(1), "Who walked?"
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    answer = await client.chat.completions.create(model=MODEL, messages=_messages(doc, question), max_tokens=MAX_TOKENS)
    stream = await client.chat.completions.create(
        model=MODEL, messages=_messages(doc, question), max_tokens=MAX_TOKENS, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert answer.choices[0].message.content == streamed == _expected(server, doc, question)
    await client.close()


def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI

    doc = document(2)
    chat = ChatOpenAI(
        model=MODEL,
        base_url=f"{server.url}/v1",
        api_key=KEY,
        max_tokens=MAX_TOKENS,
        temperature=0,
        max_retries=0,
        stream_usage=True,
    )
    first = chat.invoke([("system", doc), ("human", "Who walked?")])
    assert first.content == _expected(server, doc, "Who walked?")
    second = chat.invoke([("system", doc), ("human", "How many crows?")])
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0
    assert second.usage_metadata["output_tokens"] == MAX_TOKENS
    chunks = list(chat.stream([("system", doc), ("human", "Who walked?")]))
    assert "".join(c.content for c in chunks) == first.content
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == MAX_TOKENS


async def test_langchain_async_and_stop(server):
    from langchain_openai import ChatOpenAI

    doc = document(3)
    chat = ChatOpenAI(
        model=MODEL, base_url=f"{server.url}/v1", api_key=KEY, max_tokens=MAX_TOKENS, temperature=0, max_retries=0
    )
    answer = await chat.ainvoke([("system", doc), ("human", "Who walked?")])
    assert answer.content == _expected(server, doc, "Who walked?")
    stop = answer.content[2:4]
    cut = await chat.ainvoke([("system", doc), ("human", "Who walked?")], stop=[stop])
    assert cut.content == answer.content[: answer.content.index(stop)]


def test_llama_index_openai_like(server):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    doc = document(0)
    common = dict(
        model=MODEL,
        api_base=f"{server.url}/v1",
        api_key=KEY,
        max_tokens=MAX_TOKENS,
        temperature=0,
        context_window=2000,
        max_retries=0,
    )
    llm = OpenAILike(is_chat_model=True, **common)
    messages = [ChatMessage(role="system", content=doc), ChatMessage(role="user", content="Who walked?")]
    answer = llm.chat(messages)
    assert answer.message.content == _expected(server, doc, "Who walked?")
    streamed = list(llm.stream_chat(messages))
    assert streamed[-1].message.content == answer.message.content
    plain = OpenAILike(is_chat_model=False, **common)
    completion = plain.complete(doc)
    direct = server.post("/v1/completions", json={"model": MODEL, "prompt": doc, "max_tokens": MAX_TOKENS}).json()
    assert completion.text == direct["choices"][0]["text"]
    assert "".join(r.delta for r in plain.stream_complete(doc)) == completion.text
