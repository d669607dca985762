"""Ingest once, ask many: prompt reading with reusable condensed prefixes, text streaming, usage accounting.

:class:`BeaconEngine` is what applications and the LangChain / LlamaIndex integrations use. Each call works on its
own fork of a cache, so concurrent calls on one model never share state. After reading a prompt the engine keeps
condensed checkpoints (in memory, optionally on disk) keyed by a hash of the exact token prefix, the model and the
beacon config; a later prompt that starts with the same tokens (a second question about the same book) reads only
what follows the longest stored prefix.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import prompts
from .aio import iterate_in_thread
from .cache import BeaconCache
from .generation import Decoding, TokenSampler, _eos_ids, check_sampling_options, normalize_stop
from .model import BeaconModel
from .prefix_store import MIN_SHARED_PREFIX, PrefixStore, prefix_hash
from .schedule import FitPlan, adapt_ratio, fit_plan, planned_read_length
from .serialization import load_cache, save_cache

logger = logging.getLogger(__name__)


@dataclass
class Usage:
    input_tokens: int = 0  # prompt tokens
    cache_read_tokens: int = 0  # of which taken from a condensed prefix instead of being read
    read_tokens: int = 0  # prompt tokens actually run through the model by this call
    output_tokens: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    usage: Usage = field(default_factory=Usage)


class ReadCancelled(RuntimeError):
    """A call stopped by its ``cancel`` event while reading its prompt (within one window step of the request).

    Nothing half-read is kept: the engine stores only prefixes read to their end, so the same call later gives the
    same answer as on a fresh engine."""


def check_timeout(timeout: Any) -> None:
    """A call's time limit in seconds: a number > 0, or None for no limit."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout={timeout!r} must be a number of seconds > 0, or None for no limit")


@dataclass(frozen=True)
class _Guard:
    """When a call must stop: its ``cancel`` event is set, or its ``deadline`` (``time.monotonic()``) has passed."""

    cancel: threading.Event | None = None
    timeout: float | None = None
    deadline: float | None = None

    @classmethod
    def start(cls, cancel: threading.Event | None, timeout: float | None, started: float | None) -> _Guard:
        check_timeout(timeout)
        if timeout is None:
            return cls(cancel)
        return cls(cancel, timeout, (time.monotonic() if started is None else started) + timeout)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def check_deadline(self, doing: str) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeoutError(
                f"the call ran past its timeout={self.timeout} s while {doing}; raise timeout= (reading a long "
                "document on a CPU takes a while) or set timeout=None for no limit"
            )

    def check_reading(self, done: int, total: int) -> None:
        """Raise :class:`ReadCancelled` or ``TimeoutError`` if the read of a ``total``-token prompt must stop."""
        if self.cancelled():
            raise ReadCancelled(f"cancelled while reading the prompt ({done} of {total} tokens read)")
        self.check_deadline(f"reading the prompt ({done} of {total} tokens read)")


def _replan_source(stored: BeaconCache, plan: FitPlan) -> BeaconCache | None:
    """Where a read under the fit-N ``plan`` can go on from a stored prefix read under a smaller plan (a conversation
    grown past its room): the stored state itself, or the state its stream kept before its last condensed window
    (:meth:`BeaconCache.keep_replan_base`, shared: fork it before reading on), when it holds only windows both plans
    condense; else None."""
    if stored.can_replan(plan):
        return stored
    base = stored.replan_base
    return base if base is not None and base.can_replan(plan) else None


