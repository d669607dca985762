"""``beacon-llm serve``: one loaded beacon model and its condensed books behind an OpenAI-compatible HTTP API.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health``. A chat's earlier messages (e.g. a whole book as the system message) are condensed once and stored on
disk, so a follow-up question about the same document reads only the question; ``usage.prompt_tokens_details.
cached_tokens`` counts the reused tokens. With API keys, each key has its own engine and its own store folder (named
by a hash of the key): one key never reuses another key's documents. Every generation runs in a worker thread with a
cancel event, set when the client disconnects or the server shuts down. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .engine import BeaconEngine, Completion, ReadCancelled, Usage
from .generation import check_sampling_options, normalize_stop
from .model import BeaconModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
PUBLIC_TENANT = "public"  # the store folder when no API keys are configured
_HEADER_WAIT_S = 2.0  # a stream's headers wait this long for the prompt's checks, so a refusal is a plain 4xx
_BUSY_RETRY_S = 5  # Retry-After of a request refused because max_concurrent run and max_queued wait
_MAX_STOP = 16
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass(frozen=True)
class ServeLimits:
    """The server's bounds. Memory holds at most ``max_engines`` × ``max_prefixes`` condensed prefixes plus the caches
    of ``max_concurrent`` requests in flight; every stored document also stays on disk."""

    max_body_bytes: int = 32 * 2**20  # a request body larger than this is refused (413)
    default_max_tokens: int = 512  # answer length when a request sets none (lowered to what fits the capacity)
    max_concurrent: int = 4  # generations running at once; more requests wait for a free worker
    max_queued: int = 64  # requests waiting for a worker; beyond that a request is refused (503, Retry-After)
    max_engines: int = 8  # per-key engines kept in memory (least recently used dropped; their disk stores remain)
    max_prefixes: int = 2  # condensed prefixes each engine keeps in memory
    min_prefix: int = 64  # shorter shared prefixes (short chats) are not stored
    shutdown_timeout: float = 30.0  # seconds to wait for worker threads after cancelling them at shutdown

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "default_max_tokens", "max_concurrent", "max_engines"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("max_queued", "max_prefixes", "min_prefix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if not _is_number(self.shutdown_timeout) or not self.shutdown_timeout > 0:
            raise ValueError(f"shutdown_timeout={self.shutdown_timeout!r} must be a number of seconds > 0")


# ---------------------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered as OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after  # seconds, sent as the Retry-After header

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _engine_error(exc: BaseException) -> ApiError:
    """An exception raised by a generation, as the error the client gets."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValueError):  # the engine's refusals: capacity, empty prompt
        return _bad(str(exc), code="context_length_exceeded" if "capacity" in str(exc) else None)
    if isinstance(exc, ReadCancelled):  # a client only sees this when the server shuts down
        message = f"the request was cancelled: {exc}; the server is shutting down, retry the request later"
        return ApiError(503, message, code="cancelled", kind="server_error")
    logger.error("generation failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


# ---------------------------------------------------------------------------------------------------------- requests
_COMMON_FIELDS = frozenset(
    {
        "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "repetition_penalty", "stop", "seed", "n", "user", "presence_penalty", "frequency_penalty", "logprobs",
        "top_logprobs", "logit_bias", "service_tier", "store", "metadata", "safety_identifier", "prompt_cache_key",
    }
)  # fmt: skip
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
    "modalities", "audio",
}  # fmt: skip
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "function_call", "tool_call_id", "refusal"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_NO_TOOLS = "this server has no tool calling: a beacon model reads long text and answers in text"


@dataclass
class GenerationRequest:
    """A validated request: what to read (messages or a prompt) and how to answer."""

    model: str
    max_tokens: int | None = None
    temperature: float = 0.0  # greedy, like the rest of beacon-llm (OpenAI's default is 1)
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None

    def engine_options(self, max_tokens: int) -> dict[str, Any]:
        return {
            "max_new_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "seed": self.seed,
        }


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(body: Mapping[str, Any], name: str, check: Callable[[Any], bool], what: str) -> Any:
    """``body[name]`` if it is absent / null or passes ``check``; else a 400 naming the field and the expected type."""
    value = body.get(name)
    if value is not None and not check(value):
        raise _bad(f"{name} must be {what}, got {json.dumps(value)[:80]} ({_type_name(value)})", param=name)
    return value


def _only(body: Mapping[str, Any], name: str, allowed: tuple[Any, ...], why: str) -> None:
    """A field this server supports only at its neutral values (e.g. ``n=1``): any other value is a 400."""
    value = body.get(name)
    if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
        shown = ", ".join(json.dumps(a) for a in allowed)
        raise _bad(f"{name}={json.dumps(value)[:80]} is not supported ({why}); send {shown} or leave it out", name)


