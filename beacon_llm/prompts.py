"""Prompt layout: chat templating, the "document + question" prompt, and where the reusable prefix of a prompt ends.

Every entry point (the engine, the CLI, LangChain, LlamaIndex, the server) builds prompts through these functions,
so the same document always becomes the same token prefix and its condensed form can be reused.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

SENTINEL = "\u2063\u2063BEACON\u2063\u2063"  # marks where a message's content goes in a rendered template
DEFAULT_INSTRUCTION = "Read the document and answer the question after it."


_ENCODING_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_ENCODING_LOCKS_GUARD = threading.Lock()


def _encoding_lock(tokenizer: Any) -> threading.Lock:
    """The lock held while ``tokenizer`` encodes. A fast tokenizer sets its ``split_special_tokens`` switch on the
    backend every thread shares, at every call, so a literal encoding (:func:`encode_literal`) and a plain one in
    another thread must not overlap; one lock per tokenizer object, however many engines or models share it."""
    with _ENCODING_LOCKS_GUARD:
        lock = _ENCODING_LOCKS.get(tokenizer)
        if lock is None:
            lock = _ENCODING_LOCKS[tokenizer] = threading.Lock()
        return lock


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (templates carry their own); a special token's spelling in
    ``text`` becomes that special token (a raw prompt may lay out its own turns)."""
    with _encoding_lock(tokenizer):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_literal(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a user's text in which the spelling of a special token stays plain text."""
    with _encoding_lock(tokenizer):
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def spells_special_token(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` contains the spelling of one of the tokenizer's added (control) tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return any(t.content and t.content in text for t in decoder.values())


def encode_parts(tokenizer: Any, parts: Sequence[tuple[str, bool]]) -> list[int]:
    """Token ids of template text and users' text (``True``) laid end to end. While no user's text spells a special
    token, the whole text is tokenised at once (the tokens of the plain concatenation); otherwise each part on its
    own and the users' literally, so a document that quotes ``<|im_end|>`` cannot close its turn or open another."""
    if not any(user and spells_special_token(tokenizer, text) for text, user in parts):
        return encode(tokenizer, "".join(text for text, _ in parts))
    ids: list[int] = []
    for text, user in parts:
        if text:
            ids += encode_literal(tokenizer, text) if user else encode(tokenizer, text)
    return ids


def _marker(i: int) -> str:
    return f"\u2063\u2063BEACON{i}\u2063\u2063"


def rendered_parts(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """The chat template's rendering of ``messages`` as (text, is the user's) parts: each message's content is a
    part of its own. Raises ``ValueError`` when a content spells a special token and the template changes contents
    (so they cannot be told apart from the template's own text)."""
    marked = [{**m, "content": _marker(i)} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
    parts: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        head, found, text = text.partition(_marker(i))
        if not found:
            break
        parts += [(head, False), (m["content"], True)]
    else:
        parts.append((text, False))
        full = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                             tokenize=False)  # fmt: skip
        if "".join(t for t, _ in parts) == full:
            return parts
    raise ValueError(
        "a message spells one of the tokenizer's special tokens, and this chat template changes message contents, "
        "so the spelling cannot be kept as text; remove the special-token text (e.g. <|im_end|>) from the message"
    )


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> tuple[list[int], int]:
    """Token ids of a chat (the tokenizer's template) and the index where the last message starts (0 if unknown):
    everything before it is the prefix that a follow-up with the same earlier messages shares. A message's spelling
    of a special token stays text (:func:`encode_parts`)."""
    if not messages:
        raise ValueError("messages is empty")
    if not getattr(tokenizer, "chat_template", None):
        parts = [p for m in messages for p in ((f"{m['role']}: ", False), (m["content"], True), ("\n", False))]
        ids = encode_parts(tokenizer, parts + ([("assistant: ", False)] if add_generation_prompt else []))
        head_ids = encode_parts(tokenizer, parts[: 3 * (len(messages) - 1)])
        return ids, len(head_ids) if ids[: len(head_ids)] == head_ids else 0
    literal = any(spells_special_token(tokenizer, m["content"]) for m in messages)

    def encode_messages(chat: Sequence[dict[str, str]], generation_prompt: bool) -> list[int]:
        if literal:
            return encode_parts(tokenizer, rendered_parts(tokenizer, chat, generation_prompt))
        return encode(tokenizer, tokenizer.apply_chat_template(list(chat), add_generation_prompt=generation_prompt,
                                                               tokenize=False))  # fmt: skip

    ids = encode_messages(messages, add_generation_prompt)
    boundary = 0
    if len(messages) > 1:
        marked = list(messages[:-1]) + [{**messages[-1], "content": SENTINEL}]
        text = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
        head = text[: text.index(SENTINEL)]
        # the last message's opening (role header) belongs to the question; cut at the previous turn's end
        prev = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=False, tokenize=False)
        head_ids = encode_messages(messages[:-1], False) if head.startswith(prev) else None
        if head_ids is None:  # the previous turns render differently alone: cut at the last message's role header
            head_ids = encode_parts(tokenizer, rendered_parts(tokenizer, marked, add_generation_prompt)[:-2]) if (
                literal) else encode(tokenizer, head)  # fmt: skip
        if ids[: len(head_ids)] == head_ids:
            boundary = len(head_ids)
    return ids, boundary


def _document_prompt_parts(
    tokenizer: Any, document: str, question: str, system: str | None, instruction: str
) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """:func:`document_prompt_text` as (text, is the user's) parts: (up to the question, the rest)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
    if getattr(tokenizer, "chat_template", None) and system and spells_special_token(tokenizer, system):
        rendered = rendered_parts(tokenizer, messages, add_generation_prompt=True)
    elif getattr(tokenizer, "chat_template", None):
        head, tail = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).split(SENTINEL)
        rendered = [(head, False), (SENTINEL, True), (tail, False)]
    else:
        rendered = ([(system, True), ("\n", False)] if system else []) + [(SENTINEL, True), ("\nAnswer: ", False)]
    cut = next(i for i, (text, user) in enumerate(rendered) if user and text == SENTINEL)
    prefix = [*rendered[:cut], (instruction, True), ("\n\n<document>\n", False), (document, True),
              ("\n</document>\n\n", False)]  # fmt: skip
    return prefix, [("Question: ", False), (question, True), *rendered[cut + 1 :]]


def document_prompt_text(
    tokenizer: Any,
    document: str,
    question: str,
    *,
    system: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> tuple[str, str]:
    """A one-turn chat "<document> + question" as two texts: (everything up to the question, the rest)."""
    prefix, rest = _document_prompt_parts(tokenizer, document, question, system, instruction)
    return "".join(t for t, _ in prefix), "".join(t for t, _ in rest)


def document_prompt(
    tokenizer: Any,
    document: str,
    question: str,
    *,
    system: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> tuple[list[int], int]:
    """Ids of :func:`document_prompt_text` and the index where the question starts. The document part is tokenised
    on its own, so every question about it shares the exact same prefix; a special token's spelling in the document,
    question, system prompt or instruction stays text (:func:`encode_parts`)."""
    prefix_parts, rest_parts = _document_prompt_parts(tokenizer, document, question, system, instruction)
    prefix = encode_parts(tokenizer, prefix_parts)
    return prefix + encode_parts(tokenizer, rest_parts), len(prefix)
