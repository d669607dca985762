"""Token-by-token generation from a condensed context (docs/design.md §8).

Each generated token is fed through the same streaming memory as the context (one 1-token step, or a
[token, beacon] pair when interleaving), exactly like the official ``generate``. The last generated token is
not fed (as in the official code); the cache keeps it as *pending* and feeds it first on the next call, so a
conversation continues seamlessly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._compat import logits_processors

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
MIN_SCALE = 1e-5  # the smallest temperature / repetition penalty: logits divided by less can overflow float32

if TYPE_CHECKING:
    from .cache import BeaconCache
    from .model import BeaconModel


@dataclass
class GenerateOutput:
    """``sequences`` (1, L + N) prompt + new ids; ``new_tokens`` the N new ids; ``text`` decoded new text (cut
    before a stop string) when a tokenizer is known; ``finish_reason`` one of "eos", "stop", "length"."""

    sequences: torch.Tensor
    new_tokens: list[int]
    finish_reason: str
    cache: BeaconCache
    text: str | None = None


def check_sampling_options(
    *,
    max_new_tokens: Any = 1,
    temperature: Any = 0.0,
    top_p: Any = None,
    top_k: Any = None,
    repetition_penalty: Any = None,
    seed: Any = None,
) -> None:
    """The one validation of generation options: constructors (LangChain, LlamaIndex, CLI) and every call check
    through here, so a value refused at construction is refused per call too."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (temperature == 0 or MIN_SCALE <= temperature < math.inf)
    ):
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy) and, if not 0, finite and "
                         f">= {MIN_SCALE} (smaller ones overflow the scaled logits; use 0 for greedy)")  # fmt: skip
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1], or None for no nucleus filtering")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive int, or None for no top-k filtering")
    if repetition_penalty is not None and (
        isinstance(repetition_penalty, bool)
        or not isinstance(repetition_penalty, (int, float))
        or not MIN_SCALE <= repetition_penalty < math.inf
    ):
        raise ValueError(
            f"repetition_penalty={repetition_penalty!r} must be > 0 (1.0 = none), finite and >= {MIN_SCALE}, or None"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not _SEED_MIN <= seed <= _SEED_MAX):
        raise ValueError(f"seed={seed!r} must be an int in [-2**63, 2**64 - 1] (torch's seed range), or None")


def normalize_stop(stop: str | Sequence[str] | None) -> list[str]:
    """Stop strings as a list, checked before anything is read: one string is one stop string (as in LangChain and
    the OpenAI API, never split into characters); every entry must be a non-empty ``str``."""
    if stop is None:
        return []
    if not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"stop={stop!r} must be a str or a list of str, or None")
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str, got {s!r} in stop={stop!r}")
    return stops


def special_stop_ids(tokenizer: Any, stops: Sequence[str]) -> dict[int, str]:
    """Stop strings that are exactly one special token (e.g. ``"<|im_start|>"``), by token id. The answer text is
    decoded without special tokens, so such a stop is matched on its token instead of in the text.

    A transformers tokenizer is only read (a token lookup and decoding): encoding would set a fast tokenizer's shared
    ``split_special_tokens`` switch, and so change how a prompt encoded at the same time in another thread (a server's
    next request) reads its special tokens. Other tokenizers (``encode`` / ``decode`` only) encode the stop."""
    lookup = getattr(tokenizer, "convert_tokens_to_ids", None)
    found = {}
    for s in stops:
        if lookup is not None:
            token = lookup(s)  # None, or the unknown token's id, when s is not one token
            ids = [token] if isinstance(token, int) and not isinstance(token, bool) else []
        else:
            ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids) == s and not tokenizer.decode(ids, skip_special_tokens=True):
            found[int(ids[0])] = s
    return found


class TokenSampler:
    """Greedy or sampled choice of the next token with transformers' logits processors."""

    def __init__(
        self,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.do_sample = do_sample
        self.generator = generator
        processors = logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty)
        self.needs_history = repetition_penalty not in (None, 1.0)
        # the repetition penalty (first, as in transformers) looks at the history; the warpers ignore their input ids
        self.penalty = processors[0] if self.needs_history else None
        self.processors = processors[1:] if self.needs_history else processors

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        scores = logits.float()[None]  # (1, V)
        if self.penalty is not None and history:  # an empty history: nothing to penalise yet
            scores = self.penalty(torch.tensor([history], device=scores.device), scores)
        if self.processors:
            context = torch.tensor([history[-1:] or [0]], device=scores.device)
            for proc in self.processors:
                scores = proc(context, scores)
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs.cpu(), 1, generator=self.generator)[0, 0])
        return int(scores.argmax(-1)[0])


