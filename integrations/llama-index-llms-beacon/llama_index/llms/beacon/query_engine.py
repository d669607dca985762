"""``BeaconQueryEngine``: answer questions over whole documents in ONE LLM call, no chunking, no retrieval."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from llama_index.core import Settings
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr, model_validator
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import Document, NodeWithScore, TextNode
from llama_index.llms.beacon.base import BeaconLLM

SYSTEM = "You are a helpful assistant. Answer questions about the documents briefly and accurately."


def _header(doc: Document, index: int) -> str:
    meta = {k: v for k, v in (doc.metadata or {}).items() if k not in doc.excluded_llm_metadata_keys}
    fields = "; ".join(f"{k}: {v}" for k, v in meta.items())
    return f"### Document {index + 1}" + (f" ({fields})" if fields else "")


class BeaconQueryEngine(CustomQueryEngine):
    """Concatenate the documents (with their metadata headers) and read them in one call per question.

    The condensed documents are cached by the LLM's engine, so follow-up questions read only the question. A set of
    documents beyond the model's capacity raises ``ValueError`` with the token count and the capacity (never silent
    truncation). ``source_nodes`` of every response name the documents that were read (all of them).

    Without ``llm=``, ``Settings.llm`` is used when it is a ``BeaconLLM`` (else the embedded model); without
    ``system_prompt=``, the LLM's ``system_prompt`` when it has one (else a default for questions about documents).
    """

    llm: BeaconLLM = Field(description="the beacon LLM")
    documents_text: str = Field(description="the concatenated documents")
    system_prompt: str = Field(default=SYSTEM)
    streaming: bool = Field(default=False)
    _nodes: list[TextNode] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _llm_system_prompt(self) -> BeaconQueryEngine:
        """The LLM's ``system_prompt`` applies, as to every call of that LLM, unless one is given here."""
        if "system_prompt" not in self.model_fields_set and self.llm.system_prompt:
            self.system_prompt = self.llm.system_prompt
        return self

    @classmethod
    def from_documents(cls, documents: Sequence[Document], llm: BeaconLLM | None = None, *, streaming: bool = False,
                       system_prompt: str | None = None, check_capacity: bool = True) -> BeaconQueryEngine:  # fmt: skip
        if not documents:
            raise ValueError("no documents given")
        if llm is None:
            # Settings.llm itself would resolve a default OpenAI model when none was set
            llm = Settings.llm if isinstance(getattr(Settings, "_llm", None), BeaconLLM) else BeaconLLM()
        parts = [f"{_header(d, i)}\n{d.get_content()}" for i, d in enumerate(documents)]
        prompt = {} if system_prompt is None else {"system_prompt": system_prompt}
        engine = cls(llm=llm, documents_text="\n\n".join(parts), streaming=streaming, **prompt)
        engine._nodes = [TextNode(text=d.get_content(), metadata=dict(d.metadata or {}), id_=d.doc_id)
                         for d in documents]  # fmt: skip
        if check_capacity:
            engine._check_capacity(len(engine._prompt_ids("")[0]))
        return engine

    def _prompt(self, question: str) -> tuple[str, str]:
        """The prompt as text: (the documents and everything before the question, the rest)."""
        return self.llm.get_engine().document_prompt_text(self.documents_text, question, system=self.system_prompt)

    def _prompt_ids(self, question: str) -> tuple[list[int], int]:
        """The prompt's token ids and where the question starts. The documents, question and system prompt are
        tokenised literally: a document that spells a special token (``<|im_end|>``) cannot end its turn."""
        return self.llm.get_engine().document_prompt(self.documents_text, question, system=self.system_prompt)

    def _check_capacity(self, n_prompt: int) -> None:
        """The engine's capacity check (:meth:`beacon_llm.BeaconEngine.check_fits`), its refusal worded for
        documents."""
        engine, answer = self.llm.get_engine(), self.llm.max_new_tokens
        try:
            engine.check_fits(n_prompt, answer)
        except ValueError:
            raise ValueError(
                f"the documents need {n_prompt + answer} tokens (with the question and {answer} output tokens), "
                f"more than this model's beacon capacity of {engine.capacity} tokens; use fewer documents or a "
                "larger compression ratio (beacon_overrides={'beacon_ratio': [...]})"
            ) from None

    def _request(self, question: str) -> tuple[str, Callable[[], dict[str, Any]]]:
        """The prompt's text (what LlamaIndex callbacks record) and the function that tokenises it and checks the
        capacity (seconds for a book: the async queries run it off the event loop)."""
        options = self.llm._options({})
        prefix, rest = self._prompt(question)

        def request() -> dict[str, Any]:
            ids, boundary = self._prompt_ids(question)
            self._check_capacity(len(ids))
            return {"ids": ids, "boundary": boundary, **options}

        return prefix + rest, request

    def _sources(self) -> list[NodeWithScore]:
        return [NodeWithScore(node=n, score=1.0) for n in self._nodes]

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        prompt, request = self._request(query_str)
        if self.streaming:
            stream = self.llm._stream_complete_prepared(prompt, request)

            def deltas() -> Iterator[str]:
                for r in stream:
                    if r.delta:
                        yield r.delta

            return StreamingResponse(response_gen=deltas(), source_nodes=self._sources())
        out = self.llm._complete_prepared(prompt, request)
        return Response(response=out.text, source_nodes=self._sources(), metadata=dict(out.additional_kwargs))

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        def prepare() -> tuple[str, dict[str, Any]]:
            prompt, request = self._request(query_str)
            return prompt, request()

        # loading the model (a first query) and tokenising a book take seconds: off the event loop; a capacity error
        # raises here
        prompt, prepared = await asyncio.to_thread(prepare)
        request = lambda: prepared  # noqa: E731
        if self.streaming:
            stream = await self.llm._astream_complete_prepared(prompt, request)

            async def deltas() -> AsyncIterator[str]:
                async for r in stream:
                    if r.delta:
                        yield r.delta

            return AsyncStreamingResponse(response_gen=deltas(), source_nodes=self._sources())
        out = await self.llm._acomplete_prepared(prompt, request)
        return Response(response=out.text, source_nodes=self._sources(), metadata=dict(out.additional_kwargs))

    def __repr__(self) -> str:
        return f"BeaconQueryEngine(documents={len(self._nodes)}, chars={len(self.documents_text)})"

    model_config: Any = {"arbitrary_types_allowed": True}
