"""The engine and its prefix store: errors reach async callers, stored prefixes stay as read, the in-memory bound
holds for imports, a document survives its question's checkpoint, unusable cache folders and bad prompts are clear."""

import asyncio
import logging
import threading

import numpy as np
import pytest
import torch

from beacon_llm import BeaconEngine
from beacon_llm.config import BeaconConfig
from beacon_llm.testing import tiny_beacon_model

DOC = "Dorothy lived in the midst of the great Kansas prairies. " * 3
LONG_QUESTION = "Question: tell me, in detail, who lived there with the dog?"  # crosses a window boundary


@pytest.fixture(scope="module")
def bm():
    return tiny_beacon_model(BeaconConfig(window=16, ratios=(2,), ratio_mix="sequence"))


def _doc_prompt(engine, question="Who?"):
    doc = engine.encode(DOC)
    return doc + engine.encode(question), len(doc)


def test_astream_raises_a_bad_keyword_argument_instead_of_hanging(bm):
    engine = BeaconEngine(bm)

    async def consume():
        return [item async for item in engine.astream(engine.encode("hello"), max_tokens=3)]

    with pytest.raises(TypeError, match="max_tokens"):
        asyncio.run(asyncio.wait_for(consume(), 30))


def test_astream_refuses_a_cancel_event_of_its_own(bm):
    """astream cancels through its task; a caller's event would be ignored (or clash with its own), so it is refused
    before reading."""
    engine = BeaconEngine(bm)

    async def consume():
        return [item async for item in engine.astream(engine.encode("hello"), cancel=threading.Event())]

    with pytest.raises(TypeError, match="astream takes no cancel event: cancel its task"):
        asyncio.run(asyncio.wait_for(consume(), 30))


def test_reading_into_a_listed_prefix_leaves_the_stored_one_as_read(bm):
    engine = BeaconEngine(bm)
    ids, boundary = _doc_prompt(engine)
    first = engine.complete(ids, boundary=boundary, max_new_tokens=6)
    n_tokens, cache = engine.stored_prefixes()[-1]
    assert n_tokens == boundary
    bm.forward(engine.encode("more text the caller reads into the cache " * 2), cache)
    assert [c.n_seen for n, c in engine.stored_prefixes()] == [n for n, _ in engine.stored_prefixes()]
    again = engine.complete(ids, boundary=boundary, max_new_tokens=6)
    assert again.usage.cache_read_tokens == boundary
    assert again.token_ids == first.token_ids


def test_imported_prefixes_keep_within_max_prefixes(bm, tmp_path):
    engine = BeaconEngine(bm)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"doc{i}.safetensors")
        engine.export_prefix(engine.encode(f"Document {i}: " + "abc def ghi " * 3), paths[-1])
    small = BeaconEngine(bm, max_prefixes=2)
    for path in paths:
        small.import_prefix(path)
    assert len(small.stored_prefixes()) == 2
    with pytest.raises(ValueError, match="max_prefixes=0"):
        BeaconEngine(bm, max_prefixes=0).import_prefix(paths[0])


def test_a_long_question_does_not_push_its_document_out_of_a_one_prefix_store(bm):
    engine = BeaconEngine(bm, max_prefixes=1)
    doc = engine.encode(DOC)
    for i in range(3):
        ids = doc + engine.encode(f"{i} {LONG_QUESTION}")
        completion = engine.complete(ids, boundary=len(doc), max_new_tokens=2)
        assert completion.usage.cache_read_tokens == (len(doc) if i else 0)
        assert [n for n, _ in engine.stored_prefixes()] == [len(doc)]


def test_a_cache_dir_that_is_a_file_is_refused(bm, tmp_path):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    with pytest.raises(ValueError, match="not-a-folder.*is a file"):
        BeaconEngine(bm, cache_dir=path)


def test_an_unwritable_cache_dir_still_answers_with_a_warning(bm, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    engine = BeaconEngine(bm, cache_dir=blocker / "cache")  # mkdir fails: its parent is a file
    ids, boundary = _doc_prompt(engine)
    with caplog.at_level(logging.WARNING, logger="beacon_llm.prefix_store"):
        answer = engine.complete(ids, boundary=boundary, max_new_tokens=6)
    assert "could not write the condensed prefix" in caplog.text
    assert answer.token_ids == BeaconEngine(bm).complete(ids, boundary=boundary, max_new_tokens=6).token_ids
    assert engine.complete(ids, boundary=boundary, max_new_tokens=6).usage.cache_read_tokens == boundary


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([5.7, 6.2], r"holds 5\.7 \(float\)"),
        ([True, 6], r"holds True \(bool\)"),
        ("hello", "not text.*engine.encode"),
    ],
)
def test_prompts_that_are_not_token_ids_are_refused(bm, prompt, match):
    with pytest.raises(ValueError, match=match):
        BeaconEngine(bm).read(prompt)


