"""Ingest once, ask many, also at the same time: concurrent calls about one document read it once (the first reads,
the others wait for it and fork the condensed prefix), and their answers equal the calls made one after another."""

import threading

import pytest

from beacon_llm import BeaconEngine
from beacon_llm.testing import tiny_beacon_model

DOC = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry and Aunt Em. " * 12
QUESTIONS = [f"Question {i}: who is {name}?" for i, name in enumerate(["Toto", "Em", "Henry", "Oz", "Glinda", "Jim"])]


def _prompts(engine):
    doc = engine.encode(DOC)
    return [(doc + engine.encode(q), len(doc)) for q in QUESTIONS], len(doc)


def _run_concurrently(engine, prompts, slow_first_read=0.0):
    results = [None] * len(prompts)
    errors = []
    start = threading.Barrier(len(prompts))

    def ask(i):
        ids, boundary = prompts[i]
        try:
            start.wait()
            results[i] = engine.complete(ids, boundary=boundary, max_new_tokens=6)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_six_concurrent_questions_read_the_document_once():
    engine = BeaconEngine(tiny_beacon_model())
    prompts, n_doc = _prompts(engine)
    slow = engine.bm.forward

    def slowed(*args, **kwargs):  # widen the race window: every read takes a while
        import time

        time.sleep(0.05)
        return slow(*args, **kwargs)

    engine.bm.forward = slowed
    results = _run_concurrently(engine, prompts)
    read = sum(r.usage.read_tokens for r in results)
    questions = sum(len(ids) - b for ids, b in prompts)
    assert read == n_doc + questions  # one document, six questions
    assert sorted(r.usage.cache_read_tokens for r in results) == [0] + [n_doc] * 5
    sequential = BeaconEngine(tiny_beacon_model())
    expected = [sequential.complete(ids, boundary=b, max_new_tokens=6).text for ids, b in prompts]
    assert [r.text for r in results] == expected


def test_a_failed_first_read_lets_a_waiting_call_read_itself():
    engine = BeaconEngine(tiny_beacon_model())
    prompts, n_doc = _prompts(engine)
    first_started, release = threading.Event(), threading.Event()
    calls = []

    def failing_progress(n, cache):
        calls.append(n)
        first_started.set()
        release.wait(10)
        raise KeyboardInterrupt("stopped by the user")

    out = {}

    def first():
        try:
            engine.complete(prompts[0][0], boundary=n_doc, max_new_tokens=4, progress=failing_progress)
        except KeyboardInterrupt as exc:
            out["first"] = exc

    def second():
        out["second"] = engine.complete(prompts[1][0], boundary=n_doc, max_new_tokens=4)

    t1 = threading.Thread(target=first)
    t1.start()
    assert first_started.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.3)
    assert t2.is_alive()  # waiting for the first call's read of the same document
    release.set()
    t1.join(30)
    t2.join(60)
    assert isinstance(out["first"], KeyboardInterrupt)
    assert out["second"].usage.cache_read_tokens == 0 and out["second"].usage.read_tokens == len(prompts[1][0])


@pytest.mark.asyncio
async def test_concurrent_async_calls_read_once():
    import asyncio

    engine = BeaconEngine(tiny_beacon_model())
    prompts, n_doc = _prompts(engine)

    async def ask(ids, boundary):
        final = None
        async for item in engine.astream(ids, boundary=boundary, max_new_tokens=4):
            final = item
        return final

    results = await asyncio.gather(*(ask(ids, b) for ids, b in prompts))
    questions = sum(len(ids) - b for ids, b in prompts)
    assert sum(r.usage.read_tokens for r in results) == n_doc + questions


def test_models_loaded_from_several_threads_at_once_all_get_their_weights(tmp_path):
    """transformers' from_pretrained is not thread-safe: two tied-embedding models loaded at once were both left with
    the output projection on the meta device (no weights), and so was every later load in the process. Loads now
    run one at a time (a LangChain batch or a server may start several)."""
    import beacon_llm
    from beacon_llm.testing import tiny_base_model

    folders = []
    for i in range(3):
        base = tiny_base_model(tie_word_embeddings=True)
        base.save_pretrained(tmp_path / f"m{i}")
        folders.append(tmp_path / f"m{i}")
    loaded, errors = [], []
    start = threading.Barrier(len(folders))

    def load(folder):
        try:
            start.wait()
            config = beacon_llm.BeaconConfig(window=16, ratios=(2,))
            loaded.append(beacon_llm.from_pretrained(str(folder), beacon_config=config, tokenizer=False))
        except BaseException as exc:  # reported below
            errors.append(exc)

    for _ in range(2):
        threads = [threading.Thread(target=load, args=(f,)) for f in folders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:1]
    assert len(loaded) == 6
    assert all(not p.is_meta for bm in loaded for p in bm.model.parameters())