def _check_fields(body: Mapping[str, Any], allowed: frozenset[str], endpoint: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(
            f"unknown field(s) {', '.join(repr(u) for u in unknown)} for {endpoint}; accepted fields: "
            f"{', '.join(sorted(allowed))}",
            param=unknown[0],
        )


def _check_unsupported(body: Mapping[str, Any]) -> None:
    """OpenAI features a beacon model cannot honour: refused with what to do instead."""
    _only(body, "n", (1,), "this server returns one choice per request; repeat the request for more")
    _only(body, "best_of", (1,), "one candidate per request")
    _only(body, "echo", (False,), "the prompt is not echoed")
    _only(body, "suffix", ("",), "no insertion mode")
    _only(body, "logprobs", (False, 0), "no log-probabilities are returned")
    _only(body, "top_logprobs", (0,), "no log-probabilities are returned")
    _only(body, "logit_bias", ({},), "no logit bias")
    for name in ("presence_penalty", "frequency_penalty"):
        _only(body, name, (0, 0.0), "use this server's repetition_penalty, e.g. 1.1, instead")
    if body.get("tools") not in (None, []):
        raise _bad(f"tools are not supported: {_NO_TOOLS}; remove 'tools'", param="tools")
    _only(body, "tool_choice", ("none",), _NO_TOOLS)
    if body.get("functions") not in (None, []):
        raise _bad(f"functions are not supported: {_NO_TOOLS}; remove 'functions'", param="functions")
    _only(body, "function_call", ("none",), _NO_TOOLS)
    _expect(body, "parallel_tool_calls", lambda v: isinstance(v, bool), "a boolean")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind != "text":
            raise _bad(
                f"response_format {json.dumps(fmt)[:80]} is not supported (no JSON mode or schema-constrained "
                'decoding); ask for JSON in the prompt and parse the reply, or send {"type": "text"}',
                param="response_format",
            )
    _only(body, "modalities", (["text"],), "this model reads and writes text only")
    if body.get("audio") is not None:
        raise _bad("audio output is not supported: this model writes text only; remove 'audio'", param="audio")


def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined); images, audio and files are a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of text parts, got {_type_name(content)}", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind is None or kind == "text":
            raise _bad(f'{where}[{j}] must be {{"type": "text", "text": "..."}}', param=f"{where}[{j}]")
        else:
            raise _bad(
                f"{where}[{j}] has type {kind!r}: this model reads text only (no images, audio or files); send the "
                "text itself, e.g. extracted from the file",
                param=f"{where}[{j}]",
            )
    return "".join(parts)


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as the tokenizer's chat template takes them (``developer`` becomes ``system``)."""
    if not isinstance(messages, list) or not messages:
        shown = "missing" if messages is None else f"{json.dumps(messages)[:80]} ({_type_name(messages)})"
        raise _bad(f"messages must be a non-empty list of {{role, content}} objects, got {shown}", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content, got {_type_name(m)}", param=where)
        unknown = sorted(set(m) - _MESSAGE_FIELDS)
        if unknown:
            raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))} in {where}", param=f"{where}.{unknown[0]}")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call") or m.get("tool_call_id"):
            raise _bad(f"{where}: tool messages and tool calls are not supported: {_NO_TOOLS}", param=where)
        if role not in _ROLES:
            raise _bad(f"{where}.role={json.dumps(role)} must be one of {', '.join(_ROLES)}", param=f"{where}.role")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise _bad(f"{where}.name must be a string", param=f"{where}.name")
        if "content" not in m or m["content"] is None:
            raise _bad(f"{where}.content is missing: send the message text", param=f"{where}.content")
        out.append({"role": _ROLES[role], "content": _content_text(m["content"], f"{where}.content")})
    return out


