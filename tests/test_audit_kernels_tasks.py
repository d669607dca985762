"""The training stream's generated tasks (``beacon_llm.tasks.SampleStream``): a corpus that mixes long texts with
short ones (a JSONL of notes beside a book) hides the tasks' facts only in texts long enough for them, instead of
failing a task sample that happened to draw a short text as its filler."""

import numpy as np
import pytest

from beacon_llm.documents import BUNDLED_BOOK, read_document
from beacon_llm.tasks import IGNORE, SampleStream
from beacon_llm.testing import tiny_tokenizer

BOOK = read_document(BUNDLED_BOOK)[:20000]


def test_tasks_never_draw_a_text_too_short_to_hide_their_fact_in():
    tok = tiny_tokenizer()
    stream = SampleStream([BOOK, "A short note about Oz."], tok, 1024, task_rate=0.5, seed=0)
    kinds = []
    for _ in range(60):
        sample = next(stream)
        assert len(sample.input_ids) == len(sample.labels)
        kinds.append(sample.kind)
        if sample.kind != "text":
            assert any(label != IGNORE for label in sample.labels)
    assert "text" in kinds and set(kinds) - {"text"}  # both kinds drawn, no task sample failed


def test_the_same_seed_gives_the_same_samples_with_short_texts_in_the_corpus():
    tok = tiny_tokenizer()
    texts = [BOOK, "A short note.", BOOK[5000:9000]]
    a = SampleStream(texts, tok, 512, task_rate=0.5, seed=3)
    b = SampleStream(texts, tok, 512, task_rate=0.5, seed=3)
    for _ in range(20):
        x, y = next(a), next(b)
        assert x.input_ids == y.input_ids and x.labels == y.labels and x.kind == y.kind
    assert np.array_equal(a.rng.bit_generator.state["state"]["state"], b.rng.bit_generator.state["state"]["state"])


def test_tasks_without_any_text_long_enough_are_refused_up_front():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"task_rate=0.5 needs a training text of at least 4096 tokens"):
        SampleStream(["A short note.", "Another one."], tok, 4096, task_rate=0.5)
    SampleStream(["A short note.", "Another one."], tok, 4096, task_rate=0.0)  # text samples alone need no filler
