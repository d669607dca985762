"""Ingest once, ask many: time of a first question about a long text and of a follow-up on the cached book.

Runs through the LangChain ``ChatBeacon`` (the path users take). Fast mode (``--fast``): a tiny random model and a
synthetic text, for CI smoke runs. Default: the embedded SmolLM2-135M-Instruct with its shipped beacons on the
bundled *Wonderful Wizard of Oz* (~55K tokens).

    python benchmarks/followup_latency.py            # embedded model, whole book
    python benchmarks/followup_latency.py --fast     # tiny model, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"


def first_token_speedup(rows: list[dict]) -> float:
    """The first question's time to its first token over the follow-ups' median (not their fastest: the speed-up
    of a typical follow-up, not of the luckiest one)."""
    first, follow = rows[0], rows[1:]
    return first["seconds_to_first_token"] / max(statistics.median(r["seconds_to_first_token"] for r in follow), 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny random model (CI smoke run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/followup_latency*.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from langchain_beacon import ChatBeacon

    import beacon_llm

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        bm = tiny_beacon_model(beacon_llm.BeaconConfig(window=64, ratios=(64,)), max_position_embeddings=2048)
        text = "".join(f"Line {i}: the keeper logged {i % 97} boats. " for i in range(900))
        name = "tiny random Llama (2 layers, hidden 32), window 64, ratio 64"
    else:
        bm = beacon_llm.load()
        text = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        name = "SmolLM2-135M-Instruct + shipped beacons"
    chat = ChatBeacon(engine=beacon_llm.BeaconEngine(bm), max_tokens=args.max_tokens)
    questions = ["Who is Toto?", "What does the Scarecrow want from the Wizard?", "Who is the Good Witch of the South?"]
    rows = []
    for q in questions:
        start = time.perf_counter()
        first_chunk = None
        final = None
        for chunk in chat.stream([("system", text), ("human", q)]):
            if first_chunk is None and chunk.content:
                first_chunk = time.perf_counter() - start
            final = chunk if final is None else final + chunk
        total = time.perf_counter() - start
        usage = final.usage_metadata
        rows.append(
            {
                "question": q,
                "seconds_total": round(total, 3),
                "seconds_to_first_token": round(first_chunk or total, 3),
                "input_tokens": usage["input_tokens"],
                "cache_read_tokens": usage["input_token_details"]["cache_read"],
                "output_tokens": usage["output_tokens"],
                "answer": final.content,
            }
        )
    speedup = first_token_speedup(rows)
    result = {
        "model": name,
        "text_tokens": chat.get_num_tokens(text),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
        "first_token_speedup_of_follow_ups": round(speedup, 1),
    }
    print(f"{name}: text of {result['text_tokens']} tokens")
    print(f"{'question':48} {'first token s':>13} {'total s':>8} {'read':>7} {'cached':>7}")
    for r in rows:
        read = r["input_tokens"] - r["cache_read_tokens"]
        print(
            f"{r['question']:48} {r['seconds_to_first_token']:13.2f} {r['seconds_total']:8.2f} {read:7d} "
            f"{r['cache_read_tokens']:7d}"
        )
    print(f"follow-up first-token speed-up (median follow-up): {speedup:.0f}x")
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"followup_latency{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
