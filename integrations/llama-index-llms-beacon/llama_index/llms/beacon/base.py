"""``BeaconLLM``: a LlamaIndex LLM over a local Activation Beacon model (arXiv 2401.03462)."""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, ValidationInfo, field_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

import beacon_llm

EMBEDDED_NAME = "smollm2-135m-instruct"
# tokens of the capacity kept for what a chat template adds around the messages LlamaIndex packs (turn markers, role
# headers, a default system prompt: ~30 for SmolLM2, ~40 for Llama 3.1), which its prompt helpers do not count
TEMPLATE_RESERVE = 64
_OPTIONS = ("max_new_tokens", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
# the fields that choose and load a model: meaningless next to an engine object, so refused with one
_LOADING_FIELDS = ("model", "adapter", "beacon_overrides", "device", "dtype", "cache_dir")
_TOOL_ARGS = {"tools", "tool_choice", "tool_required", "allow_parallel_tool_calls", "functions", "function_call"}
_NO_TOOLS = (
    "BeaconLLM has no tool calling (metadata.is_function_calling_model is False); a ReActAgent describes the "
    "tools in the prompt as text instead"
)
_TOKENIZER_HINT = (
    "LlamaIndex packs prompts up to metadata.context_window counting with Settings.tokenizer (tiktoken unless set), "
    "not this model's tokenizer: set Settings.tokenizer = llm.tokenizer_fn"
)


class BeaconCapacityError(RuntimeError):
    """A prompt plus its answer beyond the model's beacon capacity (``metadata.context_window``), refused before
    anything is read. Not a ``ValueError``: LlamaIndex's refine / compact synthesizers catch those and answer
    "Empty Response" instead of saying why."""


class BeaconLLM(CustomLLM):
    """Local beacon model for LlamaIndex. ``metadata.context_window`` is the real condensed capacity (e.g. ~230K
    tokens for the embedded SmolLM2 at ratio 32) less ``TEMPLATE_RESERVE``, so LlamaIndex does not re-chunk whole
    books; a prompt beyond the capacity raises :class:`BeaconCapacityError` before anything is read.

    Every call works on its own cache; a prompt sharing a beginning with an earlier one (the same documents)
    reuses the condensed prefix (``complete(..., cached_prefix=...)`` marks it exactly).

    As LlamaIndex's own LLMs: ``complete(prompt)`` adds ``system_prompt`` / ``query_wrapper_prompt`` and applies
    ``completion_to_prompt`` (``formatted=True``: the prompt as given); ``chat`` uses the model's chat template, or a
    custom ``messages_to_prompt`` when one is given. The model reads text only and has no tool calling.
    """

    model: str | None = Field(default=None, description="base model or official beacon checkpoint; None = embedded")
    adapter: str | None = Field(default=None, description="beacon adapter folder for `model`")
    beacon_overrides: dict[str, Any] = Field(default_factory=dict, description="beacon_* config keys applied on load")
    device: str | None = Field(default=None, description="torch device, e.g. 'cuda'")
    dtype: str | None = Field(default=None, description="weights dtype, e.g. 'bfloat16'")
    cache_dir: str | None = Field(default=None, description="persist condensed documents here (safetensors + JSON)")
    max_new_tokens: int = Field(default=256, description="tokens generated per call (num_output), a positive int")
    temperature: float = Field(default=0.0, description=">= 0; 0 = greedy")
    top_p: float | None = Field(default=None, description="nucleus filtering, in (0, 1]; None = none")
    top_k: int | None = Field(default=None, description="top-k filtering, a positive int; None = none")
    repetition_penalty: float | None = Field(
        default=None, description="> 0; penalises tokens already in the answer (1.0 or None = none)"
    )
    seed: int | None = Field(default=None, description="sampling seed, an int in [-2**63, 2**64 - 1]")
    stop: list[str] | None = Field(default=None, description="stop strings (output is cut before them)")

    _engine: Any = PrivateAttr(default=None)
    _explicit_engine: bool = PrivateAttr(default=False)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, engine: beacon_llm.BeaconEngine | beacon_llm.BeaconModel | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is not None and not isinstance(engine, (beacon_llm.BeaconEngine, beacon_llm.BeaconModel)):
            raise TypeError(f"engine must be a BeaconEngine or BeaconModel, got {type(engine).__name__}")
        if engine is not None:
            given = {name: getattr(self, name) for name in _LOADING_FIELDS}
            if isinstance(engine, beacon_llm.BeaconModel):
                given.pop("cache_dir")  # the engine made around the model persists there
            conflicts = [name for name, value in given.items() if value not in (None, {})]
            if conflicts:
                raise ValueError(
                    f"{', '.join(conflicts)} cannot be set together with engine=: the engine is already loaded (its "
                    "model, adapter, beacon config, device, dtype and cache_dir are its own); pass either engine= or "
                    "these options"
                )
        if isinstance(engine, beacon_llm.BeaconModel):
            engine = beacon_llm.BeaconEngine(engine, cache_dir=self.cache_dir)
        self._engine = engine
        self._explicit_engine = engine is not None

    @field_validator("stop", mode="before")
    @classmethod
    def _normalize_stop(cls, stop: Any) -> list[str] | None:
        """One string is one stop string; entries are checked as per call (``beacon_llm.normalize_stop``)."""
        return beacon_llm.normalize_stop(stop) or None

    @field_validator("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", mode="before")
    @classmethod
    def _check_option(cls, value: Any, info: ValidationInfo) -> Any:
        """Checked as given (no coercion of "42", 5.0 or True), with the message of the same option per call."""
        beacon_llm.check_sampling_options(**{info.field_name: value})
        return value

    @classmethod
    def class_name(cls) -> str:
        return "BeaconLLM"

    def _portable_private(self) -> dict[str, Any]:
        """The private state a copy takes: no lock (each copy makes its own); a lazily loaded engine is reloaded
        (shared per process) on first use; an engine given explicitly travels with the object."""
        private = {key: value for key, value in (self.__pydantic_private__ or {}).items() if key != "_lock"}
        if not self._explicit_engine:
            private["_engine"] = None
        return private

    def __getstate__(self) -> dict[str, Any]:
        """Picklable: LlamaIndex's ``BaseComponent.__getstate__`` drops unpicklable fields (a lambda
        ``completion_to_prompt``) from the ``__dict__`` it is given, so it is given a copy, never this object's own."""
        shadow = type(self).__new__(type(self))
        object.__setattr__(shadow, "__dict__", dict(self.__dict__))
        object.__setattr__(shadow, "__pydantic_extra__", self.__pydantic_extra__)
        object.__setattr__(shadow, "__pydantic_fields_set__", set(self.__pydantic_fields_set__))
        object.__setattr__(shadow, "__pydantic_private__", self._portable_private())
        return super(BeaconLLM, shadow).__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        private = dict(state.get("__pydantic_private__") or {})
        private["_lock"] = threading.Lock()
        super().__setstate__({**state, "__pydantic_private__": private})  # LlamaIndex re-runs __init__ here
        for key, value in private.items():
            setattr(self, key, value)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> BeaconLLM:
        """A deep copy with every field (functions such as a lambda ``completion_to_prompt`` are kept, as deep copies
        keep them) and its own lock (pydantic's own would copy the lock and fail)."""
        memo = {} if memo is None else memo
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        private = {**copy.deepcopy(self._portable_private(), memo), "_lock": threading.Lock()}
        object.__setattr__(clone, "__dict__", copy.deepcopy(self.__dict__, memo))
        object.__setattr__(clone, "__pydantic_extra__", copy.deepcopy(self.__pydantic_extra__, memo))
        object.__setattr__(clone, "__pydantic_fields_set__", set(self.__pydantic_fields_set__))
        object.__setattr__(clone, "__pydantic_private__", private)
        return clone

    def get_engine(self) -> beacon_llm.BeaconEngine:
        """The shared engine: loaded on first use, shared by every object over the same weights."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = beacon_llm.get_engine(
                        self.model, adapter=self.adapter, dtype=self.dtype, device=self.device,
                        cache_dir=self.cache_dir, **self.beacon_overrides,
                    )  # fmt: skip
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        """``model_name`` is the name given (stable before and after loading), or the model of an engine given as
        is; ``context_window`` the beacon capacity (``capacity_from_files`` raises ValueError naming the cause when
        the files cannot be read) less ``TEMPLATE_RESERVE`` tokens: LlamaIndex's prompt helpers fill the window
        counting message texts and role names only, not the chat template's own tokens around them, so a pack filled
        to the exact capacity would not fit."""
        if self._engine is not None:
            capacity = self._engine.capacity
        else:
            capacity = beacon_llm.capacity_from_files(self.model, self.adapter, **self.beacon_overrides)
        return LLMMetadata(
            context_window=max(capacity - TEMPLATE_RESERVE, 1),
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self._model_name(),
        )

    def _model_name(self) -> str:
        if not self._explicit_engine:
            return self.model or EMBEDDED_NAME
        name = str(getattr(self._engine.bm.model.config, "_name_or_path", "") or "")  # an engine given as is
        if name and (os.path.isabs(name) or os.path.isdir(name)):
            name = os.path.basename(os.path.normpath(name))
        return name or "beacon"

    @property
    def tokenizer_fn(self) -> Callable[[str], list[int]]:
        """The model's own tokenizer, for ``Settings.tokenizer = llm.tokenizer_fn``."""
        return self.get_engine().encode

    # ---------------------------------------------------------------- requests
    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Generation options of one call over the object's defaults, checked as the constructor checks them."""
        tool_args = sorted(set(kwargs) & _TOOL_ARGS)
        if tool_args:
            raise TypeError(f"{tool_args}: {_NO_TOOLS}")
        unknown = set(kwargs) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown generation options {sorted(unknown)}; supported: {sorted(_OPTIONS)}")
        if "max_new_tokens" in kwargs and "max_tokens" in kwargs and kwargs["max_new_tokens"] != kwargs["max_tokens"]:
            raise ValueError(
                f"max_new_tokens={kwargs['max_new_tokens']!r} and max_tokens={kwargs['max_tokens']!r} differ: "
                "pass one of them"
            )
        sampling = {
            "max_new_tokens": kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "top_k": kwargs.get("top_k", self.top_k),
            "repetition_penalty": kwargs.get("repetition_penalty", self.repetition_penalty),
            "seed": kwargs.get("seed", self.seed),
        }
        beacon_llm.check_sampling_options(**sampling)
        stops = [*(self.stop or []), *beacon_llm.normalize_stop(kwargs.get("stop"))]
        return {**sampling, "stop": stops or None}

    def _completion_request(self, prompt: str, formatted: bool, cached_prefix: str | None,
                            kwargs: dict[str, Any]) -> Callable[[], dict[str, Any]]:  # fmt: skip
        """Check and format now (errors raise at the call); the returned function tokenises (seconds for a book)."""
        options = self._options(kwargs)
        if cached_prefix is not None and not prompt.startswith(cached_prefix):
            raise ValueError("cached_prefix must be the beginning of the prompt")
        text = prompt if formatted else self.completion_to_prompt(self._extend_prompt(prompt))
        head = None
        if cached_prefix is not None:
            start = text.find(prompt)
            if start < 0:
                raise ValueError(
                    "cached_prefix: completion_to_prompt / query_wrapper_prompt do not keep the prompt as it is; "
                    "format the prompt yourself and pass formatted=True"
                )
            head = text[: start + len(cached_prefix)]

        def encode() -> dict[str, Any]:
            engine = self.get_engine()
            if head is None:
                return {"ids": engine.encode(text), **options}
            head_ids = engine.encode(head)
            return {"ids": head_ids + engine.encode(text[len(head) :]), "boundary": len(head_ids), **options}

        return encode

    def _chat_request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        """Check and format now; ``system_prompt`` is added unless the messages have a system message. A custom
        ``messages_to_prompt`` makes the prompt (completed as is); otherwise the model's chat template does."""
        options = self._options(kwargs)
        messages = list(messages)
        if self.system_prompt and not any(_role_value(m.role) in ("system", "developer") for m in messages):
            messages = [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt), *messages]
        texts = [_message_text(m, i) for i, m in enumerate(messages)]
        if self.messages_to_prompt is not generic_messages_to_prompt:
            prompt = self.messages_to_prompt(messages)
            return lambda: {"ids": self.get_engine().encode(prompt), **options}
        dicts = [{"role": _role(m.role), "content": text} for m, text in zip(messages, texts)]

        def encode() -> dict[str, Any]:
            engine = self.get_engine()
            ids, boundary = engine.encode_chat(dicts)
            return {"ids": ids, "boundary": engine.chat_boundary(ids, boundary), **options}

        return encode

    @staticmethod
    def _raw(completion: beacon_llm.Completion) -> dict[str, Any]:
        u = completion.usage
        return {"finish_reason": completion.finish_reason, "usage": {
            "prompt_tokens": u.input_tokens, "cache_read_tokens": u.cache_read_tokens, "read_tokens": u.read_tokens,
            "completion_tokens": u.output_tokens}}  # fmt: skip

    def _check_fits(self, request: dict[str, Any]) -> None:
        """The engine's capacity check (:meth:`beacon_llm.BeaconEngine.check_fits`), raised as
        :class:`BeaconCapacityError` with the way out of LlamaIndex's packing; an empty prompt is the engine's
        ``ValueError``."""
        if not request["ids"]:
            return
        try:
            self.get_engine().check_fits(len(request["ids"]), request["max_new_tokens"])
        except ValueError as exc:
            raise BeaconCapacityError(f"{exc}. {_TOKENIZER_HINT}") from None

    def _response(self, item: str | beacon_llm.Completion, text: str) -> CompletionResponse:
        """A text delta (``text`` is the answer so far), or the final response: its usage in ``raw`` (where
        LlamaIndex's ``TokenCountingHandler`` reads it) and ``additional_kwargs``."""
        if isinstance(item, str):
            return CompletionResponse(text=text, delta=item)
        raw = self._raw(item)
        return CompletionResponse(text=item.text, delta="", raw=raw, additional_kwargs=raw)

    def _complete_stream(self, request: dict[str, Any]) -> CompletionResponseGen:
        self._check_fits(request)
        text = ""
        for item in self.get_engine().stream(**request):
            text += item if isinstance(item, str) else ""
            yield self._response(item, text)

    async def _acomplete_stream(self, request_fn: Callable[[], dict[str, Any]]) -> AsyncIterator[CompletionResponse]:
        request = await asyncio.to_thread(request_fn)  # tokenising a book takes seconds: off the event loop
        self._check_fits(request)
        text = ""
        async for item in self.get_engine().astream(**request):
            text += item if isinstance(item, str) else ""
            yield self._response(item, text)

    # ---------------------------------------------------------------- completion API
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, cached_prefix: str | None = None,
                 **kwargs: Any) -> CompletionResponse:  # fmt: skip
        """Complete ``prompt``; ``cached_prefix`` (a beginning of the prompt, e.g. the documents) is condensed once
        and reused by later prompts that start with it."""
        return self._last(self._complete_stream(self._completion_request(prompt, formatted, cached_prefix, kwargs)()))

    @staticmethod
    def _last(responses: CompletionResponseGen) -> CompletionResponse:
        last = None
        for last in responses:
            pass
        return last

    @staticmethod
    async def _alast(responses: AsyncIterator[CompletionResponse]) -> CompletionResponse:
        last = None
        async for last in responses:
            pass
        return last

    # Prepared requests: a caller that builds the token ids itself (``BeaconQueryEngine`` keeps the documents' text
    # literal) passes the prompt's text, which callbacks record, and the function that makes the request.
    @llm_completion_callback()
    def _complete_prepared(self, prompt: str, request: Callable[[], dict[str, Any]]) -> CompletionResponse:
        return self._last(self._complete_stream(request()))

    @llm_completion_callback()
    def _stream_complete_prepared(self, prompt: str, request: Callable[[], dict[str, Any]]) -> CompletionResponseGen:
        return self._complete_stream(request())

    @llm_completion_callback()
    async def _acomplete_prepared(self, prompt: str, request: Callable[[], dict[str, Any]]) -> CompletionResponse:
        return await self._alast(self._acomplete_stream(request))

    @llm_completion_callback()
    async def _astream_complete_prepared(
        self, prompt: str, request: Callable[[], dict[str, Any]]
    ) -> CompletionResponseAsyncGen:
        return self._acomplete_stream(request)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, cached_prefix: str | None = None,
                        **kwargs: Any) -> CompletionResponseGen:  # fmt: skip
        return self._complete_stream(self._completion_request(prompt, formatted, cached_prefix, kwargs)())

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, cached_prefix: str | None = None,
                        **kwargs: Any) -> CompletionResponse:  # fmt: skip
        return await self._alast(
            self._acomplete_stream(self._completion_request(prompt, formatted, cached_prefix, kwargs))
        )

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, cached_prefix: str | None = None,
                               **kwargs: Any) -> CompletionResponseAsyncGen:  # fmt: skip
        return self._acomplete_stream(self._completion_request(prompt, formatted, cached_prefix, kwargs))

    # ---------------------------------------------------------------- chat API
    @staticmethod
    def _to_chat(response: CompletionResponse) -> ChatResponse:
        message = ChatMessage(role=MessageRole.ASSISTANT, content=response.text)
        return ChatResponse(message=message, delta=response.delta, raw=response.raw,
                            additional_kwargs=response.additional_kwargs)  # fmt: skip

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = None
        for last in self._complete_stream(self._chat_request(messages, kwargs)()):
            pass
        return self._to_chat(last)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._complete_stream(self._chat_request(messages, kwargs)())

        def gen() -> ChatResponseGen:
            for response in stream:
                yield self._to_chat(response)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = None
        async for last in self._acomplete_stream(self._chat_request(messages, kwargs)):
            pass
        return self._to_chat(last)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = self._acomplete_stream(self._chat_request(messages, kwargs))

        async def gen() -> ChatResponseAsyncGen:
            async for response in stream:
                yield self._to_chat(response)

        return gen()


def _role_value(role: MessageRole | str) -> str:
    return role.value if isinstance(role, MessageRole) else str(role)


def _role(role: MessageRole | str) -> str:
    value = _role_value(role)
    if value in ("system", "user", "assistant"):
        return value
    if value == "developer":
        return "system"
    raise ValueError(f"message role {value!r} is not supported (no tool calling); use system/user/assistant")


def _message_text(message: ChatMessage, index: int) -> str:
    """The text of a message; a block that is not text (image, audio, document, tool call...) is an error."""
    if message.additional_kwargs.get("tool_calls"):
        raise ValueError(f"message {index} carries tool calls: {_NO_TOOLS}")
    parts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, ToolCallBlock):
            raise ValueError(f"message {index} has a tool call ({block.tool_name!r}): {_NO_TOOLS}")
        elif not isinstance(block, CachePoint):  # a cache hint carries no content
            kind = getattr(block, "block_type", type(block).__name__)
            raise ValueError(
                f"message {index} has a {kind!r} block ({type(block).__name__}): this model reads text only; "
                "pass the content as text"
            )
    return "\n".join(parts)