def _completion_prompt(prompt: Any) -> str | list[int]:
    """A completion prompt: a string or token ids, alone or in a one-element list (no batches)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt is empty: send the text to continue", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad(f"prompt holds {len(prompt)} prompts: send one prompt per request", param="prompt")
    raise _bad(
        f"prompt must be a non-empty string or a list of token ids, got {json.dumps(prompt)[:80]}", param="prompt"
    )


def _answer_options(body: Mapping[str, Any], req: GenerationRequest) -> None:
    """Length, sampling and stop options, validated with the engine's own rules (check_sampling_options)."""
    given = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if len(given) == 2 and given["max_tokens"] != given["max_completion_tokens"]:
        raise _bad(
            f"max_tokens={given['max_tokens']} and max_completion_tokens={given['max_completion_tokens']} "
            "differ: send one of them",
            param="max_completion_tokens",
        )
    for name, value in given.items():
        _engine_check(name, "max_new_tokens", value)
        req.max_tokens = value
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if body.get(name) is not None:
            _engine_check(name, name, body[name])
            setattr(req, name, body[name])
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise _bad(f"stop must be a string or a list of strings, got {json.dumps(stop)[:80]}", param="stop")
    try:
        req.stop = normalize_stop(stop)  # the engine's rule: non-empty strings
    except ValueError as exc:
        raise _bad(str(exc)[:200], param="stop") from None
    if len(req.stop) > _MAX_STOP:
        raise _bad(f"stop has {len(req.stop)} strings; at most {_MAX_STOP} are accepted", param="stop")
    seed = _expect(body, "seed", _is_int, "an integer")
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise _bad(f"seed={seed} is out of range: use an integer in [-2**63, 2**64 - 1]", param="seed")
    req.seed = seed


def _engine_check(name: str, engine_name: str, value: Any) -> None:
    try:
        check_sampling_options(**{engine_name: value})
    except ValueError as exc:
        raise _bad(str(exc).replace(f"{engine_name}=", f"{name}=", 1), param=name) from None


def parse_request(body: Mapping[str, Any], *, chat: bool) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body; raises :class:`ApiError` (400)."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    _check_fields(body, _CHAT_FIELDS if chat else _COMPLETION_FIELDS, endpoint)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad(f"model must be the served model's name (GET /v1/models), got {json.dumps(model)}", param="model")
    for name in ("user", "service_tier", "safety_identifier", "prompt_cache_key"):
        _expect(body, name, lambda v: isinstance(v, str), "a string")
    _expect(body, "metadata", lambda v: isinstance(v, dict), "an object")
    _expect(body, "store", lambda v: isinstance(v, bool), "a boolean")
    _check_unsupported(body)
    req = GenerationRequest(model=model)
    req.stream = bool(_expect(body, "stream", lambda v: isinstance(v, bool), "a boolean"))
    options = _expect(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))} in stream_options", param="stream_options")
    if options and not req.stream:
        raise _bad("stream_options is only for streamed answers: set stream=true or remove it", param="stream_options")
    req.include_usage = bool(_expect(options, "include_usage", lambda v: isinstance(v, bool), "a boolean"))
    _expect(options, "include_obfuscation", lambda v: isinstance(v, bool), "a boolean")
    _answer_options(body, req)
    if chat:
        req.messages = _chat_messages(body.get("messages"))
    else:
        req.prompt = _completion_prompt(body.get("prompt"))
    return req


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, read up to ``limit`` bytes (413 beyond, 400 if it is not a JSON object)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413,
        f"the request body exceeds this server's limit of {limit} bytes; send a shorter document or start the server "
        "with a larger --max-body-bytes",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(f"the request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(data)}")
    where = _text_that_is_not_unicode(data)
    if where is not None:
        raise _bad(f"{where} holds a lone surrogate (e.g. \\ud800), which is not Unicode text; send valid text",
                   param=where)  # fmt: skip
    return data


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_that_is_not_unicode(data: Any) -> str | None:
    """Where (``messages[0].content``) the first string or key that UTF-8 cannot encode is, or None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str) and not _encodable(value):
            return where or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if not _encodable(path):
                    return f"a field name in {where or 'the body'}"
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


# ---------------------------------------------------------------------------------------------------------- workers
_DONE = object()


class FairSlots:
    """At most ``n`` generations at once, handed out in arrival order (a plain semaphore wakes waiters in no
    particular order, so under load some requests wait far longer than others)."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._lock = threading.Lock()
        self._waiting: deque[threading.Event] = deque()

    def acquire(self, cancelled: Callable[[], bool], poll: float = 0.05) -> bool:
        """Wait for a slot in turn; False (and no slot taken) if ``cancelled()`` turns true while waiting."""
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiting.append(turn)
        while not turn.wait(poll):
            if cancelled():
                with self._lock:
                    if not turn.is_set():  # not handed a slot yet: leave the queue
                        self._waiting.remove(turn)
                        return False
                self.release()  # handed a slot just now: give it on
                return False
        return True

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the slot goes straight to the longest waiter
            else:
                self._free += 1


