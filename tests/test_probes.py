"""The evaluation probes: planted facts, their order, their depths, and exact-match scoring."""

import re

import numpy as np
import pytest

import beacon_llm
from beacon_llm.probes import _COUNTED, PROBE_TASKS, Probe, make_probe_context, sentence_boundaries
from beacon_llm.testing import tiny_tokenizer

BOOK = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def filler(tok):
    return tok(BOOK[:60000], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("seed,n_tokens", [(0, 5000), (1, 6000), (2, 12000), (3, 8000)])
def test_context_holds_every_fact_in_order(tok, filler, seed, n_tokens):
    ctx, probes = make_probe_context(tok, filler, n_tokens, np.random.default_rng(seed))
    assert len(ctx) == n_tokens
    assert [p.task for p in probes] == list(PROBE_TASKS)
    text = tok.decode(ctx)
    by_task = {p.task: p for p in probes}
    for p in probes:
        assert all(0 <= d <= 1 for d in p.depths) and p.depths == sorted(p.depths)
        assert p.answer in text or p.task == "counting"
        assert p.answer not in p.wrong
    assert text.count(_COUNTED) == int(by_task["counting"].answer) == len(by_task["counting"].depths)
    # chains: the supporting facts appear in story order, far apart
    place = by_task["chain3"].answer
    obj = re.search(r"Where is the (.+)\?", by_task["chain3"].question).group(1)
    picked = re.search(rf"(\w+) picked up the {obj}\.", text)
    gave = re.search(rf"{picked.group(1)} gave the {obj} to (\w+)\.", text)
    went = re.search(rf"{gave.group(1)} went to the {place}\.", text)
    assert picked.start() < gave.start() < went.start()
    var = re.search(r"VAR (\w+)\?", by_task["variable_tracking"].question).group(1)
    chain = [var]
    while (m := re.search(rf"VAR {chain[-1]} = VAR (\w+)\.", text)) is not None:
        chain.append(m.group(1))
    assert len(chain) == 3
    assert f"VAR {chain[-1]} = {by_task['variable_tracking'].answer}." in text
    assert len(by_task["multi_needle"].depths) == 4 and len(by_task["multi_needle"].wrong) == 3


def test_facts_sit_at_sentence_boundaries(tok, filler):
    ctx, probes = make_probe_context(tok, filler, 6000, np.random.default_rng(7))
    text = tok.decode(ctx)
    for p in probes:
        if p.task == "passkey":
            i = text.index("The pass key is")
            assert text[i - 1] == " " and text[:i].rstrip().endswith((".", "!", "?", '"'))


def test_same_seed_same_context(tok, filler):
    a = make_probe_context(tok, filler, 5000, np.random.default_rng(3))
    b = make_probe_context(tok, filler, 5000, np.random.default_rng(3))
    c = make_probe_context(tok, filler, 5000, np.random.default_rng(4))
    assert a[0] == b[0] and [p.answer for p in a[1]] == [p.answer for p in b[1]]
    assert a[0] != c[0]


def test_too_short_context_is_refused(tok, filler):
    with pytest.raises(ValueError, match=r"n_tokens=500 is too short .* use at least \d+ tokens"):
        make_probe_context(tok, filler, 500, np.random.default_rng(0))
    with pytest.raises(ValueError, match="filler text has 100 tokens"):
        make_probe_context(tok, filler[:100], 5000, np.random.default_rng(0))


@pytest.mark.parametrize(
    "task,answer,wrong,output,correct",
    [
        ("passkey", "12345", [], "The pass key is 12345.", True),
        ("passkey", "12345", [], "1234", False),
        ("chain2", "cellar", ["attic"], "In the cellar.", True),
        ("chain2", "cellar", ["attic"], "The cellar or the attic.", False),
        ("counting", "3", [], "3 times", True),
        ("counting", "3", [], "It appears 13 times, not 3", False),
        ("counting", "3", [], "three", False),
        ("kv", "a1b2c3", ["ffffff"], "a1b2c3", True),
    ],
)
def test_exact_match_scoring(task, answer, wrong, output, correct):
    assert Probe(task, "q", answer, [0.5], wrong).score(output) is correct


def test_sentence_boundaries(tok):
    ids = tok("One. Two! Three? Four, five", add_special_tokens=False)["input_ids"]
    text = tok.decode(ids)
    got = [text[:i].rstrip()[-1] for i in sentence_boundaries(tok, ids)]
    assert got == [".", "!", "?"]


# ---------------------------------------------------------------------- facts at chosen depths
@pytest.mark.parametrize(
    "depths",
    [(0.1, 0.5, 0.9), (0.9, 0.1, 0.5), (0.3, 0.3), (0.0, 1.0)],
)
def test_plant_at_depths_puts_each_sentence_near_its_depth(tok, filler, depths):
    from beacon_llm.probes import plant_at_depths

    sentences = [(f"The special magic number of Town{i} is {1000 + i}.", d) for i, d in enumerate(depths)]
    n_tokens = 6000
    ctx, realised = plant_at_depths(tok, filler, n_tokens, sentences, np.random.default_rng(0))
    assert len(ctx) == n_tokens
    text = tok.decode(ctx)
    for (sentence, depth), got in zip(sentences, realised):
        assert text.count(sentence) == 1
        assert abs(got - depth) < 0.05  # the nearest sentence boundary of the book text
    # equal depths keep the given order in the text
    if depths[0] == depths[1]:
        assert text.index(sentences[0][0]) < text.index(sentences[1][0])


def test_plant_at_depths_refuses_bad_input(tok, filler):
    from beacon_llm.probes import plant_at_depths

    with pytest.raises(ValueError, match=r"depths \[1.5\] must be within \[0, 1\]"):
        plant_at_depths(tok, filler, 6000, [("A fact.", 1.5)], np.random.default_rng(0))
    with pytest.raises(
        ValueError, match=r"n_tokens=40 leaves -?\d+ tokens of text around \d+ planted ones \(at least 3x needed\)"
    ):
        plant_at_depths(tok, filler, 40, [("A fact that is rather long for such a short text.", 0.5)],
                        np.random.default_rng(0))  # fmt: skip


def test_recall_probes_are_the_drawn_probes_with_their_sentences():
    from beacon_llm.probes import recall_probes

    chosen = recall_probes(np.random.default_rng(5), ("passkey", "chain3"))
    assert [p.task for p, _ in chosen] == ["passkey", "chain3"]
    passkey, sentences = chosen[0]
    assert len(sentences) == 1 and passkey.answer in sentences[0]
    chain, sentences = chosen[1]
    assert len(sentences) == 4 and chain.answer in " ".join(sentences)
    same = recall_probes(np.random.default_rng(5), ("passkey",))
    assert same[0][0].answer == passkey.answer  # drawn as make_probe_context draws them
    with pytest.raises(ValueError, match=r"unknown probe tasks \['riddle'\]"):
        recall_probes(np.random.default_rng(0), ("riddle",))