def iter_tokens(
    bm: BeaconModel,
    cache: BeaconCache,
    logits: torch.Tensor,
    history: list[int],
    sampler: TokenSampler,
    max_new_tokens: int,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` tokens, feeding each one (but the last) back through ``cache``.

    The consumer may stop early; the last yielded token is left *pending* in the cache either way. A token already
    fed is never left pending (the sampler may raise after it was fed, e.g. on NaN probabilities or an interrupt):
    it would be read twice by the next call.
    """
    produced: list[int] = []
    unfed: int | None = None  # the last yielded token, until it is fed
    try:
        for step in range(max_new_tokens):
            token = sampler(logits, history + produced)
            produced.append(token)
            unfed = token
            yield token
            if step + 1 < max_new_tokens:
                logits = bm.forward([token], cache, return_token_logprobs=False).last_logits
                unfed = None
    finally:
        if unfed is not None:
            cache.set_pending(unfed)


class Decoding:
    """The one decode loop, used by :func:`generate` and the engine (and through it every integration).

    Samples tokens through the cache (:func:`iter_tokens`) until an end-of-sequence token, a stop string,
    ``max_new_tokens`` or ``stop_now()`` returns True (it may also raise, e.g. past a deadline). Iterating yields text
    deltas once they can no longer be the start of a stop string (only when ``stream_text``). Afterwards ``tokens``
    holds every sampled token (an end-of-sequence one included), ``text`` the answer without special tokens, cut before
    a stop string (None without a tokenizer), and ``finish`` "eos", "stop", "length" or "cancelled". The last token is
    left pending in the cache however the loop ends.
    """

    def __init__(
        self,
        bm: BeaconModel,
        cache: BeaconCache,
        logits: torch.Tensor,
        sampler: TokenSampler,
        max_new_tokens: int,
        *,
        history: Sequence[int] = (),
        eos: set[int] | frozenset[int] = frozenset(),
        stops: Sequence[str] = (),
        tokenizer: Any = None,
        stream_text: bool = False,
        on_token: Callable[[int], None] | None = None,
        stop_now: Callable[[], bool] | None = None,
    ) -> None:
        stops = normalize_stop(stops)
        if stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.bm, self.cache, self.logits, self.sampler = bm, cache, logits, sampler
        self.max_new_tokens, self.history, self.eos = max_new_tokens, list(history), eos
        self.stops = stops
        self.stop_ids = special_stop_ids(tokenizer, stops) if stops else {}
        self.tokenizer, self.stream_text, self.on_token, self.stop_now = tokenizer, stream_text, on_token, stop_now
        self.tokens: list[int] = []
        self.text: str | None = None
        self.finish = "length"

    def _decode(self, tokens: list[int]) -> str:
        """The text of ``tokens`` without special tokens, as the model wrote it: a tokenizer's
        ``clean_up_tokenization_spaces`` (on in Llama 3's) is turned off, since it rewrites text already streamed
        (``"done ."`` becomes ``"done."`` when the "." arrives, ``"x = 's"`` becomes ``"x ='s"``), so the deltas would
        not join into the text; it also mangles code."""
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def __iter__(self) -> Iterator[str]:
        hold = max((len(s) for s in self.stops), default=1) - 1
        emitted = ""
        watch_text = self.tokenizer is not None and (self.stream_text or self.stops)
        gen = iter_tokens(self.bm, self.cache, self.logits, self.history, self.sampler, self.max_new_tokens)
        try:
            for token in gen:
                self.tokens.append(token)
                if self.on_token is not None:
                    self.on_token(token)
                if token in self.eos:
                    self.finish = "eos"
                    break
                if token in self.stop_ids:  # a special token: never in the decoded text
                    self.text, self.finish = self._decode(self.tokens[:-1]), "stop"
                    break
                if watch_text:
                    text = self._decode(self.tokens)
                    cut = min((text.find(s) for s in self.stops if s in text), default=-1)
                    if cut >= 0:
                        self.text, self.finish = text[:cut], "stop"
                        break
                    if self.stream_text:
                        safe = len(text.rstrip("\ufffd")) - hold  # an incomplete last character holds no room
                        while safe > len(emitted) and text[safe - 1] == "\ufffd":  # an incomplete character
                            safe -= 1
                        if safe > len(emitted):
                            yield text[len(emitted) : safe]
                            emitted = text[:safe]
                if self.stop_now is not None and self.stop_now():
                    self.finish = "cancelled"
                    break
        finally:
            gen.close()  # leaves the last token pending in the cache
        if self.text is None and self.tokenizer is not None:
            self.text = self._decode(self.tokens[:-1] if self.finish == "eos" else self.tokens)
        if self.stream_text and self.text is not None and len(self.text) > len(emitted):
            yield self.text[len(emitted) :]

    def run(self) -> Decoding:
        """Decode to the end without streaming; returns itself."""
        for _ in self:
            pass
        return self


def _eos_ids(bm: BeaconModel, eos_token_id: Any) -> set[int]:
    """The end-of-sequence ids: ``eos_token_id`` (an int, numpy int, sequence of them or integer tensor of 0 or 1
    dims; ``[]`` for none) or, when None, the model's generation config's, else its config's."""
    if eos_token_id is None:
        gen = getattr(bm.model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(bm.model.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    value = list(eos_token_id) if isinstance(eos_token_id, (set, frozenset)) else eos_token_id
    try:
        ids = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is not None and ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        ids = None  # not token ids ([] alone may be float: it has none)
    if ids is None or ids.dim() > 1:
        raise ValueError(
            f"eos_token_id={eos_token_id!r} must be a token id (an int), a list of them or a 0/1-dim integer tensor; "
            "[] for none, None for the model's own"
        )
    return {int(i) for i in ids.reshape(-1).tolist()}


def _check_generator(generator: Any) -> None:
    """``generator`` must be None or a CPU ``torch.Generator`` (tokens are sampled on the CPU)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator={generator!r} must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None"
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator is on {generator.device}, tokens are sampled on the CPU: give a CPU torch.Generator() or None"
        )


def _check_answer_fits(bm: BeaconModel, cache: BeaconCache, max_new_tokens: int) -> None:
    """``generate(input_ids=None)``: refuse, before a token is chosen, a cache of another model or an answer of
    ``max_new_tokens`` that the context cannot hold (a call with a prompt plans its read for the answer too), rather
    than fail mid-answer, or leave a token chosen from the cache's logits pending in a cache that was refused."""
    cache.bind(bm._fingerprint())
    if bm.config.is_fit and cache.state.fit_plan is None:
        return  # no plan to check against: the read plans itself
    held = cache.n_seen + len(cache.state.pending)
    try:
        bm._check_capacity(cache, held, held + max_new_tokens)
    except ValueError as e:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not fit after the {held} tokens this cache holds: {e}. "
            "Give a smaller max_new_tokens"
        ) from None


def generate(
    bm: BeaconModel,
    input_ids: Any = None,
    *,
    attention_mask: Any = None,
    cache: BeaconCache | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    return_dict_in_generate: bool = False,
) -> torch.Tensor | GenerateOutput:
    """Generate up to ``max_new_tokens`` after ``input_ids`` (appended to ``cache`` if given).

    Works like ``transformers`` ``generate(**tokenizer(text, return_tensors="pt"), ...)``: returns the (1, L + N)
    ids, or a :class:`GenerateOutput` with ``return_dict_in_generate=True`` (which also carries the cache).
    ``streamer`` follows the transformers streamer protocol (``put(ids)`` / ``end()``), e.g. ``TextStreamer``.
    ``input_ids=None`` continues from what ``cache`` already holds.
    """
    top_k = None if top_k == 0 and not isinstance(top_k, bool) else top_k  # transformers: 0 = no top-k filtering
    check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           repetition_penalty=repetition_penalty)  # fmt: skip
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling (use do_sample=False for greedy)")
    tokenizer = tokenizer if tokenizer is not None else bm.tokenizer
    stops = normalize_stop(stop_strings)
    if stops and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer: pass tokenizer=... or load the model with one")
    eos = _eos_ids(bm, eos_token_id)  # every option is checked before the cache reads anything
    _check_generator(generator)
    sampler = TokenSampler(do_sample, temperature, top_k, top_p, repetition_penalty, generator)
    cache = cache if cache is not None else bm.new_cache()
    if not bm._enabled:
        raise RuntimeError("generate() is not available inside disabled(); call bm.model.generate for the base model")

    if input_ids is not None:
        prompt = bm._as_ids(input_ids, attention_mask)
        planned = cache.n_seen + len(cache.state.pending) + int(prompt.numel()) + max_new_tokens
        logits = bm.forward(prompt, cache, return_token_logprobs=False, planned_length=planned).last_logits
    else:
        prompt = torch.empty(0, dtype=torch.long, device=bm.device)
        if not cache.state.pending and cache.last_logits is None:
            raise ValueError("input_ids=None but the cache holds no context: give a prompt")
        _check_answer_fits(bm, cache, max_new_tokens)
        if cache.state.pending:  # forward feeds the pending token itself (and restores it if the read fails)
            logits = bm.forward([], cache, return_token_logprobs=False).last_logits
        else:
            logits = cache.last_logits
    if streamer is not None:
        streamer.put(prompt.cpu()[None])
    history = prompt.cpu().tolist()
    on_token = (lambda token: streamer.put(torch.tensor([token]))) if streamer is not None else None
    decoding = Decoding(bm, cache, logits, sampler, max_new_tokens, history=history, eos=eos, stops=stops,
                        tokenizer=tokenizer, on_token=on_token).run()  # fmt: skip
    if streamer is not None:
        streamer.end()
    new_tokens, finish, text = decoding.tokens, decoding.finish, decoding.text
    sequences = torch.tensor([history + new_tokens], dtype=torch.long)
    if return_dict_in_generate:
        return GenerateOutput(sequences, new_tokens, finish, cache, text)
    return sequences