class _Job:
    """One generation in a worker thread, bridged to the event loop. ``cancel`` stops it within one window step
    (reading) or one token (generating); ``done`` is set when the thread has finished."""

    def __init__(
        self,
        engine: BeaconEngine,
        ids: list[int],
        boundary: int | None,
        options: dict[str, Any],
        slots: FairSlots,
        on_done: Callable[[_Job], None],
    ) -> None:
        self.engine, self.ids, self.boundary, self.options, self.slots = engine, ids, boundary, options, slots
        self.on_done = on_done
        self.cancel = threading.Event()
        self.done = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._items: deque[Any] = deque()
        self._wakeup = asyncio.Event()
        self._started = asyncio.Event()
        self._signalled = False

    def start(self) -> None:
        threading.Thread(target=self._work, name="beacon-serve-worker", daemon=True).start()

    def _work(self) -> None:
        try:
            if not self.slots.acquire(self.cancel.is_set):
                raise ReadCancelled("cancelled while waiting for a free worker")
            try:
                events = self.engine.stream(
                    self.ids, boundary=self.boundary, cancel=self.cancel, progress=self._progress, **self.options
                )
                for item in events:
                    self._post(item)
            finally:
                self.slots.release()
        except BaseException as exc:  # answered on the event loop
            self._post(exc)
        finally:
            self.on_done(self)  # no longer counted among the running jobs before its client can see the end
            self._post(_DONE)
            self.done.set()

    def _progress(self, n: int, cache: Any) -> None:
        """The read has begun (the prompt passed the engine's checks): a stream may send its headers."""
        if not self._signalled:
            self._signalled = True
            self._call(self._started.set)

    def _post(self, item: Any) -> None:
        self._call(self._push, item)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancel.set()

    def _push(self, item: Any) -> None:
        self._items.append(item)
        self._started.set()
        self._wakeup.set()

    async def first_signal(self, timeout: float) -> None:
        """Wait until the read has begun, an item or error came, or ``timeout``; raise the error if one came first."""
        with suppress(asyncio.TimeoutError):  # not the builtin TimeoutError before Python 3.11
            await asyncio.wait_for(self._started.wait(), timeout)
        if self._items and isinstance(self._items[0], BaseException):
            raise _engine_error(self._items.popleft())

    async def events(self) -> AsyncIterator[str | Completion]:
        """Text deltas, then the final :class:`Completion`; an engine error is raised as :class:`ApiError`."""
        while True:
            while not self._items:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._items.popleft()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise _engine_error(item)
            yield item


class _EventStream(StreamingResponse):
    """A server-sent-event response that cancels its generation however it ends (done, client gone, shutdown)."""

    def __init__(self, content: AsyncIterator[str], job: _Job) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------------------- tenants
def tenant_name(api_key: str | None) -> str:
    """The store folder of an API key: a hash of it (never the key itself), or ``public`` without keys."""
    if api_key is None:
        return PUBLIC_TENANT
    return "key-" + hashlib.sha256(b"beacon-llm-serve-key\0" + api_key.encode()).hexdigest()[:32]


class _Engines:
    """One engine per tenant over the same model, each with its own store folder; at most ``max_engines`` in memory
    (least recently used dropped: its disk store remains and a later request reuses it)."""

    def __init__(self, factory: Callable[[Path], BeaconEngine], store_dir: Path, max_engines: int) -> None:
        self.factory, self.store_dir, self.max_engines = factory, store_dir, max_engines
        self._engines: OrderedDict[str, BeaconEngine] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant: str) -> BeaconEngine:
        with self._lock:
            engine = self._engines.get(tenant)
            if engine is None:
                engine = self._engines[tenant] = self.factory(self.store_dir / tenant)
            self._engines.move_to_end(tenant)
            while len(self._engines) > self.max_engines:
                self._engines.popitem(last=False)
            return engine

    def __len__(self) -> int:
        return len(self._engines)


# ---------------------------------------------------------------------------------------------------------- responses
def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens`` are the prompt tokens taken from a condensed prefix."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
    }


def _finish_reason(completion: Completion) -> str:
    if completion.finish_reason not in _FINISH:  # cancelled: only reached when the client is gone or at shutdown
        raise ReadCancelled(f"{completion.finish_reason} after {len(completion.token_ids)} generated tokens")
    return _FINISH[completion.finish_reason]


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Shape:
    """The JSON of one endpoint's answers: full responses, stream chunks and the usage chunk."""

    def __init__(self, chat: bool, model: str, fingerprint: str, include_usage: bool) -> None:
        self.chat, self.model, self.fingerprint, self.include_usage = chat, model, fingerprint, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def full(self, completion: Completion) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(completion), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": completion.text, "refusal": None}
        else:
            choice["text"] = completion.text
        return {**self._head(False), "choices": [choice], "usage": usage_json(completion.usage)}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        data = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            data["usage"] = None
        return _sse(data)

    def usage_chunk(self, usage: Usage) -> str:
        return _sse({**self._head(True), "choices": [], "usage": usage_json(usage)})