class BeaconEngine:
    """A beacon model plus a store of condensed prefixes.

    Args:
        bm: the beacon model (with a tokenizer).
        max_prefixes: condensed prefixes kept in memory (least recently used are dropped).
        cache_dir: also persist condensed prefixes there (safetensors + JSON) and reuse them across processes.
        min_prefix: prompts shorter than this are not checkpointed (no point for short chats).
    """

    def __init__(
        self,
        bm: BeaconModel,
        *,
        max_prefixes: int = 4,
        cache_dir: str | os.PathLike[str] | None = None,
        min_prefix: int = 0,
    ) -> None:
        if bm.tokenizer is None:
            raise ValueError("BeaconEngine needs a model loaded with its tokenizer")
        self.bm = bm
        self.tokenizer = bm.tokenizer
        self.store = PrefixStore(
            bm, max_prefixes=max_prefixes, cache_dir=Path(cache_dir) if cache_dir is not None else None,
            min_prefix=min_prefix,
        )  # fmt: skip

    @property
    def cache_dir(self) -> Path | None:
        return self.store.cache_dir

    @property
    def max_prefixes(self) -> int:
        return self.store.max_prefixes

    # ------------------------------------------------------------------ tokens
    @property
    def capacity(self) -> int:
        """Most tokens one context may hold with this model and beacon config."""
        return self.bm.capacity

    @property
    def identity(self) -> str:
        """A hash of the base model and the beacon weights and config: the key of stored prefixes."""
        return self.store.identity()

    def count_tokens(self, text: str) -> int:
        return len(prompts.encode(self.tokenizer, text))

    def encode(self, text: str) -> list[int]:
        return prompts.encode(self.tokenizer, text)

    def encode_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> tuple[list[int], int]:
        """Token ids of a chat (the tokenizer's template) and the index where the last message starts."""
        return prompts.encode_chat(self.tokenizer, messages, add_generation_prompt)

    def chat_boundary(self, ids: Sequence[int], last_message_start: int) -> int:
        """Where the reusable prefix of a chat prompt ends (pass it as ``boundary``): where its last message starts
        (:meth:`encode_chat`; a follow-up shares everything before it), or, when a recent prompt shares more of the
        last message than comes before it (a chain that puts the book in the last message: a short system prompt,
        then "{book} Question: {q}"), the shortest such shared beginning: the book and what every question repeats,
        not the words two questions happen to start with, so later questions find the same prefix. Where the message
        start is unknown (0), the longest shared beginning, as a read without a boundary guesses it. ``ids`` becomes
        a recent prompt."""
        lengths = [n for n in self.store.shared_lengths(list(ids)) if n >= MIN_SHARED_PREFIX]
        if not last_message_start:
            return max(lengths, default=0)
        inside = [n for n in lengths if 2 * last_message_start < n < len(ids)]
        return min(inside, default=last_message_start)

    def document_prompt(
        self, document: str, question: str, *, system: str | None = None,
        instruction: str = prompts.DEFAULT_INSTRUCTION,
    ) -> tuple[list[int], int]:  # fmt: skip
        """Ids of a one-turn chat "<document> + question" and the index where the question starts
        (:func:`beacon_llm.prompts.document_prompt`)."""
        return prompts.document_prompt(self.tokenizer, document, question, system=system, instruction=instruction)

    def document_prompt_text(
        self, document: str, question: str, *, system: str | None = None,
        instruction: str = prompts.DEFAULT_INSTRUCTION,
    ) -> tuple[str, str]:  # fmt: skip
        """The two halves of :meth:`document_prompt` as text: (everything up to the question, the rest)."""
        return prompts.document_prompt_text(self.tokenizer, document, question, system=system, instruction=instruction)

    # ------------------------------------------------------------------ prefixes
    def stored_prefixes(self) -> list[tuple[int, BeaconCache]]:
        """(prefix length, condensed cache) of the prefixes kept in memory, least recently used first. Each cache is a
        fork: reading more into it leaves the stored prefix as it was."""
        return [(e.n_tokens, e.cache.fork()) for e in self.store.stored()]

    def clear(self) -> None:
        """Forget the prefixes kept in memory (files in ``cache_dir`` stay)."""
        self.store.clear()

    # ------------------------------------------------------------------ reading
    def read(
        self,
        ids: Sequence[int],
        *,
        boundary: int | None = None,
        answer_reserve: int = 0,
        progress: Callable[[int, BeaconCache], None] | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> tuple[BeaconCache, Usage]:
        """Condense ``ids`` into a fresh cache, reusing the longest stored prefix.

        Checkpoints are stored at ``boundary`` (e.g. where the question starts; by default the longest prefix
        shared with a recent prompt) and at the last window boundary inside the prompt, so follow-up prompts with the
        same beginning skip it. ``answer_reserve`` tokens must fit after the prompt: the read is planned for both,
        and refused before anything is read when they do not fit.

        ``cancel`` (set from another thread) and ``timeout`` (seconds) are checked after every window step (and
        ``progress``): the read then stops with :class:`ReadCancelled` or ``TimeoutError``. Only prefixes read to
        their end are ever stored, so an interrupted read (or one whose ``progress`` raises) leaves the store sound.
        """
        return self._read(ids, boundary, answer_reserve, progress, _Guard.start(cancel, timeout, None))

    def _read(
        self,
        ids: Sequence[int],
        boundary: int | None,
        answer_reserve: int,
        progress: Callable[[int, BeaconCache], None] | None,
        guard: _Guard,
    ) -> tuple[BeaconCache, Usage]:
        ids = self._token_ids(ids)
        if isinstance(answer_reserve, bool) or not isinstance(answer_reserve, (int, np.integer)) or answer_reserve < 0:
            raise ValueError(f"answer_reserve={answer_reserve!r} must be an int >= 0 (tokens kept free for the answer)")
        answer_reserve = int(answer_reserve)
        self.check_fits(len(ids), answer_reserve)
        if boundary is None:
            boundary = self.store.shared_prefix(ids)
        elif isinstance(boundary, bool) or not isinstance(boundary, (int, np.integer)) or not 0 <= boundary <= len(ids):
            raise ValueError(
                f"boundary={boundary!r} must be an index into the prompt's {len(ids)} tokens (0 to {len(ids)}): "
                "where its reusable beginning (a document) ends, or None to guess it"
            )
        else:
            boundary = int(boundary)
        cfg, positions = self.bm.config, self.bm.max_positions
        needed = len(ids) + answer_reserve
        planned = planned_read_length(cfg, positions, len(ids), answer_reserve, boundary)
        fresh = fit_plan(cfg, planned, positions) if cfg.is_fit else None
        outgrown: list[tuple[int, int]] = []  # (tokens, condensed windows) of stored prefixes whose plan is too small

        def usable(stored: BeaconCache) -> int | None:
            """Where this read starts from a stored prefix, or None when it cannot serve it. fit-N: at its end if its
            plan holds the prompt and condenses no more than needed; a conversation grown past its plan's room goes
            on under the fresh plan from where only windows both plans condense were read (the stored state, or the
            one its stream kept before its last condensed window). adapt-N: at its end if it was read at the ratio a
            fresh read fixes (so the answer is a fresh read's); other modes: if its ratio (fixed at its first read)
            holds the prompt and the answer."""
            plan, end = stored.state.fit_plan, stored.state.n_seen
            if fresh is not None and plan is not None:
                if plan.entries(needed) > positions:  # a conversation grown past the room its plan kept
                    source = _replan_source(stored, fresh)
                    if source is not None:
                        return source.state.n_seen
                    outgrown.append((end, plan.condensed_windows))
                    return None
                return end if plan.condensed_windows <= fresh.condensed_windows else None
            if (
                cfg.is_adaptive
                and len(cfg.ratios) > 1
                and stored.state.fixed_ratio != adapt_ratio(cfg, positions, planned)
            ):
                return None
            return end if cfg.is_fit or self.bm.can_hold(stored, max(planned, needed)) else None

        release = self.store.claim(ids, boundary, lambda: guard.check_reading(0, len(ids)))
        try:
            return self._read_claimed(ids, boundary, planned, needed, fresh, usable, progress, guard, outgrown)
        finally:
            if release is not None:
                release()

    def check_fits(self, n_prompt: int, answer_reserve: int) -> None:
        """Refuse (``ValueError`` with the numbers) a prompt of ``n_prompt`` tokens that is empty or, with
        ``answer_reserve`` tokens of answer, beyond :attr:`capacity`: the check every read makes first, which a
        server also makes before a request waits for a worker."""
        if not n_prompt:
            raise ValueError("the prompt is empty")
        needed = n_prompt + answer_reserve
        if needed > self.capacity:
            cfg = self.bm.config
            raise ValueError(
                f"the prompt has {n_prompt} tokens and the answer may take {answer_reserve} more: {needed} tokens, "
                f"more than this model's capacity of {self.capacity} tokens (window {cfg.window}, ratios "
                f"{list(cfg.ratios)}, {self.bm.max_positions} positions); shorten the prompt, lower the answer "
                "length or use larger compression ratios"
            )

    def _token_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """The prompt's token ids as Python ints: a sequence of ints or an integer tensor of shape (L,) or (1, L)."""
        if isinstance(ids, torch.Tensor):
            return self.bm._as_ids(ids).tolist()
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"the prompt must be token ids, not text ({ids[:20]!r}); encode it with engine.encode()")
        ids = list(ids)
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))), None)
        if bad is not None:
            raise ValueError(
                f"the prompt holds {bad!r} ({type(bad).__name__}), not a token id; pass a list of ints "
                "(engine.encode() makes one)"
            )
        return [int(i) for i in ids]

    def _read_claimed(
        self,
        ids: list[int],
        boundary: int | None,
        planned: int,
        needed: int,
        fresh: FitPlan | None,
        usable: Callable[[BeaconCache], int | None],
        progress: Callable[[int, BeaconCache], None] | None,
        guard: _Guard,
        outgrown: list[tuple[int, int]],
    ) -> tuple[BeaconCache, Usage]:
        cfg = self.bm.config
        cache, start = self.store.lookup(ids, usable)
        if cache is None:
            cache = self.bm.new_cache()
        elif cfg.is_fit:
            assert fresh is not None and cache.state.fit_plan is not None
            old_plan = cache.state.fit_plan
            if old_plan.entries(needed) > self.bm.max_positions:
                # grown past its plan's room: go on under the fresh plan from where only windows both plans condense
                # were read, as a fresh read does
                outgrown.append((start, old_plan.condensed_windows))
                source = _replan_source(cache, fresh)
                assert source is not None
                cache = cache if source is cache else source.fork()  # the looked-up cache is this call's own fork
                start = cache.state.n_seen
                cache.replan(fresh)
            planned = needed  # the stored plan is kept: only the prompt and its answer must fit it
        longest = max(outgrown, default=(0, 0))
        if longest[0] > start and fresh is not None:  # say why a prompt read before is read again
            logger.warning(
                "this prompt outgrew the room its condensed beginning (%d tokens, %d windows condensed) kept for "
                "follow-ups: reading its %d tokens from token %d again under a plan that condenses %d windows. A "
                "larger N in fit-N keeps more room (fewer re-reads), at the cost of condensing more of the text",
                longest[0],
                longest[1],
                len(ids) - start,
                start,
                fresh.condensed_windows,
            )
        usage = Usage(input_tokens=len(ids), cache_read_tokens=start)
        marks = set()
        if boundary is not None and start < boundary < len(ids):
            marks.add(boundary)
        window = cfg.window
        if cfg.stride == window and not cfg.is_fit:  # windows close every `window` raw tokens
            last_full = start + ((len(ids) - 1 - start + cache.raw_in_window) // window) * window - cache.raw_in_window
            if start < last_full < len(ids):
                marks.add(last_full)
        plan = cache.state.fit_plan or fresh
        before_last = None
        if plan is not None and plan.condensed_windows > 1:
            # fit-N: the state before the last condensed window, from which a read grown past this plan's room goes
            # on under its larger plan instead of from the start (BeaconCache.keep_replan_base)
            before_last = (plan.condensed_windows - 1) * window
            if start < before_last < len(ids):
                marks.add(before_last)
        if progress is not None and start:
            progress(start, cache)  # tokens taken from a condensed prefix
        done = start

        def step(n_raw: int, stepped: BeaconCache) -> None:
            """After every window step: the caller's progress, then stop if cancelled or out of time."""
            nonlocal done
            done += n_raw
            if progress is not None:
                progress(n_raw, stepped)
            guard.check_reading(done, len(ids))

        guard.check_reading(done, len(ids))
        pos = start
        with torch.no_grad():
            for mark in sorted(marks) + [len(ids)]:
                if mark <= pos:
                    continue
                # an exception in `step` restores `cache` to its state before this forward; it is this call's own
                self.bm.forward(
                    ids[pos:mark], cache, return_token_logprobs=False, progress=step, planned_length=planned
                )
                usage.read_tokens += mark - pos
                pos = mark
                if mark == before_last:
                    cache.keep_replan_base()
                if mark != len(ids) and (mark != before_last or mark == boundary):
                    # only the caller's boundary (a document's end) is worth a disk copy
                    self.store.remember(ids[:mark], cache, persist=mark == boundary, checkpoint=mark != boundary)
            if pos == start and cache.last_logits is None:  # exact hit on a prefix without logits
                raise RuntimeError("internal error: reused prefix carries no logits")
        return cache, usage

    def export_prefix(self, ids: Sequence[int], path: str | os.PathLike[str]) -> None:
        """Condense ``ids`` (reusing stored prefixes) and write the result to ``path`` (safetensors + JSON)."""
        ids = self._token_ids(ids)
        cache, _ = self.read(ids, boundary=len(ids))
        save_cache(cache, str(path), extra={"n_tokens": len(ids), "digest": prefix_hash(ids), "model": self.identity})

    def import_prefix(self, path: str | os.PathLike[str]) -> int:
        """Load a prefix written by :meth:`export_prefix`; later prompts starting with it skip reading it.

        Raises ``ValueError`` for a corrupt file or one made with another model or beacon config.
        """
        if not self.max_prefixes:
            raise ValueError("this engine keeps no prefixes in memory (max_prefixes=0); make it with max_prefixes >= 1 "
                             "to import one")  # fmt: skip
        cache, extra = load_cache(str(path), self.bm)
        if extra.get("model") not in (None, self.identity):
            raise ValueError(
                f"{path} was condensed by another model or beacon weights ({extra.get('model')}), "
                f"not this one ({self.identity})"
            )
        if "digest" not in extra or "n_tokens" not in extra:
            raise ValueError(f"{path} carries no prefix key; write it with export_prefix")
        n_tokens = int(extra["n_tokens"])
        self.store.add(n_tokens, str(extra["digest"]), cache)
        return n_tokens

    # ------------------------------------------------------------------ generating
    def stream(
        self,
        ids: Sequence[int],
        *,
        boundary: int | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, BeaconCache], None] | None = None,
        timeout: float | None = None,
        started: float | None = None,
    ) -> Iterator[str | Completion]:
        """Yield text deltas as they are decided, then the final :class:`Completion` (last item).

        Text that could be the start of a stop string is held back until it is known not to be one; the final
        text is cut before the first stop string.

        ``cancel`` (a ``threading.Event`` set from elsewhere) stops the call within one window step while reading
        (:class:`ReadCancelled` is raised) and within one token while generating (the completion then ends with
        finish reason "cancelled"). ``timeout`` limits the whole call (reading and generating) to that many seconds
        from ``started`` (a ``time.monotonic()`` value; default: now), checked as often: ``TimeoutError`` is raised.
        """
        check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        guard = _Guard.start(cancel, timeout, started)
        stops = normalize_stop(stop)
        cache, usage = self._read(ids, boundary, max_new_tokens, progress, guard)
        sampler = TokenSampler(
            do_sample=temperature > 0,
            temperature=temperature or 1.0,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        )

        def stop_now() -> bool:
            guard.check_deadline(f"generating the answer ({len(decoding.tokens)} tokens generated)")
            return guard.cancelled()

        # the repetition penalty looks at the answer only: penalising every word of a whole book would be absurd
        decoding = Decoding(self.bm, cache, cache.last_logits, sampler, max_new_tokens, eos=_eos_ids(self.bm, None),
                            stops=stops, tokenizer=self.tokenizer, stream_text=True, stop_now=stop_now)  # fmt: skip
        yield from decoding
        answer = decoding.tokens[:-1] if decoding.finish == "eos" else decoding.tokens
        usage.output_tokens = len(decoding.tokens)
        text = decoding.text or ""
        yield Completion(text=text, token_ids=answer, finish_reason=decoding.finish, usage=usage)

    async def astream(self, ids: Sequence[int], **kwargs: Any) -> AsyncIterator[str | Completion]:
        """:meth:`stream` for asyncio: reading and generating run in a worker thread, never on the event loop.
        Leaving the loop early (or cancelling the task) stops the reading within one window step and the generation
        at the next token, so it takes no ``cancel`` event of its own."""
        if "cancel" in kwargs:
            raise TypeError(
                "astream takes no cancel event: cancel its task or leave the async for loop to stop it "
                "(stream(..., cancel=event) in a thread takes one)"
            )

        def start(cancel: threading.Event) -> Iterator[str | Completion]:
            return self.stream(ids, cancel=cancel, **kwargs)

        async for item in iterate_in_thread(start, "beacon-generate"):
            yield item

    def complete(self, ids: Sequence[int], **kwargs: Any) -> Completion:
        """Like :meth:`stream`, returning only the final :class:`Completion`."""
        final = None
        for item in self.stream(ids, **kwargs):
            final = item
        assert isinstance(final, Completion)
        return final
