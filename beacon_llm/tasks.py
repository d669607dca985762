"""Data for beacon training: slices of plain text / JSONL files and generated long-context tasks.

Generated tasks (passkey, needle, key-value retrieval) follow paper v2 §3 / v3 §4 evaluations: a fact is hidden at a
random depth of filler text and asked for at the end; only the answer tokens are scored.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .documents import read_document

IGNORE = -100
TASKS = ("passkey", "needle", "kv")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not scored
    kind: str


def read_corpus(paths: Sequence[str | Path]) -> list[str]:
    """Texts of ``.jsonl`` files (field ``text``, one document per line) and of documents
    (:func:`beacon_llm.documents.read_document`: ``.txt``, ``.md``, ``.epub``, ``.pdf``). Raises ``FileNotFoundError``
    for a missing file and ``ValueError`` naming the file (and line) for one that is not UTF-8, not JSON Lines
    of objects with a string ``text`` field, or holds no text."""
    texts: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"training data file {path} does not exist")
        if path.suffix.lower() != ".jsonl":
            texts.append(read_document(path))
            continue
        found = 0
        try:
            with path.open(encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not a JSON line ({exc}); write one JSON object a line") from exc
                    if not isinstance(record, dict) or "text" not in record:
                        raise ValueError(f"{path}:{n}: JSONL records need to be objects with a 'text' field")
                    text = record["text"]
                    if not isinstance(text, str):
                        raise ValueError(
                            f"{path}:{n}: the 'text' field is {json.dumps(text)[:40]} ({type(text).__name__}), not a "
                            "string; give each record its text as a JSON string"
                        )
                    texts.append(text)
                    found += bool(text.strip())
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason}); convert it to UTF-8") from exc
        if not found:
            raise ValueError(f"{path}: no training text in it; remove it from the training files")
    if not texts:
        raise ValueError("no training text found in the given files")
    return texts


def chat_prompt_ids(tokenizer, user: str) -> list[int]:
    """Token ids of one user turn, ready for the assistant's answer (a plain "Answer:" cue without a template)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
    else:
        prompt = f"{user}\nAnswer: "
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _chat(tokenizer, user: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-formatted prompt + answer; labels only on the answer (and its end-of-turn token)."""
    p_ids = chat_prompt_ids(tokenizer, user)
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        a_ids = a_ids + [tokenizer.eos_token_id]
    return p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids


def _number_fact(kind: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """A pass key or needle to plant: (the fact's sentences, the value, what the value is of: "the pass key" /
    "the special magic number of <city>")."""
    if kind == "passkey":
        key = str(rng.integers(10000, 99999))
        return f" The pass key is {key}. Remember it. {key} is the pass key. ", key, "the pass key"
    city = "".join(rng.choice(list(string.ascii_uppercase), 1)) + "".join(rng.choice(list("aeioulnrst"), 6))
    num = str(rng.integers(1000, 9999))
    return f" The special magic number of {city} is {num}. ", num, f"the special magic number of {city}"


def make_task(kind: str, filler: str, tokenizer, n_tokens: int, rng: np.random.Generator) -> Sample:
    """A generated retrieval sample of about ``n_tokens`` tokens with the fact at a random depth."""
    if kind in ("passkey", "needle"):
        fact, answer, subject = _number_fact(kind, rng)
        where = " mentioned in the text above" if kind == "passkey" else ""
        question = f"What is {subject}{where}? Answer with the number only."
    elif kind == "kv":
        pairs = {f"{rng.integers(16**6):06x}": f"{rng.integers(16**6):06x}" for _ in range(8)}
        key = list(pairs)[int(rng.integers(len(pairs)))]
        fact = " Key-value table: " + json.dumps(pairs) + " "
        question, answer = (
            f'In the key-value table above, what is the value of key "{key}"? Answer with it only.',
            pairs[key],
        )
    else:
        raise ValueError(f"unknown task {kind!r}; choose from {TASKS}")
    tail_ids, tail_labels = _chat(tokenizer, question, answer)
    fact_ids = tokenizer(fact, add_special_tokens=False)["input_ids"]
    budget = max(n_tokens - len(tail_ids) - len(fact_ids), 16)
    filler_ids = tokenizer(filler, add_special_tokens=False)["input_ids"]
    if len(filler_ids) < budget:
        raise ValueError(f"filler text has {len(filler_ids)} tokens, {budget} are needed")
    start = int(rng.integers(0, len(filler_ids) - budget + 1))
    body = filler_ids[start : start + budget]
    depth = int(rng.integers(0, len(body) + 1))
    ctx = body[:depth] + fact_ids + body[depth:]
    return Sample(ctx + tail_ids, [IGNORE] * len(ctx) + tail_labels, kind)


RECALL_TASKS = ("passkey", "needle")


def make_condensed_recall(
    kind: str, filler_ids: Sequence[int], tokenizer, *, window: int, windows: int, tail: int, keep_raw: int,
    rng: np.random.Generator, raw_head: int = 0,
) -> tuple[Sample, int]:  # fmt: skip
    """A fact planted in the first ``windows`` windows of a slice of ``filler_ids`` (more when the fact needs them;
    the count is returned with the sample) (never in their first
    ``raw_head``, the sink, nor in their last ``keep_raw``, the overlap read again raw), ``tail`` raw filler tokens
    after them, then the question and the answer in the words the model itself starts with ("The pass key is
    70370."). Only the asked value is labelled: what training the beacons to carry a fact asks of them (paper v2
    §3.1 mixes such synthetic tasks into fine-tuning)."""
    if kind not in RECALL_TASKS:
        raise ValueError(f"unknown recall task {kind!r}; choose from {RECALL_TASKS}")
    fact, value, subject = _number_fact(kind, rng)
    question = f"What is {subject} mentioned in the text above? Answer with the number only."
    lead = f"{subject[0].upper()}{subject[1:]} is"
    fact_ids = tokenizer(fact, add_special_tokens=False)["input_ids"]
    windows = max(windows, -(-(raw_head + len(fact_ids) + keep_raw) // window))  # the fewest that hold the fact
    condensed = windows * window
    room = condensed - keep_raw - len(fact_ids)
    body_len = condensed + tail - len(fact_ids)
    if len(filler_ids) < body_len:
        raise ValueError(f"filler text has {len(filler_ids)} tokens, {body_len} are needed")
    start = int(rng.integers(0, len(filler_ids) - body_len + 1))
    body = list(filler_ids[start : start + body_len])
    depth = int(rng.integers(raw_head, room + 1))
    prompt = chat_prompt_ids(tokenizer, question)
    lead_ids = tokenizer(lead, add_special_tokens=False)["input_ids"]
    value_ids = tokenizer(" " + value, add_special_tokens=False)["input_ids"]
    end_ids = tokenizer(".", add_special_tokens=False)["input_ids"]
    ids = body[:depth] + fact_ids + body[depth:] + prompt + lead_ids + value_ids + end_ids
    labels = [IGNORE] * (len(ids) - len(value_ids) - len(end_ids)) + value_ids + [IGNORE] * len(end_ids)
    return Sample(ids, labels, kind), windows


SPAN_TASK = "span"
CONDENSED_TASKS = (*RECALL_TASKS, SPAN_TASK)  # what a fit-regime training sample can ask of the condensed windows
SPAN_PAIRS, SPAN_CUE, SPAN_TOKENS = 4, 16, 32  # the span task's default shape: pairs of (cue, span) tokens


def make_condensed_spans(
    filler_ids: Sequence[int], *, window: int, windows: int, tail: int, keep_raw: int, rng: np.random.Generator,
    raw_head: int = 0, pairs: int = SPAN_PAIRS, cue: int = SPAN_CUE, span: int = SPAN_TOKENS,
) -> tuple[Sample, int]:  # fmt: skip
    """Verbatim recall of the condensed text: ``windows`` windows of ``filler_ids`` to condense (more when the pairs
    need them; the count is returned with the sample), ``tail`` raw tokens after them, then ``pairs`` times a cue
    (``cue`` tokens copied from the condensed part) and the ``span`` tokens that follow it there; only the spans are
    labelled. Every span lies where only the beacons hold it (after the first ``raw_head``, before the last
    ``keep_raw`` read again raw), the pairs do not overlap and come in a random order. A pass key asked for as "The
    pass key is" is such a cue and span; these give the condensed windows ``pairs * span`` labelled tokens instead of
    a value's five (the autoencoding objective of compression work, asked the way a model reads: continue the quoted
    text)."""
    if pairs < 1 or cue < 1 or span < 1:
        raise ValueError(f"pairs={pairs}, cue={cue} and span={span} must be >= 1")
    piece = cue + span
    windows = max(windows, -(-(raw_head + pairs * piece + keep_raw) // window))  # the fewest that hold the pairs
    room = windows * window - keep_raw - raw_head  # where only the beacons hold the text
    total = windows * window + tail
    if len(filler_ids) < total:
        raise ValueError(f"filler text has {len(filler_ids)} tokens, {total} are needed")
    start = int(rng.integers(0, len(filler_ids) - total + 1))
    body = list(filler_ids[start : start + total])
    cuts = np.sort(rng.integers(0, room - pairs * piece + 1, pairs))  # the free tokens, spread over the gaps
    starts = [raw_head + int(c) + k * piece for k, c in enumerate(cuts)]  # non-overlapping, in text order
    ids, labels = list(body), [IGNORE] * len(body)
    for s in rng.permutation(starts):
        ids += body[s : s + piece]
        labels += [IGNORE] * cue + body[s + cue : s + piece]
    return Sample(ids, labels, SPAN_TASK), windows


class SampleStream:
    """Endless, seeded samples: text slices of ``seq_len`` tokens (LM loss on every token) mixed with generated
    tasks at ``task_rate``. Its whole state is the numpy generator, so training resumes exactly."""

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer,
        seq_len: int,
        *,
        task_rate: float = 0.0,
        tasks: Sequence[str] = TASKS,
        seed: int = 0,
    ) -> None:
        if not 0 <= task_rate <= 1:
            raise ValueError(f"task_rate={task_rate} must be within [0, 1]")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.task_rate = task_rate
        self.tasks = tuple(tasks)
        self.texts = list(texts)
        tokenized = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.texts]
        self.token_texts = [t for t in tokenized if len(t) >= 2]
        if not self.token_texts:
            raise ValueError("training texts are empty after tokenisation")
        # a generated task hides its fact in at most max(seq_len, 16) filler tokens (make_task): only texts that long
        # are drawn as its filler, so a short text in the corpus never fails a task sample
        need = max(seq_len, 16)
        self.filler_texts = [t for t, ids in zip(self.texts, tokenized) if len(ids) >= need]
        if task_rate > 0 and not self.filler_texts:
            raise ValueError(
                f"task_rate={task_rate} needs a training text of at least {need} tokens to hide the generated tasks' "
                f"facts in, the longest has {max(map(len, tokenized))}; give a longer text, a smaller seq_len or "
                "task_rate=0"
            )
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        rng = self.rng
        if self.task_rate and rng.random() < self.task_rate:
            kind = self.tasks[int(rng.integers(len(self.tasks)))]
            source = self.filler_texts[int(rng.integers(len(self.filler_texts)))]
            return make_task(kind, source, self.tokenizer, self.seq_len, rng)
        ids = self.token_texts[int(rng.integers(len(self.token_texts)))]
        if len(ids) <= self.seq_len:
            return Sample(list(ids), list(ids), "text")
        start = int(rng.integers(0, len(ids) - self.seq_len + 1))
        piece = ids[start : start + self.seq_len]
        return Sample(piece, list(piece), "text")