# ---------------------------------------------------------------------------------------------------------- the app
class _Server:
    """The state behind the routes: model name, keys, engines, worker slots and the jobs in flight."""

    def __init__(
        self,
        factory: Callable[[Path], BeaconEngine],
        model_name: str,
        api_keys: Iterable[str],
        store_dir: Path,
        limits: ServeLimits,
    ) -> None:
        self.model_name, self.limits, self.store_dir = model_name, limits, store_dir
        self.key_digests = [_key_digest(k) for k in _checked_keys(api_keys)]
        self.engines = _Engines(factory, store_dir, limits.max_engines)
        self.slots = FairSlots(limits.max_concurrent)
        self.jobs: set[_Job] = set()
        self.admitting = 0  # requests reading their body or tokenising, not yet a job (bounded with the jobs)
        self._jobs_lock = threading.Lock()
        # the public engine serves without keys; with keys, a throwaway one (it never reads or writes its folder)
        probe = self.engines.get(PUBLIC_TENANT) if not self.key_digests else factory(store_dir / PUBLIC_TENANT)
        self.capacity = probe.capacity
        self.fingerprint = f"fp_{probe.identity[:12]}"

    # ------------------------------------------------------------------ auth
    async def authenticate(self, request: Request) -> str:
        """The caller's tenant (store folder); 401 when keys are configured and the request has no valid one."""
        if not self.key_digests:
            return PUBLIC_TENANT
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(
                401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key"
            )
        digest = _key_digest(key)
        if not any(hmac.compare_digest(digest, d) for d in self.key_digests):
            raise ApiError(401, "invalid API key: this server does not know it", code="invalid_api_key")
        return tenant_name(key)

    # ------------------------------------------------------------------ generating
    def _check_model(self, req: GenerationRequest) -> None:
        if req.model != self.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server serves {self.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def tokens(self, engine: BeaconEngine, req: GenerationRequest) -> tuple[list[int], int | None]:
        """The prompt's ids and, for a chat, where its last message starts (None otherwise)."""
        if req.messages is not None:
            try:
                ids, boundary = await asyncio.to_thread(engine.encode_chat, req.messages)
            except (ValueError, TypeError, TemplateError) as exc:  # e.g. a template that wants alternating roles
                raise _bad(f"the model's chat template refused these messages: {exc}", param="messages") from None
            return ids, boundary
        if isinstance(req.prompt, str):
            return await asyncio.to_thread(engine.encode, req.prompt), None
        vocab = int(engine.bm.model.config.vocab_size)
        bad = [t for t in req.prompt or [] if not 0 <= t < vocab]
        if bad:
            raise _bad(f"prompt token id {bad[0]} is outside this model's vocabulary [0, {vocab})", param="prompt")
        return list(req.prompt or []), None

    def answer_length(self, req: GenerationRequest, n_prompt: int) -> int:
        """The request's max_tokens, or the default lowered to what fits after the prompt (at least 1: a prompt
        beyond the capacity is then refused by the engine with its numbers)."""
        if req.max_tokens is not None:
            return req.max_tokens
        return max(1, min(self.limits.default_max_tokens, self.capacity - n_prompt))

    @contextmanager
    def admission(self) -> Iterator[None]:
        """A request from its first byte until its job starts (or it fails): refused at once (503 with Retry-After)
        when ``max_concurrent`` run and ``max_queued`` already wait or are on their way (reading their body,
        tokenising), so a flood of clients cannot pile up threads, bodies and prompts in memory."""
        bound = self.limits.max_concurrent + self.limits.max_queued
        with self._jobs_lock:
            if len(self.jobs) + self.admitting >= bound:
                raise ApiError(
                    503,
                    f"the server is busy: {len(self.jobs) + self.admitting} requests are running or waiting for a "
                    f"worker (max_concurrent {self.limits.max_concurrent} + max_queued {self.limits.max_queued}); "
                    "retry later",
                    code="server_busy",
                    kind="server_error",
                    retry_after=_BUSY_RETRY_S,
                )
            self.admitting += 1
        try:
            yield
        finally:
            with self._jobs_lock:
                self.admitting -= 1

    def start_job(self, engine: BeaconEngine, ids: list[int], boundary: int | None, options: dict[str, Any]) -> _Job:
        """Start a generation's worker thread (within :meth:`admission`, which counts it until it is a job)."""
        job = _Job(engine, ids, boundary, options, self.slots, self._forget)
        with self._jobs_lock:
            self.jobs.add(job)
        try:
            job.start()
        except BaseException:  # no worker thread (e.g. "can't start new thread"): never counted as running
            self._forget(job)
            raise
        return job

    def _forget(self, job: _Job) -> None:
        with self._jobs_lock:
            self.jobs.discard(job)

    async def generate(self, request: Request, tenant: str, chat: bool) -> Response:
        with self.admission():
            body = await read_json(request, self.limits.max_body_bytes)
            req = parse_request(body, chat=chat)
            self._check_model(req)
            engine = self.engines.get(tenant)
            ids, boundary = await self.tokens(engine, req)
            options = req.engine_options(self.answer_length(req, len(ids)))
            try:  # the engine's own refusals, before the request waits for a worker: a plain 400 at once
                engine.check_fits(len(ids), options["max_new_tokens"])
            except ValueError as exc:
                raise _engine_error(exc) from None
            if boundary is not None:  # a chat that fits: where its reusable prefix ends (it becomes a recent prompt)
                boundary = engine.chat_boundary(ids, boundary)
            job = self.start_job(engine, ids, boundary, options)
        shape = _Shape(chat, self.model_name, self.fingerprint, req.include_usage)
        if req.stream:
            try:
                await job.first_signal(_HEADER_WAIT_S)
            except BaseException:
                job.cancel.set()
                raise
            return _EventStream(self._sse_events(job, shape), job)
        completion = await self._collect(job, request)
        try:
            return JSONResponse(shape.full(completion))
        except ReadCancelled as exc:
            raise _engine_error(exc) from None

    @staticmethod
    async def _collect(job: _Job, request: Request) -> Completion:
        """The final completion of a non-streaming request; a client that disconnects cancels the generation."""
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        watcher.add_done_callback(lambda _: job.cancel.set())
        final = None
        try:
            async for item in job.events():
                if isinstance(item, Completion):
                    final = item
        finally:
            watcher.cancel()
            job.cancel.set()
        assert final is not None
        return final

    @staticmethod
    async def _sse_events(job: _Job, shape: _Shape) -> AsyncIterator[str]:
        """OpenAI's stream: a role chunk, text chunks, a finish chunk, the usage chunk if asked for, ``[DONE]``. An
        error after the headers went out is sent as an ``{"error": ...}`` event."""
        if shape.chat:
            yield shape.chunk("", role=True)
        try:
            async for item in job.events():
                if isinstance(item, str):
                    yield shape.chunk(item)
                else:
                    yield shape.chunk(None, finish=_finish_reason(item))
                    if shape.include_usage:
                        yield shape.usage_chunk(item.usage)
        except (ApiError, ReadCancelled) as exc:
            yield _sse(_engine_error(exc).body())
        yield "data: [DONE]\n\n"

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "beacon-llm",
            "max_model_len": self.capacity,
        }

    def cancel_all(self) -> list[_Job]:
        """Cancel every generation in flight: each ends its response properly (a stream with an error event and
        ``[DONE]``, a plain request with a 503) within one window step or one token."""
        with self._jobs_lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel.set()
        return jobs

    def cancel_after(self, seconds: float) -> threading.Timer:
        """Shutdown has begun: generations still running ``seconds`` from now are cancelled (unless the returned
        timer is cancelled first)."""
        timer = threading.Timer(seconds, self.cancel_all)
        timer.daemon = True
        timer.start()
        return timer

    async def shutdown(self) -> None:
        """Cancel what still runs and wait for the worker threads (stored books are always written whole)."""
        jobs = self.cancel_all()
        deadline = time.monotonic() + self.limits.shutdown_timeout
        for job in jobs:
            await asyncio.to_thread(job.done.wait, max(0.0, deadline - time.monotonic()))
        left = sum(not job.done.is_set() for job in jobs)
        if left:
            logger.warning(
                "%d generation(s) still running after %.0f s at shutdown", left, self.limits.shutdown_timeout
            )