@pytest.mark.parametrize("boundary", [-5, 500, 3.5, "10", True])
def test_a_boundary_outside_the_prompt_is_refused(bm, boundary):
    engine = BeaconEngine(bm)
    ids, _ = _doc_prompt(engine)
    with pytest.raises(ValueError, match=f"boundary={boundary!r} must be an index into the prompt's {len(ids)}"):
        engine.read(ids, boundary=boundary)
    assert not engine.stored_prefixes()


def test_numpy_and_tensor_prompts_and_boundaries_give_python_ints(bm):
    engine = BeaconEngine(bm)
    ids, boundary = _doc_prompt(engine)
    _, usage = engine.read(torch.tensor([ids]), boundary=np.int64(boundary))
    assert usage.read_tokens == len(ids) and type(usage.read_tokens) is int
    assert [n for n, _ in engine.stored_prefixes()][-1] == boundary


@pytest.mark.parametrize("reserve", [-50, 2.5, None])
def test_a_negative_or_fractional_answer_reserve_is_refused(bm, reserve):
    engine = BeaconEngine(bm)
    with pytest.raises(ValueError, match=f"answer_reserve={reserve!r} must be an int >= 0"):
        engine.read(engine.encode("hello"), answer_reserve=reserve)


@pytest.mark.parametrize("option", ["max_prefixes", "min_prefix"])
@pytest.mark.parametrize("value", [None, "4", 2.5, True, -1])
def test_store_bounds_must_be_ints(bm, option, value):
    with pytest.raises(ValueError, match=f"{option}={value!r} must be an int >= 0"):
        BeaconEngine(bm, **{option: value})


@pytest.mark.parametrize("cache_dir", [False, True], ids=["memory", "disk"])
def test_adapt_prefixes_of_two_ratios_are_both_kept_and_each_read_gets_a_fresh_reads_tokens(tmp_path, cache_dir):
    """adapt-N fixes a ratio at a prompt's first read, from the answer length: a short answer reads at ratio 2, a
    long one at 4. Both condensed prefixes are kept (the second no longer replaces the first), and a read reuses
    only the one read at the ratio it would fix itself, so every answer is the one a fresh engine gives, whatever
    came before (a short answer after a long one used to reuse the ratio-4 prefix)."""
    adapt = tiny_beacon_model(max_position_embeddings=256)  # adapt-16, ratios (2, 4)
    folder = tmp_path / "store" if cache_dir else None

    def engine():
        return BeaconEngine(adapt, cache_dir=folder, max_prefixes=0 if cache_dir else 8)

    ids, boundary = engine().document_prompt("Dorothy lived in the midst of the great Kansas prairies. " * 6, "Who?")
    fresh = {n: BeaconEngine(adapt, max_prefixes=0).complete(ids, max_new_tokens=n).token_ids for n in (4, 150)}
    shared = engine()
    reused = []
    for n in (150, 4, 150, 4):
        got = (shared if not cache_dir else engine()).complete(ids, boundary=boundary, max_new_tokens=n)
        assert got.token_ids == fresh[n]
        reused.append(got.usage.cache_read_tokens >= boundary)
    assert reused == [False, False, True, True]
    if cache_dir:
        assert sorted(p.stem.rsplit("a", 1)[-1] for p in folder.glob("*.safetensors")) == ["2", "4"]
    else:
        assert sorted((n, c.state.fixed_ratio) for n, c in shared.stored_prefixes() if n == boundary) == [
            (boundary, 2), (boundary, 4)]  # fmt: skip


