"""What the ``fit-N`` schedule (the default: read raw what fits, condense only the oldest windows) costs and gains
against the official uniform ``adapt-1024`` mode, on the embedded model with its shipped beacons.

Two measurements, each next to truncation at the same KV budget and the plain model where the text fits its positions:

* planted pass keys: a 5-digit code at depths spread evenly over 10-90% of held-out book text (The Wonderful Wizard
  of Oz), ``--n`` samples per length; exact match of a greedy answer (16 tokens) to the chat-formatted question;
* continuation perplexity of the next ``--target`` tokens after ``--ppl-lengths`` tokens of the same book.

``truncation@fit`` keeps the last B tokens, B = the KV entries of the fit-N cache after the text; ``truncation@adapt``
the same with the adapt-1024 cache's entries.

    python benchmarks/fit_schedule.py                        # 4K / 12K / 16K / 32K x 10 keys; ppl at 8K / 16K / 32K
    python benchmarks/fit_schedule.py --lengths 4096 --n 3 --ppl-lengths
    python benchmarks/fit_schedule.py --fast                 # tiny model (CI smoke run)
    python benchmarks/fit_schedule.py --merge a.json b.json  # one file from runs made in parallel
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_json
from quality import greedy, prefill

RESULTS = Path(__file__).parent / "results"
METHODS = ("plain", "fit", "adapt", "truncation@fit", "truncation@adapt")


def passkey_table(rows: list[dict]) -> dict[str, dict[str, str]]:
    """k/n exact matches per length and method ("n/a" where a method did not run, e.g. plain past the positions)."""
    table = {}
    for length in sorted({r["length"] for r in rows}):
        sel = [r for r in rows if r["length"] == length]
        table[str(length)] = {
            m: (f"{sum(r[m]['correct'] for r in sel)}/{len(sel)}" if all(r[m] for r in sel) else "n/a") for m in METHODS
        }
    return table


def merge(paths: list[str], out: Path) -> None:
    """One results file from runs made in parallel (each with its own --lengths / --ppl-lengths and --out)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = sorted((r for p in parts for r in p["passkey_rows"]), key=lambda r: (r["length"], r["sample"]))
    ppl = sorted((r for p in parts for r in p["perplexity_rows"]), key=lambda r: r["context"])
    merged = {**parts[0], "complete": all(p["complete"] for p in parts), "passkey_table": passkey_table(rows),
              "passkey_rows": rows, "perplexity_rows": ppl, "merged_from": [p["args"] for p in parts]}  # fmt: skip
    merged.pop("args", None)
    write_json(out, merged)
    for length, vals in merged["passkey_table"].items():
        print(f"{length:>10}" + "".join(f"{vals[m]:>18}" for m in METHODS))
    print(f"wrote {out}")


def _nll(model, ids: list[int], n_target: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -n_target - 1 : -1].float()  # (target, V)
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[-n_target:])))


