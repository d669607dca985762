"""Perplexity of a held-out book's continuation after a long prefix, beacons against baselines at an equal KV budget.

For each held-out book (the bundled Oz and the King James Bible excerpt; the beacons never trained on either) and
each context length N, ``--samples`` spans of N + ``--target`` tokens are taken at evenly spaced offsets; the model
reads the first N tokens and the next ``--target`` tokens are scored. Two reading settings:

* ``default``: the shipped adapter with the default inference settings (``fit-1024``: only the oldest windows that do
  not fit the base model's positions are condensed, at the largest ratio; the rest is read raw);
* ``condensed r<R>`` (``--condensed``): the same settings, with every full window of the context condensed at ratio R
  (the hard case: the target is read raw after the beacons and the adapter's overlap, if it has one).

Baselines with the same KV budget B (the entries the beacon cache holds when the target starts): truncation (the last
B tokens), StreamingLLM (the first 4 tokens + the last B - 4) and full attention where context + target fit the
positions. ``raw_part_only``: the plain model reading only the raw tokens the beacon cache holds (B minus its
beacons): what the beacons add is the distance from it. Gap closure = (truncation - beacons) / (truncation - full
attention), from the perplexities, where full attention fits. Perplexities pool every scored token of a (book,
setting, length). ``paired``: beacons against each baseline span by span (mean NLL difference per token, its standard
error over the spans, spans won), so a difference can be told from the spread between spans.

    python benchmarks/perplexity.py                       # 16K and 32K (default), 7,680 (condensed r32)
    python benchmarks/perplexity.py --adapter DIR --out x.json
    python benchmarks/perplexity.py --fast
    python benchmarks/perplexity.py --paired benchmarks/results/perplexity.json  # add the paired comparison only
    python benchmarks/perplexity.py --paired x.json --against benchmarks/results/perplexity.json  # adapter vs adapter
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from _results import mean_and_standard_error, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BOOKS = ROOT / "benchmarks" / "data" / "books"


def _plain_nll(model, context: list[int], target: list[int]) -> float:
    """Summed NLL of ``target`` after ``context`` by the plain model (``context``: at least one token, the one that
    predicts the first target token)."""
    if not context:
        raise ValueError("the plain model needs at least one context token to score the first target token")
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()  # (target, V)
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum"))


def _beacon_nll(bm, context: list[int], target: list[int], condense_ratio: int | None) -> tuple[float, int, int]:
    """Summed NLL of ``target`` read after ``context`` in one beacon call, the KV entries held when it starts and how
    many of them are raw tokens (the overlap and the raw part after the beacons).
    ``condense_ratio``: plan the read with every full window of the context condensed at that ratio."""
    from beacon_llm.schedule import FitPlan

    cache = bm.new_cache()
    if condense_ratio is not None:
        cfg = bm.config
        windows = len(context) // cfg.window
        cache.set_fit_plan(FitPlan(len(context) + len(target), condense_ratio, windows, cfg.window, cfg.sink_size,
                                   cfg.fit_overlap))  # fmt: skip
    with torch.no_grad():
        out = bm.forward(context + target, cache)
    nll = -float(out.token_logprobs[-len(target) :].double().sum())
    plan = cache.state.fit_plan
    entries = plan.entries(len(context))
    return nll, entries, entries - plan.condensed_entries


def last(ids: list[int], n: int) -> list[int]:
    """The last ``n`` tokens of ``ids`` (none for n = 0: ``ids[-0:]`` would be all of them; all for n >= len)."""
    return ids[max(len(ids) - n, 0) :] if n > 0 else []


def baseline_contexts(context: list[int], budget: int, n_raw: int) -> dict[str, list[int]]:
    """What each plain baseline reads before the target: truncation the last ``budget`` tokens, StreamingLLM the
    first 4 + the last ``budget`` - 4, ``raw_part_only`` the ``n_raw`` raw tokens the beacon cache holds (when every
    kept entry is a beacon, only the token before the target, which the first target token needs; never the whole
    context, as ``context[-0:]`` would be)."""
    return {"truncation": last(context, budget), "streamingllm": context[: min(4, budget)] + last(context, budget - 4),
            "raw_part_only": last(context, max(n_raw, 1))}  # fmt: skip


def _spans(n_ids: int, length: int, samples: int) -> list[int]:
    if n_ids < length:
        raise ValueError(f"the book has {n_ids} tokens, fewer than the {length} a span needs")
    if samples == 1:
        return [0]
    return [round(i * (n_ids - length) / (samples - 1)) for i in range(samples)]


def _ppl(nll: float, n: int) -> float:
    return round(math.exp(nll / n), 3)


def paired_difference(per_span: list[dict], baseline: str, tokens_per_span: int) -> dict[str, float | None] | None:
    """Beacons against ``baseline`` span by span (the same tokens scored by both): the mean NLL difference in nats
    per token (negative: beacons better), its standard error over the spans and how many spans the beacons win.
    None when a span lacks the baseline (files written before it was measured)."""
    if any(baseline not in span for span in per_span):
        return None
    diffs = [(span["beacons"] - span[baseline]) / tokens_per_span for span in per_span]
    mean, se = mean_and_standard_error(diffs)  # one span: no standard error
    return {"mean_nats_per_token": round(mean, 5), "standard_error": None if se is None else round(se, 5),
            "spans_won": sum(d < 0 for d in diffs), "spans": len(diffs)}  # fmt: skip


def paired_rows(rows: list[dict]) -> None:
    """Add ``paired`` (beacons against each baseline, span by span) to every row, in place."""
    for row in rows:
        found = {b: paired_difference(row["nll_sum_per_span"], b, row["target"])
                 for b in ("truncation", "streamingllm", "raw_part_only")}  # fmt: skip
        row["paired"] = {**row.get("paired", {}), **{b: v for b, v in found.items() if v is not None}}


def paired_against(rows: list[dict], other_rows: list[dict], name: str) -> None:
    """Add ``paired[name]``: these beacons against the beacons of another results file (another adapter) on the same
    spans, in place. Raises ``ValueError`` when a cell or its spans differ between the files."""
    other = {(r["book"], r["setting"], r["context"], r["target"]): r for r in other_rows}
    for row in rows:
        match = other.get((row["book"], row["setting"], row["context"], row["target"]))
        starts = [span["start"] for span in row["nll_sum_per_span"]]
        if match is None or [span["start"] for span in match["nll_sum_per_span"]] != starts:
            cell = f"{row['book']} / {row['setting']} / {row['context']}"
            raise ValueError(f"{name} has no cell {cell} on the spans {starts}")
        spans = [{"beacons": a["beacons"], name: b["beacons"]}
                 for a, b in zip(row["nll_sum_per_span"], match["nll_sum_per_span"])]  # fmt: skip
        row.setdefault("paired", {})[name] = paired_difference(spans, name, row["target"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--context", type=int, nargs="+", default=None, help="lengths read with the default settings")
    parser.add_argument(
        "--condensed", type=int, nargs="*", default=None, help="lengths read with every window condensed"
    )
    parser.add_argument("--condensed-ratio", type=int, default=32)
    parser.add_argument("--target", type=int, default=512)
    parser.add_argument("--samples", type=int, default=2, help="spans per book and length")
    parser.add_argument("--adapter", default=None, help="beacon adapter folder (default: the shipped one)")
    parser.add_argument("--fit-overlap", type=int, default=None, help="override the adapter's fit_overlap")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--paired", nargs="+", default=None, metavar="FILE",
        help="add the span-by-span comparison to these results files (from their per-span NLL; nothing is run)",
    )  # fmt: skip
    parser.add_argument(
        "--against", default=None, metavar="FILE",
        help="with --paired: also compare the beacons with those of this results file (another adapter, same spans)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.against and not args.paired:
        parser.error("--against compares results files: give them with --paired FILE...")
    if args.paired:
        other = json.loads(Path(args.against).read_text())["rows"] if args.against else None
        for name in args.paired:
            data = json.loads(Path(name).read_text())
            paired_rows(data["rows"])
            if other is not None:
                paired_against(data["rows"], other, f"beacons of {Path(args.against).name}")
            write_json(name, data)
            print(f"wrote {name}")
        return
    torch.set_num_threads(args.threads)

    import beacon_llm

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=64, ratios=(2, 4, 8), ratio_mix="fit-64", fit_overlap=16)
        default = tiny_beacon_model(cfg, max_position_embeddings=512)
        texts = {name: beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)[k * 20000 :] for k, name in enumerate("ab")}
        encode = lambda text: [3 + (ord(c) % 100) for c in text[:6000]]  # noqa: E731
        contexts, condensed_lengths, target, ratio = args.context or [768], args.condensed or [384], 64, 8
    else:
        overrides = {} if args.fit_overlap is None else {"beacon_fit_overlap": args.fit_overlap}
        default = beacon_llm.load(adapter=args.adapter, dtype=args.dtype, shared=False, **overrides)
        ratio = args.condensed_ratio
        texts = {
            "oz (bundled)": beacon_llm.read_document(beacon_llm.BUNDLED_BOOK),
            "kjv excerpt": (BOOKS / "kjv_bible_excerpt.txt").read_text(),
        }
        encode = lambda text: default.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        contexts = args.context or [16384, 32768]
        condensed_lengths = [7680] if args.condensed is None else args.condensed
        target = args.target
    plain = default.model
    max_positions = default.max_positions
    settings = [("default", None, n) for n in contexts] + [(f"condensed r{ratio}", ratio, n) for n in condensed_lengths]
    rows = []
    for book, text in texts.items():
        ids = encode(text)
        for setting, condense_ratio, n in settings:
            sums = {"beacons": 0.0, "truncation": 0.0, "streamingllm": 0.0, "raw_part_only": 0.0, "full": 0.0}
            budgets, per_span, scored, t0 = [], [], 0, time.perf_counter()
            fits = n + target <= max_positions
            for start in _spans(len(ids), n + target, args.samples):
                context, tgt = ids[start : start + n], ids[start + n : start + n + target]
                nll, budget, n_raw = _beacon_nll(default, context, tgt, condense_ratio)
                kept = baseline_contexts(context, budget, n_raw)
                span = {"start": start, "beacons": nll, **{m: _plain_nll(plain, ids_, tgt) for m, ids_ in kept.items()}}
                if fits:
                    span["full"] = _plain_nll(plain, context, tgt)
                for m in sums:
                    sums[m] += span.get(m, 0.0)
                per_span.append({k: round(v, 3) if isinstance(v, float) else v for k, v in span.items()})
                budgets.append(budget)
                scored += len(tgt)
            row = {"book": book, "setting": setting, "context": n, "target": target, "samples": args.samples}
            row.update({m: _ppl(s, scored) for m, s in sums.items() if m != "full" or fits})
            row["full"] = row.get("full")
            row["kv_budget"] = budgets
            row["nll_sum_per_span"] = per_span
            if fits and row["truncation"] != row["full"]:
                row["gap_closure"] = round((row["truncation"] - row["beacons"]) / (row["truncation"] - row["full"]), 3)
            row["beats_truncation"] = row["beacons"] < row["truncation"]
            row["beats_streamingllm"] = row["beacons"] < row["streamingllm"]
            paired_rows([row])
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {
        "adapter": args.adapter or "shipped",
        "dtype": str(default.model.dtype).replace("torch.", ""),
        "threads": args.threads,
        "max_positions": max_positions,
        "condensed_ratio": ratio,
        "fit_overlap": default.config.fit_overlap,
    }
    out_path = Path(args.out) if args.out else RESULTS / f"perplexity{'_fast' if args.fast else ''}.json"
    write_json(out_path, {"rows": rows, "meta": meta, "args": vars(args)})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