def _checked_keys(keys: Iterable[str]) -> list[str]:
    out = []
    for key in keys:
        if not isinstance(key, str) or not key.strip() or any(c.isspace() for c in key):
            raise ValueError("an API key must be a non-empty string without spaces; check --api-key / --api-keys-file")
        if not (key.isascii() and key.isprintable()):
            raise ValueError(
                "an API key must be printable ASCII (HTTP clients cannot send other characters in a header); check "
                "--api-key / --api-keys-file"
            )
        out.append(key)
    return out


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def default_store_dir() -> Path:
    """``$BEACON_LLM_HOME/serve`` (default ``~/.cache/beacon-llm/serve``)."""
    from .embedded import home

    return home() / "serve"


def load_model(
    model: str | None = None,
    *,
    adapter: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    **beacon_overrides: Any,
) -> BeaconModel:
    """Load a model the way ``beacon-llm ask`` does: the embedded one by default, read with ``fit-N`` unless
    ``beacon_ratio_mix`` is given (:func:`beacon_llm.loading.inference_overrides`)."""
    from .loading import inference_overrides, load

    bm = load(model, adapter=adapter, dtype=dtype, device=device, **inference_overrides(beacon_overrides))
    if bm.tokenizer is None:
        raise ValueError(f"{model or DEFAULT_MODEL_NAME} has no tokenizer; the server needs one to read text")
    return bm


