"""Facts in the condensed part of a long text: beacons against truncation, StreamingLLM and RAG at the same KV budget.

Each sample is a slice of held-out book text (the bundled Oz or the King James Bible excerpt; the beacons never trained
on either) of ``length - reserve`` tokens with four probes planted (``beacon_llm.probes``):

* a pass key and a sentence-level needle ("The special magic number of X is N.") at depths spread evenly over 10% ..
  the end of the part the default settings condense (at most 90%), in reversed order for the needle: both lie in the
  condensed text, none in the raw part or the overlap read again after it;
* a two- and a three-fact chain (BABILong-style, "Where is the brass key?"), sentences at random depths over the text.

Methods, each answering the chat-formatted question greedily (``--new-tokens``), exact match (``Probe.score``):
``beacons`` (the adapter with the default inference settings, reading the text as ``ask`` does), ``truncation``
(the last B tokens, B = the beacon cache's KV entries after the text), ``streamingllm`` (4 sink tokens + the last
B - 4), ``rag`` (top 128-token chunks by all-MiniLM-L6-v2 that fill B, in document order) and ``plain_4k``: the plain
model over a 4K-token text with the same facts at the same depths (what the base model can do where it reads well;
full attention over the long text does not fit its positions).

    python benchmarks/condensed_recall.py                           # 16K and 32K, 10 samples per book and length
    python benchmarks/condensed_recall.py --lengths 16384 --n 2
    python benchmarks/condensed_recall.py --fast                    # tiny model, mock embeddings (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_json
from quality import SINK, ChunkRetriever, greedy, prefill

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BOOKS = ROOT / "benchmarks" / "data" / "books"
METHODS = ("beacons", "truncation", "streamingllm", "rag", "plain_4k")
TASKS = ("passkey", "needle", "chain2", "chain3")


def depth_schedule(n: int, low: float, high: float) -> list[float]:
    """``n`` depths evenly spread over [low, high] (one at ``low`` when n = 1)."""
    if high < low:
        raise ValueError(f"the condensed part ends at depth {high:.3f}, before {low}: use a longer text")
    return [round(float(d), 4) for d in np.linspace(low, high, n)] if n > 1 else [low]


def table_of(rows: list[dict], methods: list[str]) -> dict[str, dict[str, str]]:
    """k/n per (task, length) and per length over all tasks."""
    out: dict[str, dict[str, str]] = {}
    keys = [(t, n) for n in sorted({r["length"] for r in rows}) for t in (*TASKS, "all")]
    for task, length in keys:
        sel = [r for r in rows if r["length"] == length and (task == "all" or r["task"] == task)]
        if sel:
            out[f"{task}@{length}"] = {m: f"{sum(r[m]['correct'] for r in sel)}/{len(sel)}" for m in methods}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--n", type=int, default=10, help="samples per book and length")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--reserve", type=int, default=96, help="tokens left for the question and the answer")
    parser.add_argument("--chunk", type=int, default=128, help="RAG chunk size in tokens")
    parser.add_argument("--adapter", default=None, help="beacon adapter folder (default: the shipped one)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm.probes import plant_at_depths, recall_probes
    from beacon_llm.schedule import fit_plan, planned_read_length
    from beacon_llm.tasks import chat_prompt_ids

    if args.fast:
        from llama_index.core.embeddings import MockEmbedding

        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=64, ratios=(4, 8), ratio_mix="fit-32", fit_overlap=8)
        bm = tiny_beacon_model(cfg, max_position_embeddings=2048)
        embed = MockEmbedding(embed_dim=16) if "rag" in args.methods else None
        book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        texts = {"oz (bundled)": book, "oz (later)": book[len(book) // 2 :]}
        lengths, short, args.n = args.lengths or [4096], 1536, min(args.n, 1)
    else:
        from rag_vs_beacon import minilm_embedding

        bm = beacon_llm.load(adapter=args.adapter, shared=False)
        embed = minilm_embedding() if "rag" in args.methods else None
        texts = {
            "oz (bundled)": beacon_llm.read_document(beacon_llm.BUNDLED_BOOK),
            "kjv excerpt": (BOOKS / "kjv_bible_excerpt.txt").read_text(),
        }
        lengths, short = args.lengths or [16384, 32768], 4096
    tok, plain, cfg = bm.tokenizer, bm.model, bm.config
    eos = tok.eos_token_id
    rows: list[dict] = []
    seconds = {m: 0.0 for m in args.methods}
    for book, text in texts.items():
        filler = tok(text, add_special_tokens=False)["input_ids"]
        for length in lengths:
            n_ctx = length - args.reserve
            rng = np.random.default_rng([args.seed, length, len(book)])
            planned = planned_read_length(cfg, bm.max_positions, length, args.new_tokens, n_ctx)
            plan = fit_plan(cfg, planned, bm.max_positions)
            fact_room = 48  # tokens of the longest planted fact, kept clear of the raw part
            high = min(0.9, (plan.raw_from - plan.overlap - fact_room) / n_ctx)
            key_depths = depth_schedule(args.n, 0.1, high)
            for sample in range(args.n):
                probes = recall_probes(rng, TASKS)
                sentences: list[tuple[str, float]] = []
                owners: list[int] = []
                for i, (probe, group) in enumerate(probes):
                    if probe.task == "passkey":
                        depths = [key_depths[sample]]
                    elif probe.task == "needle":
                        depths = [key_depths[-1 - sample]]
                    else:
                        depths = sorted(rng.uniform(0.05, 0.95, len(group)).tolist())
                    sentences += list(zip(group, depths))
                    owners += [i] * len(group)
                ctx, realised = plant_at_depths(tok, filler, n_ctx, sentences, rng)
                short_ctx, _ = plant_at_depths(tok, filler, short - args.reserve, sentences, rng)
                questions = [chat_prompt_ids(tok, p.question) for p, _ in probes]
                found = [
                    {"book": book, "length": length, "sample": sample, "task": p.task, "answer": p.answer,
                     "depths": [d for d, o in zip(realised, owners) if o == i]}
                    for i, (p, _) in enumerate(probes)
                ]  # fmt: skip
                t_read = time.perf_counter()
                cache = bm.new_cache()
                with torch.no_grad():
                    bm.forward(ctx, cache, planned_length=planned, return_token_logprobs=False)
                budget = cache.get_seq_length()
                read_s = time.perf_counter() - t_read
                if cache.state.fit_plan != plan:
                    raise RuntimeError(f"the read planned {cache.state.fit_plan}, the probes were placed for {plan}")
                for method in args.methods:
                    t0 = time.perf_counter()
                    kv = None
                    if method == "truncation":
                        kv = prefill(plain, ctx[-budget:])
                    elif method == "streamingllm":
                        kv = prefill(plain, ctx[:SINK] + ctx[-(budget - SINK) :])
                    elif method == "plain_4k":
                        kv = prefill(plain, short_ctx)
                    elif method == "rag":
                        retriever = ChunkRetriever(tok, ctx, args.chunk, embed)
                    for (probe, _), q_ids, row in zip(probes, questions, found):
                        with torch.no_grad():
                            if method == "beacons":
                                new = bm.generate(q_ids, cache=cache.fork(), max_new_tokens=args.new_tokens,
                                                  return_dict_in_generate=True).new_tokens  # fmt: skip
                            elif method == "rag":
                                kept = retriever.context(probe.question, budget)
                                new = greedy(plain, None, kept + q_ids, args.new_tokens, eos)
                            else:
                                new = greedy(plain, kv, q_ids, args.new_tokens, eos)
                        answer = tok.decode(new, skip_special_tokens=True)
                        row[method] = {"correct": probe.score(answer), "output": answer}
                    seconds[method] += time.perf_counter() - t0 + (read_s if method == "beacons" else 0.0)
                for row in found:
                    row["kv_budget"] = budget
                rows += found
                line = {m: sum(r[m]["correct"] for r in found) for m in args.methods}
                print(json.dumps({"book": book, "length": length, "sample": sample, "budget": budget, **line}),
                      flush=True)  # fmt: skip
    table = table_of(rows, args.methods)
    print(f"{'task@length':18}" + "".join(f"{m:>14}" for m in args.methods))
    for key, vals in table.items():
        print(f"{key:18}" + "".join(f"{vals[m]:>14}" for m in args.methods))
    result = {
        "table": table,
        "rows": rows,
        "seconds_per_method": {m: round(s, 1) for m, s in seconds.items()},
        "adapter": args.adapter or "shipped",
        "dtype": str(plain.dtype).replace("torch.", ""),
        "fit_overlap": cfg.fit_overlap,
        "args": vars(args),
    }
    out = Path(args.out) if args.out else RESULTS / f"condensed_recall{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
