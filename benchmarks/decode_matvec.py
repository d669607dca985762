"""The decode step's bf16 products: oneDNN's packed kernel against the native kernel (``beacon_llm.native_kernels``),
on the embedded model's own weights, in one process, alternating so that both see the same machine state.

1. ``products``: one pass over every product a generated token makes (30 layers x q/k/v, o, gate/up, down, and the
   output head), each kernel in turn, ``--rounds`` times: milliseconds per pass and GB/s of weights read.
2. ``attention``: one pass over every layer's attention of one token to ``--entries`` memory entries (random keys
   and values, one buffer per layer, in the embedded model's shape: 3 key/value heads of 64 with 3 query rows each),
   torch's SDPA on the folded queries (the stock step's call) against the native kernel: milliseconds per pass and
   GB/s of keys and values read.
3. ``decode``: tokens per second of the decode step after ``--contexts`` tokens of the bundled book, alternating
   ``--rounds`` times: oneDNN's products with torch's attention (``onednn``), the native products with torch's
   attention (``native_products``), both native kernels between torch's other operators (``native_operators``),
   and each layer as one native call (``native``, what the step runs here).
4. ``agreement``: after 4,096 tokens of two books no training saw (the bundled Wizard of Oz, the KJV excerpt),
   ``--decode`` greedy tokens of the float32 model as the reference, and for each bf16 kind of product: how many of
   its own greedy tokens agree with the reference before the first difference, and where that is, and,
   teacher-forced on the reference's tokens, the mean and largest difference of the chosen token's log-probability
   from float32's. Both bf16 kinds round differently from float32; the question is whether the native kernel's
   rounding strays further.
   Native against oneDNN directly, too.

    python benchmarks/decode_matvec.py --out benchmarks/results/decode_matvec_amd_epyc.json   # about 10 minutes
    python benchmarks/decode_matvec.py --only-agreement --out ...     # part 4 alone, parts 1-3 kept from the file
    python benchmarks/decode_matvec.py --fast          # tiny model (CI smoke run; the kernel where it builds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _machine import machine_info
from _results import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BOOKS = {
    "wonderful_wizard_of_oz": None,
    "kjv_bible_excerpt": ROOT / "benchmarks" / "data" / "books" / "kjv_bible_excerpt.txt",
}


def step_products(linears, hidden: int) -> list[tuple]:
    """(product, input width) of every product one generated token makes, in the step's order."""
    out = []
    for f in linears.fused:
        out += [(f.qkv, hidden), (f.o, f.n_q), (f.gate_up, hidden), (f.down, f.n_inter)]
    return out


def time_products(linears, hidden: int, rounds: int) -> list[float]:
    """Milliseconds per pass over the step's products (the output head included), ``rounds`` passes."""
    products = step_products(linears, hidden)
    inputs = {n: torch.randn(1, 1, n).bfloat16() for _, n in products}
    x_head = torch.randn(1, hidden).bfloat16()
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        for product, n in products:
            product(inputs[n])
        linears.lm_head(x_head)
        times.append((time.perf_counter() - start) * 1000)
    return times[1:]  # the first pass warms up


def decode_tok_s(bm, ids, linears, tokens: int) -> float:
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ids, cache, planned_length=len(ids) + tokens + 8, return_token_logprobs=False)
        bm.__dict__["_decode_inference"] = linears
        for i in range(3):
            bm.forward([100 + i], cache, return_token_logprobs=False)
        start = time.perf_counter()
        for i in range(tokens):
            bm.forward([100 + i % 50], cache, return_token_logprobs=False)
    return tokens / (time.perf_counter() - start)


