"""Speed and memory against context length: beacons at several ratios vs the plain model (full SDPA attention).

Each measurement runs in its own process so peak RSS is its own. Reported per row: ingestion tokens/s, peak RSS,
the KV entries (and bytes) the context leaves (``kv_entries_after_decode``: with the decoded tokens), first-token
latency and decode tokens/s after the context. Also the plain model reading the
same text in independent windows of the beacon window size (the "same window" reference for the beacon overhead).

    python benchmarks/efficiency.py                       # embedded model, 2K..32K
    python benchmarks/efficiency.py --lengths 2048 131072  # longer
    python benchmarks/efficiency.py --fast                 # tiny model, seconds (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _results import write_json

RESULTS = Path(__file__).parent / "results"


def _tokens(bm, n: int) -> list[int]:
    import beacon_llm

    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    if bm.tokenizer is not None and bm.vocab_size > 1000:
        ids = bm.tokenizer(book, add_special_tokens=False)["input_ids"]
    else:
        ids = [3 + (ord(c) % (bm.vocab_size - 3)) for c in book]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def worker(spec: dict) -> dict:
    import torch

    import beacon_llm
    from beacon_llm._compat import plain_forward

    torch.set_num_threads(spec["threads"])
    if spec["fast"]:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=spec["window"], ratios=(spec.get("ratio") or 2,))
        bm = tiny_beacon_model(cfg, max_position_embeddings=4096)
    else:
        overrides = {"beacon_window": spec["window"]}
        if spec.get("ratio"):
            overrides.update(beacon_ratio=[spec["ratio"]], beacon_ratio_mix="step-random")
        bm = beacon_llm.load(**overrides)
    ids = _tokens(bm, spec["length"])
    n_decode = spec["decode"]
    out = {**spec}
    with torch.no_grad():
        if spec["method"] == "beacon":
            cache = bm.new_cache()
            t0 = time.perf_counter()
            bm.forward(ids, cache, return_token_logprobs=False)
            t1 = time.perf_counter()
            # the entries the context left (as the plain rows count theirs), before the decoded tokens join them
            out["kv_entries"], out["kv_bytes"] = cache.get_seq_length() + 0, cache.nbytes()
            td = time.perf_counter()  # the decode's clock starts after that count
            bm.generate(None, cache=cache, max_new_tokens=n_decode, eos_token_id=[], return_dict_in_generate=True)
            t2 = time.perf_counter()
            out["kv_entries_after_decode"] = cache.get_seq_length() + 0
        elif spec["method"] == "plain":
            model = bm.model
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            logits, kv = plain_forward(model, x, logits_to_keep=1)
            t1 = time.perf_counter()
            out["kv_entries"] = len(ids)  # the context's entries, before decoding (the cache grows in place)
            out["kv_bytes"] = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in kv.layers)
            td = time.perf_counter()
            for _ in range(n_decode - 1):
                logits, kv = plain_forward(model, logits[:, -1:].argmax(-1), kv)
            t2 = time.perf_counter()
            out["kv_entries_after_decode"] = kv.get_seq_length()
        else:  # plain-window: independent windows of the beacon window size (no memory)
            model, w = bm.model, spec["window"]
            t0 = time.perf_counter()
            for start in range(0, len(ids), w):
                model(input_ids=torch.tensor([ids[start : start + w]]), use_cache=False, logits_to_keep=1)
            t1 = t2 = td = time.perf_counter()
            n_decode = 0
    out["ingest_s"] = round(t1 - t0, 3)
    out["ingest_tok_s"] = round(len(ids) / (t1 - t0), 1)
    out["first_token_s"] = round(t1 - t0, 3)
    out["decode_tok_s"] = round((n_decode - 1) / (t2 - td), 2) if n_decode > 1 else None
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    c = bm.model.config
    out["dims"] = {
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    }
    return out


def flop_ratio(dims: dict, length: int, window: int, ratio: int, kv_final: int) -> float:
    """FLOP-model prediction of beacon ingest tok/s over same-window plain tok/s (paper v2 §2.2 cost model).

    Per step the beacon model runs W raw + W/ratio beacon rows through every projection and MLP, and each row attends
    to the memory (grown linearly to ``kv_final``) plus its window; the plain reference runs W rows attending to its
    window only. Equal FLOP efficiency for matmuls and attention is assumed, so the number is what a perfect
    implementation would measure.
    """
    d = dims
    per_layer_macs = (
        2 * d["hidden"] * d["heads"] * d["head_dim"]  # q, o
        + 2 * d["hidden"] * d["kv_heads"] * d["head_dim"]  # k, v
        + 3 * d["hidden"] * d["intermediate"]  # gate, up, down
    )
    per_row_linear = 2 * d["layers"] * per_layer_macs
    per_row_key = 4 * d["layers"] * d["heads"] * d["head_dim"]  # q.k and p.v for one key
    steps = -(-length // window)
    rows = window + window // ratio
    beacon = plain = 0.0
    for s in range(steps):
        memory = kv_final * s / steps
        beacon += rows * per_row_linear + rows * per_row_key * (memory + rows / 2)
        plain += window * per_row_linear + window * per_row_key * window / 2
    return plain / beacon


def run(spec: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--ratios", type=int, nargs="+", default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--plain-max", type=int, default=8192, help="longest context for the plain model")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--methods", nargs="+", default=["beacon", "plain-window", "plain"])
    parser.add_argument(
        "--update",
        action="store_true",
        help="merge into the existing results file: replace the rows measured again, keep the others",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    lengths = args.lengths or ([512, 2048] if args.fast else [2048, 8192, 32768])
    ratios = args.ratios or ([8] if args.fast else [8, 32])
    window = args.window or (64 if args.fast else 512)
    base = {"fast": args.fast, "window": window, "threads": args.threads, "decode": args.decode}
    rows = []
    for n in lengths:
        specs = [{**base, "method": "beacon", "ratio": r, "length": n} for r in ratios]
        specs.append({**base, "method": "plain-window", "ratio": None, "length": n})
        if n <= args.plain_max:
            specs.append({**base, "method": "plain", "ratio": None, "length": n})
        for spec in specs:
            if spec["method"] not in args.methods:
                continue
            row = run(spec, args.timeout)
            row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            rows.append(row)
            print(
                json.dumps(
                    {
                        k: row.get(k)
                        for k in (
                            "method",
                            "ratio",
                            "length",
                            "ingest_tok_s",
                            "kv_entries",
                            "peak_rss_mb",
                            "decode_tok_s",
                            "error",
                        )
                    }
                ),
                flush=True,
            )
    out = Path(args.out) if args.out else RESULTS / f"efficiency{'_fast' if args.fast else ''}.json"
    if args.update and out.is_file():
        measured = {(r["method"], r.get("ratio"), r["length"]) for r in rows}
        kept = [
            r
            for r in json.loads(out.read_text())["rows"]
            if "length" in r and (r["method"], r.get("ratio"), r["length"]) not in measured
        ]
        rows = sorted(
            kept + rows, key=lambda r: (r["length"], r["method"] != "beacon", r["method"], r.get("ratio") or 0)
        )
    longest = max(r["length"] for r in rows)
    if args.plain_max < longest:
        rows.append(
            {
                "method": "plain",
                "note": f"not run beyond {args.plain_max} tokens: the base model has "
                f"{8192 if not args.fast else 4096} trained positions and full attention grows quadratically",
            }
        )
    summary = {}
    for r in sorted({row["ratio"] for row in rows if row.get("method") == "beacon"}):
        beacon = {
            row["length"]: row
            for row in rows
            if row.get("method") == "beacon" and row.get("ratio") == r and "error" not in row
        }
        window_ref = {row["length"]: row for row in rows if row.get("method") == "plain-window" and "error" not in row}
        refused = {row["length"]: row["error"] for row in rows if row.get("ratio") == r and "error" in row}
        entry: dict = {
            "ingest_vs_plain_same_window": {
                n: round(beacon[n]["ingest_tok_s"] / window_ref[n]["ingest_tok_s"], 3)
                for n in beacon
                if n in window_ref
            },
            "flop_model_ingest_vs_plain_same_window": {
                n: round(flop_ratio(beacon[n]["dims"], n, window, r, beacon[n]["kv_entries"]), 3) for n in beacon
            },
        }
        if refused:
            entry["refused"] = refused
        if len(beacon) > 1:
            hi = max(beacon)
            ref = 8192 if 8192 in beacon and hi != 8192 else min(beacon)
            entry[f"tok_s_{hi}_over_{ref}"] = round(beacon[hi]["ingest_tok_s"] / beacon[ref]["ingest_tok_s"], 3)
            entry[f"peak_rss_{hi}_over_{ref}"] = round(beacon[hi]["peak_rss_mb"] / beacon[ref]["peak_rss_mb"], 3)
        summary[f"ratio_{r}"] = entry
    result = {"rows": rows, "summary": summary, "args": vars(args)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
