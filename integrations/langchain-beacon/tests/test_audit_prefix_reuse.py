"""Reuse of condensed books over several calls: BeaconLLM batches about several books, and ChatBeacon chains that
put the book in the last (human) message."""

import asyncio

import pytest

pytest.importorskip("langchain_core")

from langchain_beacon import BeaconLLM, ChatBeacon  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402

from beacon_llm import BeaconConfig, BeaconEngine  # noqa: E402
from beacon_llm.testing import tiny_beacon_model  # noqa: E402

BOOKS = [
    "Chapter one. The lighthouse keeper counted ships every night and wrote them in a red book. " * 10,
    "Part two. A baker in the valley sold bread to travellers crossing the mountain pass at dawn. " * 10,
]
TEMPLATE = "Read the document and answer the question.\n\n<document>\n{}\n</document>\n\nQuestion: {}\nAnswer:"


def _cache_reads(result):
    return [g[0].generation_info["usage"]["input_token_details"]["cache_read"] for g in result.generations]


class Results(BaseCallbackHandler):
    """The LLMResult of each prompt of a batch, as LangChain reports it to callbacks."""

    def __init__(self):
        self.results = []

    def on_llm_end(self, response, **kwargs):
        self.results.append(response)


@pytest.mark.parametrize("call", ["generate", "agenerate", "batch"])
def test_a_batch_about_two_books_reads_each_book_once(call):
    llm = BeaconLLM(engine=BeaconEngine(tiny_beacon_model()), max_tokens=3)
    prompts = [TEMPLATE.format(book, q) for book in BOOKS for q in ("Who is in it?", "What happens at the end?")]
    book_tokens = [len(llm.get_token_ids(TEMPLATE.split("{}")[0] + book)) for book in BOOKS]
    if call == "batch":  # Runnable.batch: one generate call over all the prompts, strings back
        results = Results()
        assert len(llm.batch(prompts, config={"callbacks": [results]})) == 4
        reads = [_cache_reads(r)[0] for r in results.results]
        assert len(reads) == 4
        assert sorted(reads)[-2] >= min(book_tokens), (reads, book_tokens)
        return
    result = llm.generate(prompts) if call == "generate" else asyncio.run(llm.agenerate(prompts))
    reads = _cache_reads(result)
    assert reads[1] >= book_tokens[0] and reads[3] >= book_tokens[1], (reads, book_tokens)


def _fit_engine(room=64):
    """The regime ChatBeacon(model=...) loads: fit-N (``room`` tokens planned after the document for follow-ups), no
    window checkpoints to fall back on."""
    return BeaconEngine(tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix=f"fit-{room}")))


def test_a_chain_with_the_book_in_the_human_message_reuses_it():
    chat = ChatBeacon(engine=_fit_engine(), max_tokens=3)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You answer questions about documents."), ("human", "{book}\n\nQuestion: {q}")]
    )
    chain = prompt | chat
    book_tokens = len(chat.get_token_ids(BOOKS[0]))
    usages = [chain.invoke({"book": BOOKS[0], "q": q}).usage_metadata for q in ("Who?", "What?", "When?", "Why?")]
    reads = [u["input_token_details"]["cache_read"] for u in usages]
    # the second question finds the book shared with the first and stores it; later ones read only the question
    assert reads[2] >= book_tokens and reads[3] >= book_tokens, (reads, book_tokens)


def test_a_growing_conversation_still_reuses_its_earlier_turns():
    chat = ChatBeacon(engine=_fit_engine(room=256), max_tokens=3)  # room for the conversation after the book
    history = [SystemMessage(BOOKS[0])]
    book_tokens = len(chat.get_token_ids(BOOKS[0]))
    reads = []
    for question in ("Who?", "What?", "When?"):
        history.append(HumanMessage(question))
        reply = chat.invoke(history)
        reads.append(reply.usage_metadata["input_token_details"]["cache_read"])
        history.append(AIMessage(reply.content))
    assert reads[0] == 0 and all(n >= book_tokens for n in reads[1:]), (reads, book_tokens)