def test_export_refuses_ids_that_are_not_token_ids(bm, tmp_path):
    engine = BeaconEngine(bm)
    with pytest.raises(ValueError, match=r"the prompt holds 1\.5 \(float\), not a token id"):
        engine.export_prefix([1.5, 2, 3], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_chat_boundary_follows_a_book_inside_the_last_message(bm):
    """A chat's reusable prefix ends where its last message starts, unless most of what it shares with a recent
    prompt lies past that (the book inside the last message): then it ends where the shared part ends."""
    engine = BeaconEngine(bm)

    def chat(last):
        return engine.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": last}])

    book = "Dorothy lived in the midst of the great Kansas prairies with Uncle Henry and Aunt Em. " * 4
    first, start = chat(book + "Question: Who?")
    assert 0 < start < len(first) and engine.chat_boundary(first, start) == start  # nothing recent yet
    second, start2 = chat(book + "Question: Where?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert start2 == start < shared - start and engine.chat_boundary(second, start2) == shared
    alike, start3 = chat("Dorothy went far away, to a land of witches and winged monkeys, long ago.")
    assert engine.chat_boundary(alike, start3) == start3  # shares less past the message start than before it
    # questions that start alike ("What is the ...") share more than the book; once one starts otherwise, the
    # boundary settles on the book (and "Question: "), and a later "What is the ..." question finds that prefix
    fresh = BeaconEngine(bm)
    texts = ("What is the red book?", "What is the ship?", "How many ships?", "What is the king?")
    q = [chat(book + "Question: " + text)[0] for text in texts]
    marks = [fresh.chat_boundary(ids, start) for ids in q]
    book_end = next(i for i, (a, b) in enumerate(zip(q[2], q[3])) if a != b)  # "Question: " ends there
    assert marks[0] == start and marks[1] == book_end + len("What is the ")
    assert marks[2] == marks[3] == book_end
    again, _ = engine.encode_chat([{"role": "user", "content": book + "Question: Who?"}])
    assert engine.chat_boundary(again, 0) == 0  # unknown start, nothing shared: no prefix
    assert engine.chat_boundary(again, 0) == len(again)  # unknown start, the same prompt again: all of it


def test_a_claim_an_interrupt_left_behind_does_not_block_the_same_thread(bm):
    """Ctrl-C between taking a prefix's claim and the read's try left the claim taken: the next question about the
    same document (the CLI chat, one thread, no deadline) waited for it forever. A thread's own claim is taken over;
    another thread still waits for the live one."""
    engine = BeaconEngine(bm)
    ids, boundary = _doc_prompt(engine)
    claimed, release_it, got = threading.Event(), threading.Event(), {}

    def chat_thread():
        engine.store.claim(ids, boundary, lambda: None)  # taken and never released, as an interrupt leaves it
        release = engine.store.claim(ids, boundary, lambda: None)  # the next question, same thread
        claimed.set()
        release_it.wait(30)  # reading ...
        release()

    first = threading.Thread(target=chat_thread, daemon=True)
    first.start()
    assert claimed.wait(10)  # not blocked by its own abandoned claim
    other = threading.Thread(target=lambda: got.update(other=engine.store.claim(ids, boundary, lambda: None)))
    other.daemon = True
    other.start()  # another thread waits for the live claim ...
    other.join(0.5)
    assert other.is_alive()
    release_it.set()  # ... until it is released
    other.join(10)
    assert not other.is_alive() and got["other"] is not None
    got["other"]()
    assert engine.complete(ids, boundary=boundary, max_new_tokens=2).finish_reason in ("length", "eos")


def test_a_cache_file_named_without_its_ratio_is_renamed_once_and_then_found_only_where_usable(tmp_path):
    """adapt-N cache files written before their names held the fixed ratio (no ``a<r>`` tag) were loaded by every
    lookup and then skipped. The first lookup that loads one now gives it its right name (or removes it when a file
    of that name exists: a copy), and uses it where its ratio is the one the read fixes."""
    adapt = tiny_beacon_model(max_position_embeddings=256)  # adapt-16, ratios (2, 4)
    folder = tmp_path / "store"
    ids, boundary = BeaconEngine(adapt).document_prompt(DOC * 2, "Who?")
    BeaconEngine(adapt, cache_dir=folder, max_prefixes=0).complete(ids, boundary=boundary, max_new_tokens=4)
    (written,) = folder.glob("*.safetensors")
    legacy = written.with_name(written.name.replace("a2.safetensors", ".safetensors"))
    assert legacy != written
    written.rename(legacy)
    got = BeaconEngine(adapt, cache_dir=folder, max_prefixes=0).complete(ids, boundary=boundary, max_new_tokens=4)
    assert got.usage.cache_read_tokens >= boundary  # the mislabelled file served the read it fits
    assert sorted(folder.glob("*.safetensors")) == [written]
    # a copy under the legacy name beside the right one is removed when found
    legacy.write_bytes(written.read_bytes())
    long_answer = BeaconEngine(adapt, cache_dir=folder, max_prefixes=0)
    long_answer.complete(ids, boundary=boundary, max_new_tokens=150)  # ratio 4: the ratio-2 files do not serve it
    assert not legacy.exists() and written.exists()


def test_a_prompt_that_outgrew_its_condensed_beginnings_room_says_why_it_is_read_again(caplog):
    """fit-N keeps room for N tokens of follow-ups after a condensed document; a conversation grown past it is read
    again from the start under a plan that condenses more windows. That re-read (the whole book again) used to be
    silent; it now names the stored prefix, its plan and the new one. A follow-up within the room says nothing."""
    fit = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-8"), max_position_embeddings=128)
    engine = BeaconEngine(fit)
    doc = engine.encode(DOC)
    assert 128 < len(doc) < 200  # condensed
    follow_up = doc + engine.encode(" Who?")
    engine.complete(follow_up, boundary=len(doc), max_new_tokens=2)
    with caplog.at_level("WARNING", logger="beacon_llm.engine"):
        again = engine.complete(doc + engine.encode(" Where?"), boundary=len(doc), max_new_tokens=2)
    assert again.usage.cache_read_tokens == len(doc) and "outgrew" not in caplog.text
    grown = doc + engine.encode(" And then what happened to them all, in the end, after the storm?" * 2)
    with caplog.at_level("WARNING", logger="beacon_llm.engine"):
        reread = engine.complete(grown, boundary=len(doc), max_new_tokens=2)
    assert reread.usage.cache_read_tokens < len(doc)
    assert f"condensed beginning ({len(doc)} tokens" in caplog.text and "A larger N in fit-N" in caplog.text
