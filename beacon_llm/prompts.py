"""Prompt layout: chat templating, the "document + question" prompt, and where the reusable prefix of a prompt ends.

Every entry point (the engine, the CLI, LangChain, LlamaIndex, the server) builds prompts through these functions,
so the same document always becomes the same token prefix and its condensed form can be reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SENTINEL = "\u2063\u2063BEACON\u2063\u2063"  # marks where a message's content goes in a rendered template
DEFAULT_INSTRUCTION = "Read the document and answer the question after it."


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (templates carry their own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> tuple[list[int], int]:
    """Token ids of a chat (the tokenizer's template) and the index where the last message starts (0 if unknown):
    everything before it is the prefix that a follow-up with the same earlier messages shares."""
    if not messages:
        raise ValueError("messages is empty")
    if not getattr(tokenizer, "chat_template", None):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + (
            "assistant: " if add_generation_prompt else ""
        )
        head = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
        ids = encode(tokenizer, text)
        head_ids = encode(tokenizer, head)
        return ids, len(head_ids) if ids[: len(head_ids)] == head_ids else 0
    full = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = encode(tokenizer, full)
    boundary = 0
    if len(messages) > 1:
        marked = list(messages[:-1]) + [{**messages[-1], "content": SENTINEL}]
        text = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
        head = text[: text.index(SENTINEL)]
        # the last message's opening (role header) belongs to the question; cut at the previous turn's end
        prev = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=False, tokenize=False)
        cut = prev if head.startswith(prev) else head
        head_ids = encode(tokenizer, cut)
        if ids[: len(head_ids)] == head_ids:
            boundary = len(head_ids)
    return ids, boundary


def document_prompt_text(
    tokenizer: Any,
    document: str,
    question: str,
    *,
    system: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> tuple[str, str]:
    """A one-turn chat "<document> + question" as two texts: (everything up to the question, the rest)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        rendered = f"{system + chr(10) if system else ''}{SENTINEL}\nAnswer: "
    head, tail = rendered.split(SENTINEL)
    return f"{head}{instruction}\n\n<document>\n{document}\n</document>\n\n", f"Question: {question}{tail}"


def document_prompt(
    tokenizer: Any,
    document: str,
    question: str,
    *,
    system: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> tuple[list[int], int]:
    """Ids of :func:`document_prompt_text` and the index where the question starts. The document part is tokenised
    on its own, so every question about it shares the exact same prefix."""
    prefix_text, rest_text = document_prompt_text(tokenizer, document, question, system=system, instruction=instruction)
    prefix = encode(tokenizer, prefix_text)
    return prefix + encode(tokenizer, rest_text), len(prefix)