def _beacon_answer(bm, ctx: list[int], q_ids: list[int], new_tokens: int) -> tuple[list[int], int]:
    """Read ``ctx`` planned for the question and the answer, then answer; returns (answer ids, KV entries after ctx)."""
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ctx, cache, return_token_logprobs=False, planned_length=len(ctx) + len(q_ids) + new_tokens)
        budget = cache.get_seq_length()
        out = bm.generate(q_ids, cache=cache, max_new_tokens=new_tokens, return_dict_in_generate=True)
    return out.new_tokens, budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--n", type=int, default=10, help="pass keys per length (depths 10-90%% evenly)")
    parser.add_argument("--ppl-lengths", type=int, nargs="*", default=None)
    parser.add_argument("--target", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reserve", type=int, default=96, help="tokens of a length left for question and answer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--adapter", default=None, help="beacon adapter folder (default: the shipped one)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", nargs="+", default=None, help="merge these results files into --out and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge:
        merge(args.merge, Path(args.out) if args.out else RESULTS / "fit_schedule.json")
        return

    import beacon_llm
    from beacon_llm.probes import plant_passkey
    from beacon_llm.tasks import chat_prompt_ids

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        fit = tiny_beacon_model(beacon_llm.BeaconConfig(window=64, ratios=(2, 4, 8), ratio_mix="fit-64"),
                                max_position_embeddings=1024)  # fmt: skip
        lengths, n, ppl_lengths, target = args.lengths or [2048], min(args.n, 2), args.ppl_lengths or [1536], 64
    else:
        fit = beacon_llm.load(adapter=args.adapter)  # the adapter's saved default: fit-1024
        lengths = [4096, 12288, 16384, 32768] if args.lengths is None else args.lengths
        ppl_lengths = [8192, 16384, 32768] if args.ppl_lengths is None else args.ppl_lengths
        n, target = args.n, args.target
    if not fit.config.is_fit:
        raise SystemExit(f"the default config is {fit.config.ratio_mix}, not fit-N")
    adapt_cfg = beacon_llm.BeaconConfig.from_dict(fit.config.to_dict(), beacon_ratio_mix="adapt-1024")
    adapt = beacon_llm.BeaconModel(fit.model, adapt_cfg, fit.tokenizer)  # the same weights, the official mode
    tok, model, positions = fit.tokenizer, fit.model, fit.max_positions
    eos = tok.eos_token_id
    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    filler = tok(book, add_special_tokens=False)["input_ids"]
    if args.fast:
        filler = (filler * 2)[: 4 * max(lengths + ppl_lengths)]

    out_path = Path(args.out) if args.out else RESULTS / f"fit_schedule{'_fast' if args.fast else ''}.json"
    rows: list[dict] = []
    ppl_rows: list[dict] = []

    def save(final: bool = False) -> None:
        """Write what is measured so far (after every row: a long run keeps its results if it stops early)."""
        table = passkey_table(rows)
        if final:
            print(f"{'pass key':>10}" + "".join(f"{m:>18}" for m in METHODS))
            for length, vals in table.items():
                print(f"{length:>10}" + "".join(f"{vals[m]:>18}" for m in METHODS))
        RESULTS.mkdir(exist_ok=True)
        result = {
            "complete": final,
            "passkey_table": table,
            "passkey_rows": rows,
            "perplexity_rows": ppl_rows,
            "positions": positions,
            "config": {
                "fit": fit.config.ratio_mix,
                "adapt": adapt_cfg.ratio_mix,
                "window": fit.config.window,
                "ratios": list(fit.config.ratios),
            },  # fmt: skip
            "args": vars(args),
            "threads": torch.get_num_threads(),
        }
        write_json(out_path, result)
        if final:
            print(f"wrote {out_path}")

    for length in ppl_lengths:
        ids = filler[: length + target]
        row = {"context": length, "target": target}
        for name, bm in (("fit", fit), ("adapt", adapt)):
            cache = bm.new_cache()
            with torch.no_grad():  # the context, then the target in the same cache (planned for both)
                bm.forward(ids[:length], cache, return_token_logprobs=False, planned_length=len(ids))
                row[f"budget_{name}"] = budget = cache.get_seq_length()
                first = float(torch.log_softmax(cache.last_logits, -1)[ids[length]])
                out = bm.forward(ids[length:], cache)
            logps = [first, *out.token_logprobs.tolist()]  # log p of every target token
            row[name] = round(math.exp(-sum(logps) / len(logps)), 3)
            row[f"truncation@{name}"] = round(math.exp(_nll(model, ids[length - budget :], target)), 3)
        row["plain"] = round(math.exp(_nll(model, ids, target)), 3) if len(ids) <= positions else None
        ppl_rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    for length in lengths:
        for i in range(n):
            depth = 0.1 + 0.8 * i / max(n - 1, 1)
            rng = np.random.default_rng([args.seed, length, i])
            ctx, probe = plant_passkey(tok, filler, length - args.reserve, depth, rng)
            q_ids = chat_prompt_ids(tok, probe.question)
            row: dict = {"length": length, "sample": i, "depth": probe.depths[0], "answer": probe.answer}
            t0 = time.perf_counter()
            answers = {}
            answers["fit"], row["budget_fit"] = _beacon_answer(fit, ctx, q_ids, args.new_tokens)
            answers["adapt"], row["budget_adapt"] = _beacon_answer(adapt, ctx, q_ids, args.new_tokens)
            for name in ("fit", "adapt"):
                kept = ctx[-row[f"budget_{name}"] :]
                answers[f"truncation@{name}"] = greedy(model, prefill(model, kept), q_ids, args.new_tokens, eos)
            if len(ctx) + len(q_ids) + args.new_tokens <= positions:
                answers["plain"] = greedy(model, prefill(model, ctx), q_ids, args.new_tokens, eos)
            for method in METHODS:
                if method in answers:
                    text = tok.decode(answers[method], skip_special_tokens=True)
                    row[method] = {"correct": probe.score(text), "output": text}
                else:
                    row[method] = None
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps({k: (v["correct"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
            save()

    save(final=True)


if __name__ == "__main__":
    main()