def greedy_with(bm, ids, linears, n: int, forced: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens after ``ids`` (or the ``forced`` ones) and the log-probabilities before each."""
    cache = bm.new_cache()
    tokens, logprobs = [], []
    with torch.no_grad():
        bm.__dict__["_decode_inference"] = linears
        logits = bm.forward(ids, cache, planned_length=len(ids) + n + 8, return_token_logprobs=False).last_logits
        for i in range(n):
            logprobs.append(torch.log_softmax(logits.float(), -1))
            tokens.append(int(logits.argmax()) if forced is None else forced[i])
            logits = bm.forward([tokens[-1]], cache, return_token_logprobs=False).last_logits
    return tokens, logprobs


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def agreeing(a: list[int], b: list[int]) -> int:
    """Greedy tokens ``b`` shares with ``a`` before their first difference (after it, the two follow different
    prefixes: an equal token there is no agreement)."""
    first = first_difference(a, b)
    return min(len(a), len(b)) if first is None else first


def tiny_fp32(bm):
    """The fast mode's float32 reference: the same tiny model in float32."""
    import copy

    ref = copy.deepcopy(bm)
    ref.model.to(torch.float32)
    return ref


def time_attention(entries: list[int], rounds: int, layers: int) -> list[dict]:
    """Per memory length: milliseconds per pass over ``layers`` attention calls, SDPA (folded) and native."""
    from beacon_llm import native_kernels

    kernel = native_kernels.kernels()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for m in entries:
        g = torch.Generator().manual_seed(m)
        q = torch.randn(1, 3, 3, 64, generator=g).bfloat16()
        memory = [torch.randn(2, 1, 3, m, 64, generator=g).bfloat16() for _ in range(layers)]  # keys, values
        calls = {
            "sdpa": lambda kv: sdpa(q, kv[0], kv[1], scale=0.125),
            "native": lambda kv: kernel.attention(q, kv[0], kv[1], 0.125),
        }
        times = {k: [] for k in calls}
        for _ in range(rounds + 1):
            for name, call in calls.items():
                start = time.perf_counter()
                for kv in memory:
                    call(kv)
                times[name].append((time.perf_counter() - start) * 1000)
        nbytes = sum(kv.numel() * kv.element_size() for kv in memory)
        row = {"entries": m, "kv_bytes": nbytes}
        for name, ts in times.items():
            ms = statistics.median(ts[1:])  # the first pass warms up
            row[name] = {"median_ms": round(ms, 2), "gb_per_s": round(nbytes / ms / 1e6, 1)}
        rows.append(row)
        print(f"attention over {m} entries x {layers} layers: " +
              ", ".join(f"{k} {row[k]['median_ms']} ms ({row[k]['gb_per_s']} GB/s)" for k in calls))  # fmt: skip
    return rows


def speed_parts(bm, books, kinds, linears, args, result) -> None:
    """Parts 1 to 3: the products alone, the attention alone, then the decode step, each kind in turn."""
    import beacon_llm
    from beacon_llm.decode import DecodeLinears

    # 1. the products alone
    weight_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for name, m in bm.model.named_modules()
        if isinstance(m, torch.nn.Linear) and "beacon_" not in name
    )
    hidden = bm.model.config.hidden_size
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            times[k] += time_products(linears[k], hidden, 1)
    rows = {}
    for k in kinds:
        ms = statistics.median(times[k])
        rows[k] = {"ms_per_pass": [round(t, 2) for t in times[k]], "median_ms": round(ms, 2),
                   "gb_per_s": round(weight_bytes / ms / 1e6, 1)}  # fmt: skip
    result["products"] = {"weight_bytes": weight_bytes, "rows": rows}
    for k, r in rows.items():
        print(f"products {k:<7} {r['median_ms']:7.2f} ms per token's products  {r['gb_per_s']:5.1f} GB/s")

    # 2. the attention alone
    if "native" in kinds:
        result["attention"] = time_attention(args.entries, args.rounds, len(bm.model.model.layers))

    # 3. decode speed, alternating
    variants = dict(linears)
    if "native" in kinds:
        with torch.no_grad():
            variants["native_products"] = DecodeLinears(bm.model, products="native")
            variants["native_operators"] = DecodeLinears(bm.model, products="native")
        variants["native_products"].native_attention = None  # torch's attention with the native products
        variants["native_products"].native_layers = None
        variants["native_operators"].native_layers = None  # both native kernels, the layer as separate operators
    text = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    book = books["synthetic"] if args.fast else bm.tokenizer(text, add_special_tokens=False)["input_ids"]
    decode_rows = []
    for n in args.contexts:
        speeds = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, variant in variants.items():
                speeds[k].append(round(decode_tok_s(bm, book[:n], variant, args.tokens), 2))
        row = {"context_tokens": n, "tok_s": speeds, "mean_tok_s": {k: round(statistics.mean(v), 2)
                                                                     for k, v in speeds.items()}}  # fmt: skip
        decode_rows.append(row)
        print(f"decode after {n}: " + ", ".join(f"{k} {v} tok/s" for k, v in row["mean_tok_s"].items()))
    result["decode"] = decode_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens timed per round")
    parser.add_argument("--decode", type=int, default=64, help="greedy tokens compared per book")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--entries", type=int, nargs="+", default=[512, 8192], help="memory entries (attention)")
    parser.add_argument("--only-agreement", action="store_true", help="part 4 only; parts 1-3 kept from --out")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "decode_matvec.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm import native_kernels
    from beacon_llm.decode import DecodeLinears

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        bm = tiny_beacon_model(beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-8"))
        bm.model.to(torch.bfloat16)
        books = {"synthetic": [3 + i % 90 for i in range(200)]}
        args.contexts, args.rounds, args.tokens, args.decode, agree_context = [48], 2, 4, 4, 64
        args.entries = [40]
    else:
        bm = beacon_llm.load(dtype="bfloat16", shared=False)
        books = {}
        for name, path in BOOKS.items():
            text = beacon_llm.read_document(str(path or beacon_llm.BUNDLED_BOOK))
            books[name] = bm.tokenizer(text, add_special_tokens=False)["input_ids"]
        agree_context = 4096
    reason = native_kernels.unavailable()
    result = {"machine": machine_info(args.threads), "native_unavailable": reason, "args": vars(args)}
    if reason is not None:
        print(f"native kernel not available here: {reason}")
    kinds = ["onednn"] + (["native"] if reason is None else [])
    packed_ok = beacon_llm._compat.native_bf16_cpu() and beacon_llm._compat.packed_linear_available()
    kinds = [k for k in kinds if k != "onednn" or packed_ok]
    with torch.no_grad():
        linears = {k: DecodeLinears(bm.model, products=k) for k in kinds}

    if args.only_agreement:
        kept = json.loads(Path(args.out).read_text())
        result.update({key: kept[key] for key in ("products", "attention", "decode", "args") if key in kept})
        result["agreement_args"] = vars(args)
    else:
        speed_parts(bm, books, kinds, linears, args, result)

    # 3. agreement with the float32 model's decoding
    if kinds:
        reference = tiny_fp32(bm) if args.fast else beacon_llm.load(dtype="float32", shared=False)
        plain = DecodeLinears(reference.model)
        agreement = []
        for name, ids in books.items():
            ctx = ids[:agree_context]
            ref, ref_lp = greedy_with(reference, ctx, plain, args.decode)
            row = {"book": name, "context": len(ctx), "tokens": args.decode, "against_float32": {}}
            greedy = {}
            for k in kinds:
                greedy[k], _ = greedy_with(bm, ctx, linears[k], args.decode)
                _, forced_lp = greedy_with(bm, ctx, linears[k], args.decode, forced=ref)
                chosen = torch.tensor([float(a[t] - b[t]) for a, b, t in zip(ref_lp, forced_lp, ref)]).abs()
                row["against_float32"][k] = {
                    "agree": agreeing(ref, greedy[k]),
                    "first_difference": first_difference(ref, greedy[k]),
                    "mean_abs_logprob_difference": round(float(chosen.mean()), 4),
                    "max_abs_logprob_difference": round(float(chosen.max()), 4),
                }  # fmt: skip
            if "native" in greedy and "onednn" in greedy:
                row["native_against_onednn"] = {
                    "agree": agreeing(greedy["onednn"], greedy["native"]),
                    "first_difference": first_difference(greedy["onednn"], greedy["native"]),
                }
            agreement.append(row)
            print(f"agreement {name}: {row}")
        result["agreement"] = agreement
    bm.__dict__.pop("_decode_inference", None)
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