def create_app(
    model: BeaconModel | str | None = None,
    *,
    adapter: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    beacon_overrides: Mapping[str, Any] | None = None,
    engine_factory: Callable[[Path], BeaconEngine] | None = None,
    model_name: str | None = None,
    api_keys: Iterable[str] = (),
    store_dir: str | os.PathLike[str] | None = None,
    limits: ServeLimits | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over one model.

    Args:
        model: a loaded :class:`BeaconModel`, or a model name / folder / hub id loaded with :func:`load_model`
            (None: the embedded model); ignored when ``engine_factory`` is given.
        engine_factory: builds the engine of one tenant from its store folder (default: a :class:`BeaconEngine`
            over ``model`` with ``limits.max_prefixes`` / ``min_prefix``); every engine must share one model.
        model_name: the id clients send as ``model`` (default: the model argument, or the embedded model's name).
        api_keys: keys accepted as ``Authorization: Bearer KEY``; none = no authentication.
        store_dir: where condensed documents are kept, one folder per tenant (default: :func:`default_store_dir`).
        limits: :class:`ServeLimits`.
    """
    limits = limits or ServeLimits()
    if engine_factory is None:
        overrides = dict(beacon_overrides or {})
        bm = (
            model
            if isinstance(model, BeaconModel)
            else load_model(model, adapter=adapter, dtype=dtype, device=device, **overrides)
        )

        def engine_factory(folder: Path) -> BeaconEngine:
            return BeaconEngine(bm, max_prefixes=limits.max_prefixes, cache_dir=folder, min_prefix=limits.min_prefix)

    if model_name is None:
        model_name = model if isinstance(model, str) else DEFAULT_MODEL_NAME if model is None else "beacon"
    server = _Server(engine_factory, model_name, api_keys, Path(store_dir or default_store_dir()), limits)
    return _build_app(server)


class _InternalErrors:
    """An unexpected exception as a 500 error object, sent from inside the application: Starlette's outermost error
    handler would send it too, but re-raises it afterwards, and the server then closes the client's connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:  # the client left (e.g. while sending a long document): nobody to answer
            logger.info("%s %s: the client disconnected", scope.get("method"), scope.get("path"))
        except Exception as exc:
            logger.error("request %s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # the answer has begun: nothing else can be sent on it
                raise
            answer = ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()
            await answer(scope, receive, send)


def _build_app(server: _Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await server.shutdown()

    app = FastAPI(title="beacon-llm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    auth = Depends(server.authenticate)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        hint = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, hint.get(exc.status_code, str(exc.detail)), code=code).response()

    app.add_middleware(_InternalErrors)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_name}

    @app.get("/v1/models")
    async def models(tenant: str = auth) -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, tenant: str = auth) -> dict[str, Any]:
        if model_id != server.model_name:
            raise ApiError(
                404,
                f"model {model_id!r} is not served here; this server serves {server.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, tenant: str = auth) -> Response:
        return await server.generate(request, tenant, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, tenant: str = auth) -> Response:
        return await server.generate(request, tenant, chat=False)

    return app


# ---------------------------------------------------------------------------------------------------------- running
class GracefulServer(uvicorn.Server):
    """uvicorn's server for an app of :func:`create_app`. At SIGINT / SIGTERM (or :meth:`stop`) it stops accepting
    connections, lets the generations in flight run for the app's ``shutdown_timeout``, then cancels them, so every
    response still ends properly before uvicorn's own deadline (5 s later) would cut it."""

    def __init__(self, app: FastAPI, **config: Any) -> None:
        self.beacon: _Server = app.state.server
        grace = math.ceil(self.beacon.limits.shutdown_timeout) + 5
        super().__init__(uvicorn.Config(app, **{"timeout_graceful_shutdown": grace, **config}))
        self._drain_lock = threading.RLock()  # also taken by handle_exit, a signal handler on the main thread
        self._cancel_timer: threading.Timer | None = None
        self._over = False  # this run has ended: nothing left to drain

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        with self._drain_lock:
            self._over = False
        try:
            await super().serve(sockets=sockets)
        finally:
            # this run is over (its generations were cancelled and waited for): a pending cancel must not hit the
            # requests of a later run of the same app
            with self._drain_lock:
                self._over = True
                timer, self._cancel_timer = self._cancel_timer, None
            if timer is not None:
                timer.cancel()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._drain()

    def stop(self) -> None:
        self.should_exit = True
        self._drain()

    def _drain(self) -> None:
        with self._drain_lock:
            if self._cancel_timer is None and not self._over:
                self._cancel_timer = self.beacon.cancel_after(self.beacon.limits.shutdown_timeout)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **config: Any) -> Iterator[str]:
    """Run an app of :func:`create_app` with uvicorn in a background thread (tests, notebooks); yields the base URL,
    e.g. ``http://127.0.0.1:54321``; the server shuts down gracefully (:class:`GracefulServer`) when the block ends."""
    sock = _listen(host, port)
    server = GracefulServer(app, **{"log_level": "warning", **config})
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="beacon-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread ended before it started; see the log above")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.stop()
        thread.join(60)
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def read_api_keys(keys: Iterable[str], keys_file: str | None) -> list[str]:
    """Keys from ``--api-key`` and ``--api-keys-file`` (one per line; blank lines and ``#`` comments skipped)."""
    out = list(keys)
    if keys_file:
        try:
            lines = Path(keys_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read --api-keys-file {keys_file}: {exc}") from exc
        out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return _checked_keys(out)


def run(args: argparse.Namespace) -> int:
    """``beacon-llm serve``: load the model, print one startup line, serve until SIGTERM (exit 0) or SIGINT.

    Raises ``ValueError`` / ``OSError`` for bad options, a model that cannot be loaded or an address in use."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    keys = read_api_keys(args.api_key or [], args.api_keys_file)
    limits = _limits(args)
    sock = _listen(args.host, args.port)  # before loading: an address in use fails at once
    try:
        bm = load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device, **_overrides(args))
    except (ValueError, OSError, RuntimeError) as exc:
        sock.close()
        raise ValueError(f"cannot load the model: {exc}") from exc
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    store = Path(args.store_dir) if args.store_dir else default_store_dir()
    app = create_app(bm, model_name=name, api_keys=keys, store_dir=store, limits=limits)
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without API keys: anyone who can reach the port can use it", args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    where = f"http://{host}:{sock.getsockname()[1]}/v1"
    print(  # noqa: T201 - the CLI's startup line
        f"beacon-llm serve: model {name!r} (capacity {app.state.server.capacity} tokens) on {where}, documents "
        f"stored in {store}, {len(keys) or 'no'} API key(s)",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _stopped)  # uvicorn re-raises the signal after its graceful shutdown: exit 0
    GracefulServer(app, log_level="info" if args.verbose else "warning").run(sockets=[sock])
    return 0


def _stopped(signum: int, frame: Any) -> None:
    logger.info("stopped by signal %d", signum)


_LIMIT_FLAGS = {
    "max_body_bytes": "max_body_bytes",
    "default_max_tokens": "max_tokens",
    "max_concurrent": "max_concurrent",
    "max_queued": "max_queued",
    "max_engines": "max_engines",
    "max_prefixes": "max_prefixes",
    "shutdown_timeout": "shutdown_timeout",
}


def _limits(args: argparse.Namespace) -> ServeLimits:
    """The limits given on the command line; a bad one is a ValueError naming its flag."""
    given = {field: getattr(args, flag) for field, flag in _LIMIT_FLAGS.items() if getattr(args, flag) is not None}
    try:
        return ServeLimits(**given)
    except ValueError as exc:
        message = str(exc)
        for field, flag in _LIMIT_FLAGS.items():
            message = message.replace(f"{field}=", f"--{flag.replace('_', '-')}=")
        raise ValueError(message) from None


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``beacon_*`` overrides from --ratio, --ratio-mix and --window, as ``beacon-llm ask`` takes them."""
    overrides: dict[str, Any] = {}
    if args.ratio:
        overrides["beacon_ratio"] = list(args.ratio)
    if args.ratio_mix:
        overrides["beacon_ratio_mix"] = args.ratio_mix
    if args.window:
        overrides["beacon_window"] = args.window
    return overrides


__all__ = [
    "ApiError",
    "GracefulServer",
    "ServeLimits",
    "create_app",
    "load_model",
    "parse_request",
    "run",
    "serve_in_thread",
]
