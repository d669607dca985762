"""``ChatBeacon``: a LangChain chat model that reads whole books (Activation Beacon, arXiv 2401.03462)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict

import beacon_llm

from ._common import BeaconFields, usage_metadata

_NO_TOOLS = (
    "ChatBeacon has no tool calling: a beacon model reads long text (whole books) and answers in text. For an agent, "
    "use a chat model with tool calling and give it ChatBeacon's long-document answers as a tool or a chain step"
)
_SKIPPED_AI_BLOCKS = {"reasoning", "thinking"}  # another model's reasoning in the history: not conversation text


def _message_text(m: BaseMessage) -> str:
    """The text of a message; a tool call or a non-text block (image, audio, file, ...) is a ValueError."""
    if isinstance(m, AIMessage) and (m.tool_calls or m.invalid_tool_calls):
        raise ValueError(f"an AIMessage with tool calls cannot be sent: {_NO_TOOLS}")
    if isinstance(m.content, str):
        return m.content
    parts = []
    for block in m.content:
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(block, str):
            parts.append(block)
        elif kind == "text":
            parts.append(str(block.get("text", "")))
        elif not (isinstance(m, AIMessage) and kind in _SKIPPED_AI_BLOCKS):
            if kind in ("tool_use", "tool_call", "tool_result", "function_call"):
                raise ValueError(
                    f"a content block of type {kind!r} in a {type(m).__name__} cannot be sent: {_NO_TOOLS}"
                )
            shown = repr(kind) if kind is not None else type(block).__name__
            raise ValueError(
                f"a content block of type {shown} in a {type(m).__name__}: this model reads text only (no images, "
                "audio, video or files); pass text blocks or a string, e.g. the text extracted from a file"
            )
    return "".join(parts)


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """Messages as the tokenizer's chat template takes them; tool messages, tool calls and non-text content raise
    ``ValueError`` instead of being dropped."""
    out = []
    for m in messages:
        # by class, not by ``m.type``: a chunk (a streamed reply summed up, kept in a history) is "AIMessageChunk"
        if isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, ChatMessage):
            role = m.role
        else:
            raise ValueError(f"{type(m).__name__} cannot be sent (use system/human/ai messages): {_NO_TOOLS}")
        out.append({"role": role, "content": _message_text(m)})
    return out


class ChatBeacon(BeaconFields, BaseChatModel):
    """Chat model over a local beacon model: whole documents in one call, ingest once and ask many.

    Every call reads its messages into its own condensed cache; the conversation before the last message is kept as
    a reusable prefix, so a second question about the same book reads only the question
    (``usage_metadata["input_token_details"]["cache_read"]`` counts the reused tokens).

    Example:
        .. code-block:: python

            from langchain_beacon import ChatBeacon
            chat = ChatBeacon(max_tokens=200)   # the embedded SmolLM2 + shipped beacons
            chat.invoke([("system", book_text), ("human", "Who is the narrator?")])
    """

    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=()
    )

    @property
    def _llm_type(self) -> str:
        return "beacon-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="beacon",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = [*(self.stop or []), *beacon_llm.normalize_stop(stop)]
        if stops:
            params["ls_stop"] = stops
        return params

    def _resolve_model_profile(self) -> dict[str, Any] | None:
        capacity = self.capacity()
        if capacity is None:
            return None
        return {
            "max_input_tokens": capacity,
            "max_output_tokens": self.max_tokens,
            "tool_calling": False,
            "structured_output": False,
            "text_inputs": True,
            "text_outputs": True,
        }

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens the model reads for ``messages``: the chat template's rendering with the assistant's turn opened,
        as ``invoke`` sends them (``usage_metadata["input_tokens"]``); the answer must fit after them."""
        if tools:
            raise NotImplementedError(_NO_TOOLS)
        if self.custom_get_token_ids is not None:
            return super().get_num_tokens_from_messages(messages)
        return len(self.get_engine().encode_chat(to_chat_dicts(convert_to_messages(messages)))[0])

    # ---------------------------------------------------------------- no tools
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | Any],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Not supported: beacon models have no tool calling (``NotImplementedError`` says what to do instead)."""
        raise NotImplementedError(_NO_TOOLS)

    def with_structured_output(
        self, schema: dict[str, Any] | type, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Not supported: no tool calling or JSON mode to guarantee a schema (``NotImplementedError``)."""
        raise NotImplementedError(
            "ChatBeacon has no structured output (no tool calling or JSON mode). Ask for JSON in the prompt and "
            "parse the reply (prompt | chat | langchain_core.output_parsers.JsonOutputParser() or "
            "PydanticOutputParser(pydantic_object=schema)), or use a chat model with tool calling"
        )

    # ---------------------------------------------------------------- core
    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Token ids, where their reusable prefix ends (:meth:`beacon_llm.BeaconEngine.chat_boundary`) and generation
        options."""
        options = self.call_options(stop, kwargs)
        engine = self.get_engine()
        ids, boundary = engine.encode_chat(to_chat_dicts(messages))
        return {"ids": ids, "boundary": engine.chat_boundary(ids, boundary), **options}

    def _events(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Iterator[str | beacon_llm.Completion]:
        yield from self.get_engine().stream(**self._request(messages, stop, kwargs))

    async def _aevents(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[str | beacon_llm.Completion]:
        request = await asyncio.to_thread(self._request, messages, stop, kwargs)  # tokenising a book takes seconds
        async for item in self.get_engine().astream(**request):
            yield item

    def _final_message(self, completion: beacon_llm.Completion, chunk: bool) -> AIMessage | AIMessageChunk:
        meta = {"model_name": self.model_name, "finish_reason": completion.finish_reason}
        usage = usage_metadata(completion.usage)
        if chunk:
            return AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta, chunk_position="last")
        return AIMessage(content=completion.text, usage_metadata=usage, response_metadata=meta)

    def _reports_tokens(self, kwargs: dict[str, Any]) -> bool:
        """Whether a call that is not streamed still hands each token to ``on_llm_new_token``: yes, unless streaming
        is switched off (``disable_streaming=True``, ``streaming=False`` given, or ``stream=False`` for the call), as
        LangChain reads those switches; ``astream_events`` then shows the answer once, not token by token."""
        if self.disable_streaming is True or ("stream" in kwargs and not kwargs["stream"]):
            return False
        return not ("streaming" in self.model_fields_set and self.streaming is False)

    async def _agenerate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """LangChain's, and a cancelled call (``asyncio.wait_for``, a cancelled task) ends its run with
        ``on_llm_error``: ``BaseChatModel.agenerate`` awaits its calls in ``asyncio.gather``, whose cancellation skips
        the error callbacks, so tracers would show the run as running forever."""
        try:
            return await super()._agenerate_with_cache(messages, stop=stop, run_manager=run_manager, **kwargs)
        except asyncio.CancelledError as exc:
            if run_manager is not None:
                await run_manager.on_llm_error(exc, response=LLMResult(generations=[]))
            raise

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        completion = None
        tokens = run_manager if self._reports_tokens(kwargs) else None
        for item in self._events(messages, stop, kwargs):
            if isinstance(item, str):
                if tokens is not None:
                    tokens.on_llm_new_token(item)
            else:
                completion = item
        assert completion is not None
        return ChatResult(generations=[ChatGeneration(message=self._final_message(completion, chunk=False))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for item in self._events(messages, stop, kwargs):
            if isinstance(item, str):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
                if run_manager is not None:
                    run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
            else:
                yield ChatGenerationChunk(message=self._final_message(item, chunk=True))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        completion = None
        tokens = run_manager if self._reports_tokens(kwargs) else None
        async for item in self._aevents(messages, stop, kwargs):
            if isinstance(item, str):
                if tokens is not None:
                    await tokens.on_llm_new_token(item)
            else:
                completion = item
        assert completion is not None
        return ChatResult(generations=[ChatGeneration(message=self._final_message(completion, chunk=False))])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for item in self._aevents(messages, stop, kwargs):
            if isinstance(item, str):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
                if run_manager is not None:
                    await run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
            else:
                yield ChatGenerationChunk(message=self._final_message(item, chunk=True))

    # ---------------------------------------------------------------- documents
    def save_document_cache(self, messages: list[BaseMessage], path: str) -> None:
        """Condense ``messages`` (e.g. ``[("system", book)]``) and write them to ``path`` for later sessions."""
        engine = self.get_engine()
        ids, _ = engine.encode_chat(to_chat_dicts(convert_to_messages(messages)), add_generation_prompt=False)
        engine.export_prefix(ids, path)

    def load_document_cache(self, path: str) -> int:
        """Load a file written by :meth:`save_document_cache`; returns its token count. A file made with another
        model or beacon config raises ``ValueError``."""
        return self.get_engine().import_prefix(path)
