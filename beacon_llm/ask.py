"""``beacon-llm ask`` / ``beacon-llm chat``: read a whole document once, answer questions about it."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Any

from .cli_errors import EXIT_USAGE, CliError
from .documents import DocumentError, read_document

DEFAULT_SYSTEM = "You are a helpful assistant. Answer questions about the document briefly and accurately."
# the engine's names of the generation options (in its messages) -> the command line's
_OPTION_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "repetition_penalty": "--repetition-penalty",
}


def check_options(args: argparse.Namespace) -> None:
    """The generation options, checked as the engine checks them but before anything is loaded or read (``chat``
    would otherwise refuse them only at the first question): raises :class:`CliError` naming the flag."""
    from .generation import check_sampling_options

    try:
        check_sampling_options(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
        )
    except ValueError as exc:
        message = str(exc)
        for name, flag in _OPTION_FLAGS.items():
            if message.startswith(f"{name}="):
                message = flag + message[len(name) :]
                break
        raise CliError(message) from None


def load_for_cli(args: argparse.Namespace) -> Any:
    import torch

    from .loading import DEFAULT_ANSWER_RESERVE, inference_overrides, load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {}
    if args.ratio:
        overrides["beacon_ratio"] = list(args.ratio)
    if args.ratio_mix:
        overrides["beacon_ratio_mix"] = args.ratio_mix
    # default: read raw what fits the positions, condense only the oldest windows of the rest (at the largest ratio)
    overrides = inference_overrides(overrides, max(args.max_new_tokens, DEFAULT_ANSWER_RESERVE))
    if args.window is not None:
        overrides["beacon_window"] = args.window
    try:
        return load(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device, **overrides)
    except (ValueError, OSError, RuntimeError) as exc:
        raise CliError(f"cannot load the model: {exc}") from exc


class _Progress:
    """tqdm bar: tokens read, tokens/s, condensed memory size, chosen ratio."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="tok", desc="reading", disable=quiet, file=sys.stderr, smoothing=0.1)

    def __call__(self, n: int, cache: Any) -> None:
        self.bar.update(n)
        size = cache.kv_by_kind()
        ratio = cache.state.window_ratio
        shown = "raw" if ratio == 0 else (ratio if ratio > 0 else "-")
        self.bar.set_postfix(memory=size["total"], condensed=size["condensed"], ratio=shown, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _answer(engine: Any, text: str, question: str, args: argparse.Namespace, path: str) -> int:
    from .embedded import home

    ids, boundary = engine.document_prompt(text, question, system=DEFAULT_SYSTEM)
    progress = _Progress(len(ids), args.quiet)
    t0 = time.perf_counter()
    first_token = None
    completion = None
    try:
        stream = engine.stream(
            ids,
            boundary=boundary,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            progress=progress,
        )
        try:
            first = next(stream)  # reads the document: a prompt that cannot fit is refused before any reading
        except ValueError as exc:
            raise CliError(f"{path}: {exc}") from exc
        for item in itertools.chain([first], stream):
            if isinstance(item, str):
                if first_token is None:
                    progress.close()
                    first_token = time.perf_counter() - t0
                sys.stdout.write(item)
                sys.stdout.flush()
            else:
                completion = item
    finally:
        progress.close()
    sys.stdout.write("\n")
    sys.stdout.flush()  # a closed pipe fails here, where main() answers it, not in the interpreter's flush at exit
    u = completion.usage
    if not args.quiet:
        where = "cache in memory, --no-cache" if args.no_cache else f"cache in {home() / 'books'}"
        first = "no text" if first_token is None else f"first token after {first_token:.1f} s"
        print(
            f"[read {u.read_tokens} of {u.input_tokens} prompt tokens ({u.cache_read_tokens} from the condensed-book "
            f"{where}), {first}, {u.output_tokens} tokens generated, {completion.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _engine(args: argparse.Namespace) -> tuple[Any, str]:
    from .embedded import home
    from .engine import BeaconEngine

    try:
        text = read_document(args.document)
    except DocumentError as exc:
        raise CliError(str(exc)) from exc
    bm = load_for_cli(args)
    if bm.tokenizer is None:
        raise CliError("the model has no tokenizer")
    return BeaconEngine(bm, cache_dir=None if args.no_cache else home() / "books"), text


def cmd_ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise CliError("the question is empty")
    check_options(args)
    engine, text = _engine(args)
    return _answer(engine, text, args.question, args, args.document)


def _document_tokens(engine: Any, text: str, args: argparse.Namespace) -> int:
    """The document's tokens in every question's prompt; a document that leaves no room for a question and its answer
    is refused (:class:`CliError`) before the first question is asked."""
    ids, boundary = engine.document_prompt(text, "?", system=DEFAULT_SYSTEM)
    try:
        engine.check_fits(len(ids), args.max_new_tokens)
    except ValueError as exc:
        raise CliError(f"{args.document}: {exc}") from exc
    return boundary


def cmd_chat(args: argparse.Namespace) -> int:
    """Answer questions until an empty line or end of input. A question that cannot be answered (too long) is
    refused with the reason and the session goes on, as it does after Ctrl-C stops an answer; the exit code is
    :data:`EXIT_USAGE` if any question was refused. The document is read once: later questions reuse its condensed
    form."""
    check_options(args)
    engine, text = _engine(args)
    document_tokens = _document_tokens(engine, text, args)
    print("Ask about the document (empty line or Ctrl-D to quit; Ctrl-C stops an answer).", file=sys.stderr)
    refused = False
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            _answer(engine, text, question, args, args.document)
        except CliError as exc:
            refused = True
            print(
                f"beacon-llm: error: {exc}\nThis question was not answered (the document takes {document_tokens} of "
                "the prompt's tokens): ask a shorter one, or quit with an empty line or Ctrl-D.",
                file=sys.stderr,
            )
        except KeyboardInterrupt:  # stops this question only: a document read to its end stays stored for the
            sys.stdout.write("\n")  # next one (one interrupted while being read is read again)
            sys.stdout.flush()
            print("[interrupted]", file=sys.stderr)
    return EXIT_USAGE if refused else 0
