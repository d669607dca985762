"""Answer quality at an equal KV budget: trained beacons vs untrained beacons vs truncation vs StreamingLLM
(vs full attention where the context fits the base model's positions).

Each seeded sample hides two facts in held-out book text (The Wonderful Wizard of Oz, not used in training) at
random depths: a pass key and a "special magic number" (needle). The context is read once per method and both
questions are asked of forks of the same condensed cache. Every method except full attention sees the same number of
KV entries as the trained beacon memory after the context. Scores are exact match (the answer string appears in the
first 32 generated tokens), reported as k/n.

    python benchmarks/quality.py --lengths 16384 32768 --n 2 1   # the model card's table (2x / 4x of 8K positions)
    python benchmarks/quality.py --fast                           # tiny model, CI smoke run
"""

from __future__ import annotations

import argparse
import json
import string
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SINK = 4


def make_sample(tok, filler_ids: list[int], length: int, rng: np.random.Generator) -> tuple[list[int], list[dict]]:
    """Context ids with two facts planted at random depths, and the two questions with their answers."""
    key = str(rng.integers(10000, 99999))
    city = "".join(rng.choice(list(string.ascii_uppercase), 1)) + "".join(rng.choice(list("aeioulnrst"), 6))
    num = str(rng.integers(1000, 9999))
    facts = [
        (
            f" The pass key is {key}. Remember it. {key} is the pass key. ",
            "What is the pass key mentioned in the text above? Answer with the number only.",
            key,
            "passkey",
        ),
        (
            f" The special magic number of {city} is {num}. ",
            f"What is the special magic number of {city} mentioned in the text above? Answer with the number only.",
            num,
            "needle",
        ),
    ]
    fact_ids = [tok(f[0], add_special_tokens=False)["input_ids"] for f in facts]
    budget = length - sum(len(f) for f in fact_ids) - 64
    start = int(rng.integers(0, len(filler_ids) - budget))
    body = filler_ids[start : start + budget]
    depths = sorted(int(d) for d in rng.integers(0, len(body), 2))
    order = rng.permutation(2)
    ctx = body[: depths[0]] + fact_ids[order[0]] + body[depths[0] : depths[1]] + fact_ids[order[1]] + body[depths[1] :]
    questions = []
    for i, (_, q, answer, kind) in enumerate(facts):
        chat = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        depth = depths[list(order).index(i)] / len(body)
        questions.append(
            {
                "task": kind,
                "ids": tok(chat, add_special_tokens=False)["input_ids"],
                "answer": answer,
                "depth": round(depth, 2),
            }
        )
    return ctx, questions


def _plain_generate(model, ids: list[int], n_new: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=eos,
        )
    return out[0, len(ids) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument(
        "--n", type=int, nargs="+", default=[3], help="samples per length (one value, or one per length)"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer")
    parser.add_argument("--adapter", default=None, help="trained beacons (default: the shipped adapter)")
    parser.add_argument("--methods", nargs="+", default=["trained", "untrained", "truncation", "streamingllm", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=64, ratios=(2, 4, 8), ratio_mix="adapt-32")
        trained = tiny_beacon_model(cfg, max_position_embeddings=1024)
        untrained = tiny_beacon_model(cfg, max_position_embeddings=1024, perturb=0.0)
        lengths = args.lengths or [768, 1536]
    else:
        trained = beacon_llm.load(adapter=args.adapter, beacon_ratio_mix="adapt-1024")
        untrained = beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None), beacon_config=trained.config)
        lengths = args.lengths or [16384, 32768]
    native = trained.max_positions
    tok = trained.tokenizer
    eos = tok.eos_token_id
    book = beacon_llm.read_document(Path(beacon_llm.__file__).parent / "books" / "wonderful_wizard_of_oz.txt")
    filler = tok(book, add_special_tokens=False)["input_ids"]
    while len(filler) < 2 * max(lengths):
        filler = filler + filler
    rows = []
    counts = args.n if len(args.n) == len(lengths) else [args.n[0]] * len(lengths)
    for length, count in zip(lengths, counts):
        rng = np.random.default_rng([args.seed, length])
        for i in range(count):
            ctx, questions = make_sample(tok, filler, length, rng)
            budget = ratio = None
            results = {
                q["task"]: {
                    "task": q["task"],
                    "length": length,
                    "sample": i,
                    "answer": q["answer"],
                    "depth": q["depth"],
                    "context_tokens": len(ctx),
                }
                for q in questions
            }
            for method in args.methods:
                t0 = time.perf_counter()
                if method in ("trained", "untrained"):
                    bm = trained if method == "trained" else untrained
                    cache = bm.new_cache()
                    with torch.no_grad():
                        bm.forward(ctx, cache, return_token_logprobs=False)
                    if method == "trained":
                        budget = cache.get_seq_length()
                        ratio = cache.state.window_ratio
                for q in questions:
                    if method in ("trained", "untrained"):
                        with torch.no_grad():
                            out = bm.generate(
                                q["ids"],
                                cache=cache.fork(),
                                max_new_tokens=args.new_tokens,
                                return_dict_in_generate=True,
                            )
                        new = out.new_tokens
                    elif method == "full":
                        if len(ctx) + len(q["ids"]) + args.new_tokens > native:
                            results[q["task"]][method] = None
                            continue
                        new = _plain_generate(trained.model, ctx + q["ids"], args.new_tokens, eos)
                    else:
                        if budget is None:
                            raise ValueError("truncation/streamingllm need the 'trained' method first (KV budget)")
                        keep = budget - len(q["ids"])
                        kept = ctx[-keep:] if method == "truncation" else ctx[:SINK] + ctx[-(keep - SINK) :]
                        new = _plain_generate(trained.model, kept + q["ids"], args.new_tokens, eos)
                    text = tok.decode(new, skip_special_tokens=True)
                    results[q["task"]][method] = {"correct": q["answer"] in text, "output": text}
                for q in questions:
                    results[q["task"]]["kv_budget"], results[q["task"]]["ratio"] = budget, ratio
                    if results[q["task"]].get(method):
                        results[q["task"]][method]["seconds"] = round(time.perf_counter() - t0, 1)
            for r in results.values():
                rows.append(r)
                print(json.dumps({k: (v["correct"] if isinstance(v, dict) else v) for k, v in r.items()}), flush=True)
    table = {}
    tasks = sorted({r["task"] for r in rows})
    for length in lengths:
        for task in tasks:
            sel = [r for r in rows if r["length"] == length and r["task"] == task]
            table[f"{task}@{length}"] = {
                m: (f"{sum(r[m]['correct'] for r in sel)}/{len(sel)}" if all(r.get(m) for r in sel) else "n/a")
                for m in args.methods
            }
    print(f"{'task@length':18}" + "".join(f"{m:>14}" for m in args.methods))
    for key, vals in table.items():
        print(f"{key:18}" + "".join(f"{vals[m]:>14}" for m in args.methods))
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"quality{'_fast' if args.fast else ''}.json"
    out.write_text(json.dumps({"table": table, "rows": rows, "args": vars(args), "native_positions": native}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
