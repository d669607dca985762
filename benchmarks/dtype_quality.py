"""Does reading in bf16 cost quality? The embedded model with its beacon adapter (trained in fp32), default settings,
loaded in float32 and in bfloat16, on two books no training saw (the bundled Wizard of Oz, the KJV excerpt).

Per book and context length N: the first N tokens are read, then the next ``--target`` tokens are scored
(continuation perplexity, the same read for both dtypes: ``fit-N`` plans it, condensing the oldest windows when N +
target exceeds the positions), and ``--decode`` tokens are generated greedily after the N context tokens: how many of
them agree with float32's before the first difference, and where that is. Rows go to
``benchmarks/results/dtype_quality.json`` with the relative perplexity difference of bf16 against fp32.

    python benchmarks/dtype_quality.py                      # 4K / 16K / 32K, both books (about 15 minutes, 2 threads)
    python benchmarks/dtype_quality.py --contexts 4096      # one length
    python benchmarks/dtype_quality.py --fast               # tiny model (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from _results import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BOOKS = {
    "wonderful_wizard_of_oz": None,
    "kjv_bible_excerpt": ROOT / "benchmarks" / "data" / "books" / "kjv_bible_excerpt.txt",
}


def _book_ids(bm, name: str, fast: bool) -> list[int]:
    import beacon_llm

    path = BOOKS[name] or beacon_llm.BUNDLED_BOOK
    text = beacon_llm.read_document(str(path))
    if fast:
        return [3 + (ord(c) % 100) for c in text[:4000]]
    return list(bm.tokenizer(text, add_special_tokens=False)["input_ids"])


def agreement(reference: list[int], other: list[int]) -> tuple[int, int | None]:
    """How many greedy tokens ``other`` shares with ``reference`` before the first difference, and where that is
    (None: none in the shorter of the two). Tokens after a difference follow different prefixes: one that happens to
    be equal there does not count as agreeing."""
    first = next((i for i, (x, y) in enumerate(zip(reference, other)) if x != y), None)
    return (min(len(reference), len(other)) if first is None else first), first


def measure(bm, ids: list[int], n: int, target: int, n_decode: int) -> dict:
    """Continuation perplexity of ids[n : n + target] after ids[:n], and greedy tokens after ids[:n]."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = bm.forward(ids[: n + target])
    nll = -float(out.token_logprobs[-target:].double().mean())
    seconds = time.perf_counter() - t0
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ids[:n], cache, planned_length=n + n_decode, return_token_logprobs=False)
        gen = bm.generate(None, cache=cache, max_new_tokens=n_decode, eos_token_id=[], return_dict_in_generate=True)
    return {"ppl": round(math.exp(nll), 4), "nll": nll, "read_seconds": round(seconds, 1), "tokens": gen.new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--target", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-8")
        base = tiny_beacon_model(cfg, max_position_embeddings=128)
        models = {"float32": base, "bfloat16": tiny_beacon_model(cfg, max_position_embeddings=128)}
        models["bfloat16"].model.to(torch.bfloat16)
        args.contexts, args.target, args.decode = [64, 200], 32, 8
    else:
        models = {dt: beacon_llm.load(dtype=dt, shared=False) for dt in ("float32", "bfloat16")}
    rows = []
    for name in BOOKS:
        for n in args.contexts:
            row: dict = {"book": name, "context": n, "target": args.target}
            for dt, bm in models.items():
                ids = _book_ids(bm, name, args.fast)
                if n + args.target > len(ids):
                    raise SystemExit(f"{name} has {len(ids)} tokens, fewer than context {n} + target {args.target}")
                row[dt] = measure(bm, ids, n, args.target, args.decode)
            a, b = row["float32"], row["bfloat16"]
            row["ppl_rel_diff"] = round(b["ppl"] / a["ppl"] - 1, 5)
            row["decode_agree"], row["decode_first_diff"] = agreement(a["tokens"], b["tokens"])
            row["decode_tokens"] = min(len(a["tokens"]), len(b["tokens"]))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("float32", "bfloat16")}
                             | {"ppl_fp32": a["ppl"], "ppl_bf16": b["ppl"]}), flush=True)  # fmt: skip
    out_path = Path(args.out) if args.out else RESULTS / f"dtype_quality{'_fast' if args.fast else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "rows": rows,
        "args": vars(args),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "max_abs_ppl_rel_diff": max(abs(r["ppl_rel_diff"]) for r in rows),
    }
    write_json(out_path, data)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
