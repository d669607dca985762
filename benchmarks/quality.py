"""Answer quality at an equal KV budget: trained beacons vs untrained beacons vs truncation vs StreamingLLM
(vs full attention where the context fits the base model's positions).

Seeded passkey and needle tasks (``beacon_llm.tasks``) hide a fact at a random depth of held-out book text (The
Wonderful Wizard of Oz, not used in training) and ask for it at the end. Every method except full attention sees the
same number of KV entries as the trained beacon memory after reading the prompt. Scores are exact match (the answer
string appears in the first 16 generated tokens), reported as k/n.

    python benchmarks/quality.py --lengths 16384 32768 --n 4     # the model card's table (2x / 4x of 8K positions)
    python benchmarks/quality.py --fast                           # tiny model, CI smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SINK = 4


def _prompt_and_answer(sample, tokenizer) -> tuple[list[int], str]:
    first = next(i for i, t in enumerate(sample.labels) if t != -100)
    answer_ids = [t for t in sample.labels[first:] if t != tokenizer.eos_token_id]
    return sample.input_ids[:first], tokenizer.decode(answer_ids).strip()


def _plain_generate(model, ids: list[int], n_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", default=["passkey", "needle"])
    parser.add_argument("--n", type=int, default=4, help="samples per task and length")
    parser.add_argument("--adapter", default=None, help="trained beacons (default: the shipped adapter)")
    parser.add_argument("--methods", nargs="+", default=["trained", "untrained", "truncation", "streamingllm", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm.tasks import make_task

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=64, ratios=(2, 4, 8), ratio_mix="adapt-32")
        trained = tiny_beacon_model(cfg, max_position_embeddings=1024)
        untrained = tiny_beacon_model(cfg, max_position_embeddings=1024, perturb=0.0)
        lengths = args.lengths or [1024, 2048]
        native = 1024
    else:
        trained = beacon_llm.load(adapter=args.adapter, beacon_ratio_mix="adapt-1024")
        cfg = trained.config
        path = beacon_llm.loading.resolve_model(None)
        untrained = beacon_llm.from_pretrained(path, beacon_config=cfg)  # fresh beacons: copies of the base
        lengths = args.lengths or [16384, 32768]
        native = trained.max_positions
    tok = trained.tokenizer
    filler = beacon_llm.read_document(Path(beacon_llm.__file__).parent / "books" / "wonderful_wizard_of_oz.txt")
    rows = []
    for length in lengths:
        for task in args.tasks:
            rng = np.random.default_rng([args.seed, length, args.tasks.index(task)])
            for i in range(args.n):
                sample = make_task(task, filler, tok, length, rng)
                ids, answer = _prompt_and_answer(sample, tok)
                row = {"length": length, "task": task, "sample": i, "prompt_tokens": len(ids), "answer": answer}
                budget = None
                for method in args.methods:
                    t0 = time.perf_counter()
                    if method in ("trained", "untrained"):
                        bm = trained if method == "trained" else untrained
                        cache = bm.new_cache()
                        with torch.no_grad():
                            out = bm.generate(ids, cache=cache, max_new_tokens=16, return_dict_in_generate=True)
                        new = out.new_tokens
                        if method == "trained":
                            budget = cache.get_seq_length()
                            row["kv_budget"] = budget
                            row["ratio"] = cache.state.window_ratio
                    elif method == "full":
                        if len(ids) + 16 > native:
                            row[method] = None
                            continue
                        new = _plain_generate(trained.model, ids, 16)
                    else:
                        if budget is None:
                            raise ValueError("truncation/streamingllm need the 'trained' method first (KV budget)")
                        kept = ids[-budget:] if method == "truncation" else ids[:SINK] + ids[-(budget - SINK) :]
                        new = _plain_generate(trained.model, kept, 16)
                    text = tok.decode(new, skip_special_tokens=True)
                    row[method] = {
                        "correct": answer in text,
                        "output": text,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                rows.append(row)
                print(json.dumps({k: (v["correct"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
    table = {}
    for length in lengths:
        for task in args.tasks:
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
