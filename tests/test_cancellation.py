"""Stopping a call while it reads its prompt: a cancel event, an abandoned async task, a timeout, an interrupt.

Every read stops within one window step and leaves the engine's prefix store (memory and disk) holding only
prefixes read to their end, so the same call afterwards gives exactly what a fresh engine gives.
"""

import asyncio
import math
import threading
import time

import pytest

from beacon_llm import BeaconEngine, ReadCancelled, load_cache
from beacon_llm.testing import tiny_beacon_model

BOOK = "Chapter one. The lighthouse keeper counted ships every night and wrote them in a red book. " * 20


@pytest.fixture(scope="module")
def bm():
    return tiny_beacon_model()


def _windows(engine: BeaconEngine, ids: list[int]) -> int:
    return math.ceil(len(ids) / engine.bm.config.window)


def _same_as_fresh(engine: BeaconEngine, ids: list[int], boundary: int | None) -> int:
    """The call on ``engine`` equals the call on a fresh engine; returns the tokens it took from stored prefixes."""
    later = engine.complete(ids, boundary=boundary, max_new_tokens=8)
    fresh = BeaconEngine(engine.bm).complete(ids, boundary=boundary, max_new_tokens=8)
    assert (later.token_ids, later.text, later.finish_reason) == (fresh.token_ids, fresh.text, fresh.finish_reason)
    return later.usage.cache_read_tokens


def _sound_store(engine: BeaconEngine) -> None:
    """Each stored prefix (memory and disk) holds exactly the tokens its key says; no temporary files are left."""
    for n_tokens, cache in engine.stored_prefixes():
        assert cache.state.n_seen == n_tokens and cache.last_logits is not None
    if engine.cache_dir is not None:
        assert not list(engine.cache_dir.glob("*.tmp"))
        for path in engine.cache_dir.glob("*.safetensors"):
            n = int(path.stem.split("-")[1])
            cache, extra = load_cache(str(path), engine.bm)
            assert cache.state.n_seen == n == extra["n_tokens"]


def test_cancel_stops_the_read_within_one_window_and_stores_nothing_half_read(bm, tmp_path):
    engine = BeaconEngine(bm, cache_dir=tmp_path)
    ids, boundary = engine.document_prompt(BOOK, "Who counted?")
    cancel = threading.Event()
    steps: list[int] = []

    def progress(n: int, cache: object) -> None:
        steps.append(n)
        if len(steps) == 3:
            cancel.set()

    with pytest.raises(ReadCancelled, match=r"cancelled while reading the prompt \(\d+ of \d+ tokens read\)"):
        list(engine.stream(ids, boundary=boundary, max_new_tokens=8, cancel=cancel, progress=progress))
    assert len(steps) == 3 and _windows(engine, ids) > 100
    assert not engine.stored_prefixes() and not list(tmp_path.iterdir())
    assert _same_as_fresh(engine, ids, boundary) == 0
    with pytest.raises(ReadCancelled):  # an event set before the call: nothing is read
        engine.read(ids, cancel=cancel)


def test_cancelled_async_task_stops_the_read_within_one_window(bm):
    """The consumer of ``astream`` is cancelled while the worker reads a long prompt: the worker stops after the
    window step it was in, well before the prompt's end, and stores nothing."""
    engine = BeaconEngine(bm)
    ids, boundary = engine.document_prompt(BOOK, "Who counted?")
    steps: list[int] = []
    reached, resume = threading.Event(), threading.Event()

    def progress(n: int, cache: object) -> None:
        steps.append(n)
        if len(steps) == 3:  # hold the worker inside its third window step until the task is cancelled
            reached.set()
            resume.wait(10)

    async def main() -> None:
        async def consume() -> list:
            return [item async for item in engine.astream(ids, boundary=boundary, max_new_tokens=8, progress=progress)]

        task = asyncio.create_task(consume())
        while not reached.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    workers = [t for t in threading.enumerate() if t.name == "beacon-generate"]
    resume.set()  # the worker resumes after its event loop is gone: it must stop quietly
    for t in workers:
        t.join(10)
    assert not any(t.is_alive() for t in workers)
    assert len(steps) == 3 and _windows(engine, ids) > 100
    assert not engine.stored_prefixes()
    assert _same_as_fresh(engine, ids, boundary) == 0


def test_interrupt_in_progress_propagates_and_keeps_the_store_sound(bm, tmp_path):
    """A KeyboardInterrupt raised by the progress callback past the document's end (its prefix already stored)
    propagates; the store keeps only the whole document, which the same call then reuses."""
    engine = BeaconEngine(bm, cache_dir=tmp_path)
    ids, boundary = engine.document_prompt(BOOK, "Who counted the ships every night?")
    done = 0

    def progress(n: int, cache: object) -> None:
        nonlocal done
        done += n
        if done > boundary:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.complete(ids, boundary=boundary, max_new_tokens=8, progress=progress)
    assert done < len(ids)
    assert [n for n, _ in engine.stored_prefixes()] == [boundary]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    _sound_store(engine)
    assert _same_as_fresh(engine, ids, boundary) == boundary
    assert _same_as_fresh(BeaconEngine(bm, cache_dir=tmp_path), ids, boundary) == boundary  # from disk
    _sound_store(engine)


def test_timeout_covers_reading_and_generating(bm):
    engine = BeaconEngine(bm)
    ids, boundary = engine.document_prompt(BOOK, "Who counted?")
    steps: list[int] = []

    def slow(n: int, cache: object) -> None:
        steps.append(n)
        time.sleep(0.002)

    with pytest.raises(TimeoutError, match=r"timeout=0.001 s while reading the prompt .*timeout=None for no limit"):
        list(engine.stream(ids, boundary=boundary, max_new_tokens=8, timeout=0.001, progress=slow))
    assert len(steps) <= 1 and not engine.stored_prefixes()  # 0: out of time before the first window ended
    short = engine.encode("Once upon a time")
    events = engine.stream(short, max_new_tokens=50, timeout=1.0)
    assert isinstance(next(events), str)
    time.sleep(1.05)
    with pytest.raises(TimeoutError, match=r"timeout=1.0 s while generating the answer \(\d+ tokens generated\)"):
        list(events)
    generous = engine.complete(ids, boundary=boundary, max_new_tokens=8, timeout=60)
    unlimited = BeaconEngine(bm).complete(ids, boundary=boundary, max_new_tokens=8)
    assert (generous.token_ids, generous.text) == (unlimited.token_ids, unlimited.text)


@pytest.mark.parametrize("timeout", [0, -1, True, "5", float("nan")])
def test_bad_timeouts_are_refused_before_reading(bm, timeout):
    engine = BeaconEngine(bm)
    with pytest.raises(ValueError, match="timeout=.* must be a number of seconds > 0, or None"):
        next(engine.stream([5, 6, 7], timeout=timeout, progress=lambda n, c: pytest.fail("read")))
