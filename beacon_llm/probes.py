"""Seeded long-context probes for evaluation: facts planted in book text and the questions that ask for them.

One context carries every probe, so a method reads it once and answers all questions from copies of its state:

- ``passkey`` and ``needle`` (paper v2 §4.2 / v3 §4.3; Needle-in-a-Haystack);
- ``multi_needle``: four "special magic numbers" of four cities, one asked for (RULER multi-key);
- ``kv``: a JSON table of random hex keys and values, one key asked for (paper v3 §4.3 "key-value retrieval");
- ``fact``: a made-up statement about the book's world, asked about in words;
- ``chain2`` / ``chain3``: BABILong qa2/qa3-style supporting facts planted far apart, in order ("X picked up the
  key" ... "X went to the cellar" -> "where is the key?"), each with a distractor movement;
- ``variable_tracking``: RULER-style ``VAR A = 12345`` ... ``VAR B = VAR A`` chains with a distractor chain;
- ``counting``: one sentence repeated k times through the text, "how many times?".

Chunked retrieval is known to fail the last four, because the facts a question needs do not share words with it or
lie in different chunks. Facts are inserted at sentence boundaries of the filler. Scoring is exact: the answer string
appears in the output and no distractor answer does; ``counting`` compares the first integer of the output.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field

import numpy as np

PROBE_TASKS = (
    "passkey",
    "needle",
    "multi_needle",
    "kv",
    "fact",
    "chain2",
    "chain3",
    "variable_tracking",
    "counting",
)
_PEOPLE = ("Marla", "Tobin", "Quinn", "Osric", "Lenka", "Bruno", "Yara", "Hollis", "Petra", "Dagny")
_OBJECTS = ("silver whistle", "brass key", "glass marble", "copper coin", "wooden flute", "velvet pouch")
_PLACES = ("cellar", "attic", "stable", "orchard", "library", "harbor", "chapel", "bakery")
_COUNTED = "A red kite drifted over the hills."


@dataclass
class Probe:
    """One question about the planted facts."""

    task: str
    question: str
    answer: str
    depths: list[float]  # relative positions (0 = start of the context) of the facts planted for it
    wrong: list[str] = field(default_factory=list)  # distractor answers: naming one makes the output wrong

    def score(self, output: str) -> bool:
        """Exact match: the answer appears and no distractor does (counting: the first integer equals the count)."""
        if self.task == "counting":
            found = re.search(r"\d+", output)
            return found is not None and found.group() == self.answer
        return self.answer in output and not any(w in output for w in self.wrong)


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), 1)) + "".join(rng.choice(list("aeioulnrstk"), n - 1))


def _distinct(rng: np.random.Generator, pool: tuple[str, ...], k: int) -> list[str]:
    return [pool[i] for i in rng.choice(len(pool), k, replace=False)]


def _facts(rng: np.random.Generator) -> tuple[list[list[str]], list[int], list[Probe]]:
    """Groups of sentences (a group's order is kept in the text), the probe each group belongs to, and the probes
    (depths filled in later)."""
    groups: list[list[str]] = []
    owner: list[int] = []
    probes: list[Probe] = []

    def add(task: str, sentences: list[list[str]], question: str, answer: str, wrong: list[str] | None = None) -> None:
        groups.extend(sentences)
        owner.extend([len(probes)] * len(sentences))
        probes.append(Probe(task, question, answer, [], wrong or []))

    key = str(rng.integers(10000, 99999))
    add(
        "passkey",
        [[f"The pass key is {key}. Remember it. {key} is the pass key."]],
        "What is the pass key mentioned in the text above? Answer with the number only.",
        key,
    )
    cities: list[str] = []
    while len(cities) < 5:
        city = _word(rng, 7)
        if city not in cities:
            cities.append(city)
    numbers = [str(n) for n in rng.choice(np.arange(1000, 9999), 5, replace=False)]
    add(
        "needle",
        [[f"The special magic number of {cities[0]} is {numbers[0]}."]],
        f"What is the special magic number of {cities[0]} mentioned in the text above? Answer with the number only.",
        numbers[0],
    )
    asked = int(rng.integers(1, 5))
    add(
        "multi_needle",  # four needles planted independently, one asked for
        [[f"The special magic number of {cities[i]} is {numbers[i]}."] for i in range(1, 5)],
        f"What is the special magic number of {cities[asked]} mentioned in the text above? "
        "Answer with the number only.",
        numbers[asked],
        [numbers[j] for j in range(1, 5) if j != asked],
    )
    table = {f"{rng.integers(16**6):06x}": f"{rng.integers(16**6):06x}" for _ in range(8)}
    kv_key = list(table)[int(rng.integers(len(table)))]
    add(
        "kv",
        [["Key-value table: " + json.dumps(table)]],
        f'In the key-value table above, what is the value of key "{kv_key}"? Answer with the value only.',
        table[kv_key],
        [v for k, v in table.items() if k != kv_key],
    )
    name = _word(rng, 6)
    add(
        "fact",
        [[f"The Wizard kept a small green owl, and the owl's name was {name}."]],
        "What was the name of the Wizard's small green owl? Answer with the name only.",
        name,
    )
    people = _distinct(rng, _PEOPLE, 5)
    objects = _distinct(rng, _OBJECTS, 2)
    places = _distinct(rng, _PLACES, 4)
    add(
        "chain2",
        [
            [
                f"{people[0]} picked up the {objects[0]}.",
                f"{people[0]} went to the {places[0]}.",
                f"{people[1]} went to the {places[1]}.",
            ]
        ],
        f"Where is the {objects[0]}? Answer with the place only.",
        places[0],
        [places[1]],
    )
    add(
        "chain3",
        [
            [
                f"{people[2]} picked up the {objects[1]}.",
                f"{people[2]} gave the {objects[1]} to {people[3]}.",
                f"{people[3]} went to the {places[2]}.",
                f"{people[2]} went to the {places[3]}.",
            ]
        ],
        f"Where is the {objects[1]}? Answer with the place only.",
        places[2],
        [places[3]],
    )
    names = []
    while len(names) < 5:
        var = "".join(rng.choice(list(string.ascii_uppercase), 5))
        if var not in names:
            names.append(var)
    values = [str(n) for n in rng.choice(np.arange(10000, 99999), 2, replace=False)]
    add(
        "variable_tracking",
        [
            [
                f"VAR {names[0]} = {values[0]}.",
                f"VAR {names[1]} = VAR {names[0]}.",
                f"VAR {names[3]} = {values[1]}.",
                f"VAR {names[2]} = VAR {names[1]}.",
                f"VAR {names[4]} = VAR {names[3]}.",
            ]
        ],
        f"What is the value of VAR {names[2]}? Answer with the number only.",
        values[0],
        [values[1]],
    )
    count = int(rng.integers(2, 7))
    add(
        "counting",
        [[_COUNTED] * count],
        f'How many times does the sentence "{_COUNTED}" appear in the text above? Answer with a number only.',
        str(count),
    )
    return groups, owner, probes


def sentence_boundaries(tokenizer, ids: list[int]) -> np.ndarray:
    """Indices i such that the text before ``ids[i]`` ends a sentence (``.``, ``!`` or ``?``, maybe inside a closing
    quote) and ``ids[i]`` starts with white space: places where a fact can be inserted as a sentence of its own.

    Whether ``ids[i]`` starts with white space is read from the text it adds after ``ids[i - 1]``: a SentencePiece
    tokenizer (Llama 2, Mistral) drops the leading space of the first token it decodes, so ``decode([ids[i]])``
    alone would never show it."""
    pieces = {t: tokenizer.decode([t]) for t in set(ids)}

    def starts_with_space(prev: int, token: int) -> bool:
        pair, before = tokenizer.decode([prev, token]), pieces[prev]
        added = pair[len(before) :] if pair.startswith(before) else pieces[token]
        return added[:1].isspace()

    ends = [
        i
        for i in range(2, len(ids))
        if (pieces[ids[i - 2]] + pieces[ids[i - 1]]).endswith((".", "!", "?", '."', '!"', '?"'))
        and starts_with_space(ids[i - 1], ids[i])
    ]
    return np.asarray(ends, dtype=np.int64)


def _insert(body: list[int], spots: list[int], fact_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """``body`` with ``fact_ids[i]`` inserted before ``body[spots[i]]`` (equal spots keep the given order). Returns the
    context and where each fact starts in it, in the order given."""
    order = sorted(range(len(spots)), key=lambda i: (spots[i], i))
    ctx: list[int] = []
    starts = [0] * len(spots)
    cursor = 0
    for i in order:
        ctx += body[cursor : spots[i]]
        cursor = spots[i]
        starts[i] = len(ctx)
        ctx += fact_ids[i]
    return ctx + body[cursor:], starts


def make_probe_context(
    tokenizer, filler_ids: list[int], n_tokens: int, rng: np.random.Generator
) -> tuple[list[int], list[Probe]]:
    """A context of exactly ``n_tokens`` tokens: a random slice of ``filler_ids`` with every probe's facts at random
    sentence boundaries (the sentences of one chain in order), and the probes with the depths of their facts."""
    groups, owner, probes = _facts(rng)
    fact_ids = [[tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in g] for g in groups]
    planted = sum(len(ids) for g in fact_ids for ids in g)
    body_len = n_tokens - planted
    if body_len < 3 * planted:
        raise ValueError(
            f"n_tokens={n_tokens} is too short for the probes ({planted} planted tokens); use at least "
            f"{4 * planted} tokens"
        )
    if len(filler_ids) < body_len:
        raise ValueError(f"filler text has {len(filler_ids)} tokens; {body_len} are needed")
    start = int(rng.integers(0, len(filler_ids) - body_len + 1))
    body = filler_ids[start : start + body_len]
    bounds = sentence_boundaries(tokenizer, body)
    if len(bounds) < sum(len(g) for g in groups):
        raise ValueError("the filler text has too few sentence boundaries for the probes")
    spots: list[int] = []  # in (group, index in group) order: equal spots keep it
    for group in fact_ids:
        spots += [int(p) for p in np.sort(rng.choice(bounds, len(group), replace=True))]
    flat_ids = [ids for group in fact_ids for ids in group]
    ctx, starts = _insert(body, spots, flat_ids)
    flat_owner = [owner[gi] for gi, group in enumerate(fact_ids) for _ in group]
    for start_at, o in zip(starts, flat_owner):
        probes[o].depths.append(round(start_at / n_tokens, 3))
    for probe in probes:
        probe.depths.sort()
    return ctx, probes


def recall_probes(rng: np.random.Generator, tasks: tuple[str, ...]) -> list[tuple[Probe, list[str]]]:
    """The probes of ``tasks`` (names from :data:`PROBE_TASKS`) with their sentences in text order, drawn as
    :func:`make_probe_context` draws them (depths left empty)."""
    unknown = [t for t in tasks if t not in PROBE_TASKS]
    if unknown:
        raise ValueError(f"unknown probe tasks {unknown}; choose from {PROBE_TASKS}")
    groups, owner, probes = _facts(rng)
    return [(probes[owner[gi]], group) for gi, group in enumerate(groups) if probes[owner[gi]].task in tasks]


def plant_at_depths(
    tokenizer, filler_ids: list[int], n_tokens: int, sentences: list[tuple[str, float]], rng: np.random.Generator
) -> tuple[list[int], list[float]]:
    """A context of exactly ``n_tokens`` tokens: a random slice of ``filler_ids`` with each sentence inserted at the
    sentence boundary nearest to its depth (0 = start, 1 = end; equal spots keep the given order). Returns the
    context and each sentence's realised depth, in the order given."""
    if any(not 0.0 <= d <= 1.0 for _, d in sentences):
        raise ValueError(f"depths {[d for _, d in sentences]} must be within [0, 1]")
    fact_ids = [tokenizer(" " + text, add_special_tokens=False)["input_ids"] for text, _ in sentences]
    body_len = n_tokens - sum(map(len, fact_ids))
    if body_len < 3 * (n_tokens - body_len) or len(filler_ids) < body_len:
        raise ValueError(
            f"n_tokens={n_tokens} leaves {body_len} tokens of text around {n_tokens - body_len} planted ones (at "
            f"least 3x needed) and the filler has {len(filler_ids)}"
        )
    start = int(rng.integers(0, len(filler_ids) - body_len + 1))
    body = filler_ids[start : start + body_len]
    bounds = sentence_boundaries(tokenizer, body)
    if len(bounds) == 0:
        raise ValueError("the filler text has no sentence boundary to plant at")
    spots = [int(bounds[np.argmin(np.abs(bounds - d * body_len))]) for _, d in sentences]
    ctx, starts = _insert(body, spots, fact_ids)
    return ctx, [round(at / n_tokens, 4) for at in starts]


def plant_passkey(
    tokenizer, filler_ids: list[int], n_tokens: int, depth: float, rng: np.random.Generator
) -> tuple[list[int], Probe]:
    """A context of exactly ``n_tokens`` tokens: a random slice of ``filler_ids`` with a 5-digit pass key planted at
    the sentence boundary nearest to ``depth`` (0 = start, 1 = end), and its probe (the passkey wording above)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be within [0, 1]")
    key = str(rng.integers(10000, 99999))
    sentence = f"The pass key is {key}. Remember it. {key} is the pass key."
    ctx, (at_depth,) = plant_at_depths(tokenizer, filler_ids, n_tokens, [(sentence, depth)], rng)
    probe = Probe(
        "passkey",
        "What is the pass key mentioned in the text above? Answer with the number only.",
        key,
        [round(at_depth, 3)],
    )
    return ctx, probe
