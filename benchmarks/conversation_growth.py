"""A conversation about a book that outgrows the follow-up room its condensed book kept.

``fit-N`` reads a book that does not fit the positions with a plan that keeps room for N tokens of follow-ups after
it. A conversation that grows past that room needs a plan that condenses more windows. The engine goes on from the
state it kept before the old plan's last condensed window (every window the old plan condensed is condensed alike by
the new one), instead of reading the whole book again. This script runs one conversation through LangChain's
``ChatBeacon`` (the path users take): each turn quotes a passage of the book and asks about it, so the history grows
by a few hundred tokens a turn. For every turn it records the tokens read, the tokens taken from the condensed book
and the time to the first token. For the turn that outgrows the room it also times a fresh engine reading the same
prompt from the start (what that turn cost before), and checks that both give the same answer.

    python benchmarks/conversation_growth.py          # embedded model, the bundled book (~55K tokens)
    python benchmarks/conversation_growth.py --fast   # tiny model, seconds
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"


def _timed_stream(chat: object, messages: list[tuple[str, str]]) -> tuple[object, float, float]:
    """The streamed answer (chunks summed), seconds to its first token and in all."""
    start = time.perf_counter()
    first = None
    final = None
    for chunk in chat.stream(messages):  # type: ignore[attr-defined]
        if first is None and chunk.content:
            first = time.perf_counter() - start
        final = chunk if final is None else final + chunk
    total = time.perf_counter() - start
    return final, first if first is not None else total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny random model (CI smoke run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--quote-tokens", type=int, default=300, help="tokens of the book each question quotes")
    parser.add_argument("--max-turns", type=int, default=12)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/conversation_growth*.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from langchain_beacon import ChatBeacon

    import beacon_llm

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        config = beacon_llm.BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-32")
        bm = tiny_beacon_model(config, max_position_embeddings=256)
        text = "".join(f"Line {i}: the keeper logged {i % 97} boats. " for i in range(15))
        name = "tiny random Llama (2 layers, hidden 32), window 16, ratio 4, fit-32, 256 positions"
        args.quote_tokens = min(args.quote_tokens, 12)
    else:
        bm = beacon_llm.load()
        text = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        name = "SmolLM2-135M-Instruct + shipped beacons"
    engine = beacon_llm.BeaconEngine(bm)
    chat = ChatBeacon(engine=engine, max_tokens=args.max_tokens, temperature=0.0)
    book = engine.encode(text)
    messages: list[tuple[str, str]] = [("system", text)]
    rows = []
    grown = None
    for turn in range(args.max_turns):
        start = (turn * 997 * args.quote_tokens) % max(len(book) - args.quote_tokens, 1)
        passage = engine.tokenizer.decode(book[start : start + args.quote_tokens])
        messages.append(("human", f'In the passage "{passage}", who is speaking, and to whom?'))
        answer, to_first, total = _timed_stream(chat, messages)
        usage = answer.usage_metadata  # type: ignore[attr-defined]
        cached = usage["input_token_details"]["cache_read"]
        row = {
            "turn": turn + 1,
            "input_tokens": usage["input_tokens"],
            "cache_read_tokens": cached,
            "read_tokens": usage["input_tokens"] - cached,
            "seconds_to_first_token": round(to_first, 3),
            "seconds_total": round(total, 3),
        }
        rows.append(row)
        print(
            f"turn {row['turn']:2d}: {row['input_tokens']:6d} tokens, {cached:6d} from the cache, "
            f"{row['read_tokens']:6d} read, first token after {to_first:7.2f} s"
        )
        if turn > 0 and cached < len(book):  # went back into the condensed book: the room was outgrown
            grown = row
            fresh_chat = ChatBeacon(engine=beacon_llm.BeaconEngine(bm, max_prefixes=0), max_tokens=args.max_tokens,
                                    temperature=0.0)  # fmt: skip
            fresh, fresh_first, _ = _timed_stream(fresh_chat, messages)
            row["fresh_read_seconds_to_first_token"] = round(fresh_first, 3)
            row["fresh_read_tokens"] = fresh.usage_metadata["input_tokens"]  # type: ignore[attr-defined]
            row["same_answer_as_a_fresh_read"] = fresh.content == answer.content  # type: ignore[attr-defined]
            print(
                f"         a fresh read of the same prompt: {row['fresh_read_tokens']} tokens read, first token "
                f"after {fresh_first:.2f} s; same answer: {row['same_answer_as_a_fresh_read']}"
            )
            break
        messages.append(("ai", answer.content))  # type: ignore[attr-defined]
    if grown is None:
        raise SystemExit(f"the conversation did not outgrow its room in {args.max_turns} turns: raise --max-turns")
    result = {
        "model": name,
        "book_tokens": len(book),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "max_tokens": args.max_tokens,
        "quote_tokens": args.quote_tokens,
        "rows": rows,
        "outgrown_turn": grown["turn"],
        "speedup_of_the_outgrown_turn": round(
            grown["fresh_read_seconds_to_first_token"] / max(grown["seconds_to_first_token"], 1e-9), 2
        ),
    }
    print(f"the turn that outgrew the room: {result['speedup_of_the_outgrown_turn']}x sooner than a fresh read")
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"conversation_growth{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
