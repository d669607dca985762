"""Perplexity of a book's continuation after a long prefix, at an equal KV budget.

The first ``--context`` tokens of held-out book text are read, then the next ``--target`` tokens are scored. Methods:
trained beacons, untrained (initialised) beacons, truncation (the most recent tokens that fit the beacon memory's KV
budget), StreamingLLM (4 sink tokens + recent tokens, same budget) and full attention (where it fits the positions).

    python benchmarks/perplexity.py --context 16384 --target 1024
    python benchmarks/perplexity.py --fast
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _plain_nll(model, context: list[int], target: list[int]) -> float:
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()  # (target, V)
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(target)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--context", type=int, nargs="+", default=None)
    parser.add_argument("--target", type=int, default=1024)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm

    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=64, ratios=(2, 4, 8), ratio_mix="adapt-64")
        trained = tiny_beacon_model(cfg, max_position_embeddings=1024)
        untrained = tiny_beacon_model(cfg, max_position_embeddings=1024, perturb=0.0)
        ids = [3 + (ord(c) % 100) for c in book]
        contexts, target = args.context or [512, 1536], min(args.target, 128)
    else:
        trained = beacon_llm.load(adapter=args.adapter, beacon_ratio_mix="adapt-1024")
        untrained = beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None), beacon_config=trained.config)
        ids = trained.tokenizer(book, add_special_tokens=False)["input_ids"]
        contexts, target = args.context or [4096, 16384, 32768], args.target
    rows = []
    for n in contexts:
        context, tgt = ids[:n], ids[n : n + target]
        row = {"context": n, "target": len(tgt)}
        for name, bm in (("trained", trained), ("untrained", untrained)):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = bm.forward(context + tgt)
            row[name] = round(math.exp(-float(out.token_logprobs[-len(tgt) :].mean())), 3)
            row[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
            if name == "trained":
                cache = bm.new_cache()
                with torch.no_grad():
                    bm.forward(context, cache, return_token_logprobs=False)
                row["kv_budget"] = budget = cache.get_seq_length()
                row["ratio"] = cache.state.window_ratio
        row["truncation"] = round(math.exp(_plain_nll(trained.model, context[-budget:], tgt)), 3)
        row["streamingllm"] = round(math.exp(_plain_nll(trained.model, context[:4] + context[-(budget - 4) :], tgt)), 3)
        fits = n + len(tgt) <= trained.max_positions
        row["full"] = round(math.exp(_plain_nll(trained.model, context, tgt)), 3) if fits else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out_path = Path(args.out) if args.out else RESULTS / f"perplexity{'_fast' if args.fast else ''}.json"
    out_path.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
