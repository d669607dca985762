"""``BeaconLLM``: string-in, string-out LangChain LLM over a local beacon model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun, Callbacks
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict

import beacon_llm

from ._common import CALL_OPTIONS, BeaconFields, usage_metadata

_MIN_SHARED = 32  # a shared beginning shorter than this is not worth a reusable prefix


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the beginning ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _shared_prefixes(sequences: list[list[int]]) -> list[int]:
    """For each sequence, the longest beginning it shares with any other one: in lexicographic order that other one
    is a neighbour, so a batch of prompts about several books gives each prompt its own book's beginning."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    shared = [0] * len(sequences)
    for left, right in zip(order, order[1:]):
        n = _common_prefix(sequences[left], sequences[right])
        shared[left], shared[right] = max(shared[left], n), max(shared[right], n)
    return shared


class BeaconLLM(BeaconFields, LLM):
    """A LangChain ``LLM``: the prompt (a whole book plus a question, say) is read in one call; only the completion
    is returned (never the prompt), cut before the first stop string. Prompts that share a beginning with a recent
    one (the same book, another question) reuse its condensed prefix."""

    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=()
    )

    @property
    def _llm_type(self) -> str:
        return "beacon-llm"

    def _with_call_options(self, kwargs: dict[str, Any]) -> tuple[BeaconLLM, dict[str, Any]]:
        """This LLM with the call's generation options (``max_tokens``, ``temperature``, ...) as its fields, and the
        other keyword arguments. LangChain keys its LLM cache (and traces) on an LLM's fields and the stop strings
        only: left as keyword arguments, the options of a call would get the cached answer of another (a per-call
        ``max_tokens=3`` answer returned for ``max_tokens=200``). Checked later, in the run, as before."""
        options = {name: kwargs[name] for name in CALL_OPTIONS - {"stop"} if name in kwargs}
        if not options:
            return self, kwargs
        rest = {name: value for name, value in kwargs.items() if name not in options}
        if self.engine is not None:
            self.get_engine()  # made once (around a BeaconModel) and shared, with its condensed prefixes
        return self.model_copy(update=options), rest  # shares the engine

    def generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        llm, kwargs = self._with_call_options(kwargs)
        return super(BeaconLLM, llm).generate(prompts, stop, callbacks, **kwargs)

    async def agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        llm, kwargs = self._with_call_options(kwargs)
        return await super(BeaconLLM, llm).agenerate(prompts, stop, callbacks, **kwargs)

    def _request(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        options = self.call_options(stop, kwargs)
        return {"ids": self.get_engine().encode(prompt), **options}

    def _events(
        self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any], request: dict[str, Any] | None = None
    ) -> Iterator[str | beacon_llm.Completion]:
        yield from self.get_engine().stream(**(request or self._request(prompt, stop, kwargs)))

    async def _aevents(
        self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any], request: dict[str, Any] | None = None
    ) -> AsyncIterator[str | beacon_llm.Completion]:
        if request is None:
            request = await asyncio.to_thread(self._request, prompt, stop, kwargs)
        async for item in self.get_engine().astream(**request):
            yield item

    def _batch_requests(
        self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Every prompt's request, checked and tokenised before any is read. Prompts that begin alike (the same book,
        other questions) mark that beginning as their reusable prefix, so the first call condenses it once and the
        others reuse it; in a batch about several books, each prompt's prefix is the beginning it shares with the most
        alike other prompt (its own book), not the little all of them share."""
        requests = [self._request(prompt, stop, kwargs) for prompt in prompts]
        for request, shared in zip(requests, _shared_prefixes([r["ids"] for r in requests])):
            if _MIN_SHARED <= shared < len(request["ids"]):
                request["boundary"] = shared
        return requests

    @staticmethod
    def _started_now(request: dict[str, Any]) -> dict[str, Any]:
        """The request with its ``timeout`` clock started now: each prompt of a batch gets its own full time."""
        return {**request, "started": time.monotonic()}

    def _info(self, completion: beacon_llm.Completion) -> dict[str, Any]:
        return {"finish_reason": completion.finish_reason, "usage": usage_metadata(completion.usage)}

    def _complete(
        self,
        prompt: str,
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
        request: dict[str, Any] | None = None,
    ) -> beacon_llm.Completion:
        final = None
        for item in self._events(prompt, stop, kwargs, request):
            if isinstance(item, str):
                if run_manager is not None:
                    run_manager.on_llm_new_token(item)
            else:
                final = item
        assert final is not None
        return final

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._complete(prompt, stop, run_manager, kwargs).text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """One generation per prompt, each with its own finish reason and usage in ``generation_info``; a shared
        beginning is read once (:meth:`_batch_requests`). Tokens go to ``on_llm_new_token`` for a call of one prompt
        only: LangChain gives ``_generate`` the run of the first prompt alone, and another prompt's tokens are not
        that run's."""
        generations = []
        tokens = run_manager if len(prompts) == 1 else None
        for prompt, request in zip(prompts, self._batch_requests(prompts, stop, kwargs)):
            completion = self._complete(prompt, stop, tokens, kwargs, self._started_now(request))
            generations.append([Generation(text=completion.text, generation_info=self._info(completion))])
        return LLMResult(generations=generations)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """:meth:`_generate` for asyncio (finish reason and usage included); tokenising runs off the event loop."""
        requests = await asyncio.to_thread(self._batch_requests, prompts, stop, kwargs)
        generations = []
        tokens = run_manager if len(prompts) == 1 else None
        for prompt, request in zip(prompts, requests):
            completion = None
            async for item in self._aevents(prompt, stop, kwargs, self._started_now(request)):
                if isinstance(item, str):
                    if tokens is not None:
                        await tokens.on_llm_new_token(item)
                else:
                    completion = item
            assert completion is not None
            generations.append([Generation(text=completion.text, generation_info=self._info(completion))])
        return LLMResult(generations=generations)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for item in self._events(prompt, stop, kwargs):
            if isinstance(item, str):
                chunk = GenerationChunk(text=item)
                if run_manager is not None:
                    run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
            else:
                yield GenerationChunk(text="", generation_info=self._info(item))

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        text = ""
        async for item in self._aevents(prompt, stop, kwargs):
            if isinstance(item, str):
                if run_manager is not None:
                    await run_manager.on_llm_new_token(item)
            else:
                text = item.text
        return text

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for item in self._aevents(prompt, stop, kwargs):
            if isinstance(item, str):
                chunk = GenerationChunk(text=item)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
            else:
                yield GenerationChunk(text="", generation_info=self._info(item))
