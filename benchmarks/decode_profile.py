"""Where does a decoded token's time go? The embedded model after N tokens of the bundled book, one generated token
at a time through ``bm.forward([token], cache)`` (the decode step that ``generate`` runs), timed plainly and then
under ``torch.profiler``, whose per-operator self time is grouped into the step's parts:

* ``linear`` (the packed oneDNN products, or ``aten::linear`` / ``addmm`` / ``mm`` in fp32), with the bytes of weights
  read per token and the bytes per second they reach; the native kernel's products (``products: native``) are not
  torch operators, so the profiler does not see them (``benchmarks/decode_matvec.py`` times them);
* ``attention`` (the SDPA kernel);
* ``small ops``: every other operator (norms, RoPE, residual adds, copies into the cache, views), with their count per
  token: on a CPU where each small operator costs tens of microseconds, their number sets the floor.

Then one norm call as the step makes it, timed alone (as a micro-benchmark times it), right after a product whose
weights are in cache, and right after another layer's product (weights just streamed from memory, as in the step):
in the step every small operator follows a product or another operator, not itself, and costs what the last two say.

The profiler adds its own cost per operator, so the parts are shares of the profiled time; the plain ms per token is
the number to compare with ``cpu_speed``. Results: ``benchmarks/results/decode_profile.json`` (or ``--out``).

    python benchmarks/decode_profile.py                         # dtype auto, 2 threads, after 512 tokens
    python benchmarks/decode_profile.py --context 32768
    python benchmarks/decode_profile.py --out benchmarks/results/decode_profile_amd_epyc.json
    python benchmarks/decode_profile.py --fast                  # tiny model (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _machine import machine_info
from _results import write_json

RESULTS = Path(__file__).resolve().parent / "results"
LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm", "aten::matmul")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention")


def part_of(name: str) -> str:
    if name in LINEAR_OPS:
        return "linear"
    if name in ATTENTION_OPS:
        return "attention"
    return "small ops"


def profile_parts(step, tokens: int) -> dict[str, dict[str, float]]:
    """Self CPU time (ms per token) and operator calls per token of each part, over ``tokens`` calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(tokens):
            step(i)
    parts: dict[str, dict[str, float]] = {}
    for event in prof.key_averages():
        part = parts.setdefault(part_of(event.key), {"ms_per_token": 0.0, "calls_per_token": 0.0})
        part["ms_per_token"] += event.self_cpu_time_total / 1000 / tokens
        part["calls_per_token"] += event.count / tokens
    return {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in sorted(parts.items())}


def norm_after_cold_weights(linears, hidden: torch.Tensor, calls: int = 300) -> dict[str, float]:
    """Median microseconds of one decode-step norm call (layer 0's input norm, as the step calls it) run alone, right
    after the same layer's MLP product each time (weights in cache), and right after another layer's MLP product
    each time (its weights just streamed from memory, as in the step). hidden: (1, 1, Dm) in the model's dtype."""
    if linears.packed:
        norm, products = linears.fused[0].norm1, [f.gate_up for f in linears.fused]
    else:
        norm, products = linears.layers[0].norm1, [lin.gate for lin in linears.layers]
    out = {}
    for name, before in (("alone", None), ("after_a_cached_product", lambda i: products[0]),
                         ("after_a_cold_product", lambda i: products[i % len(products)])):  # fmt: skip
        times = []
        for i in range(calls):
            if before is not None:
                before(i)(hidden)
            start = time.perf_counter()
            norm(hidden)
            times.append(time.perf_counter() - start)
        out[name] = round(sorted(times)[calls // 2] * 1e6, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context", type=int, default=512, help="tokens of the book read before decoding")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens timed (and profiled)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm

    if args.fast:
        from beacon_llm import BeaconConfig
        from beacon_llm.testing import tiny_beacon_model

        bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-8"), max_position_embeddings=128)
        ids = torch.randint(5, 90, (48,), generator=torch.Generator().manual_seed(0))
        args.tokens, args.context = 4, 48
    else:
        bm = beacon_llm.load(dtype=args.dtype, shared=False)
        book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        ids = torch.tensor(bm.tokenizer(book, add_special_tokens=False)["input_ids"][: args.context])
        if len(ids) < args.context:
            raise SystemExit(f"--context {args.context} is longer than the bundled book ({len(ids)} tokens)")
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ids, cache, planned_length=args.context + 3 * args.tokens + 8, return_token_logprobs=False)

        def step(i: int) -> None:
            bm.forward([100 + i % 50], cache, return_token_logprobs=False)

        for i in range(4):  # warm-up: kernels made and packed
            step(i)
        start = time.perf_counter()
        for i in range(args.tokens):
            step(i)
        ms = (time.perf_counter() - start) / args.tokens * 1000
        parts = profile_parts(step, args.tokens)
        norm_us = norm_after_cold_weights(bm._decode_linears(), bm.model.model.embed_tokens(ids[:1][None]))
        products = bm._decode_linears().products
    weight_bytes = sum(  # the projections a raw token reads (the beacon copies are not read by the decode step)
        m.weight.numel() * m.weight.element_size()
        for name, m in bm.model.named_modules()
        if isinstance(m, torch.nn.Linear) and "beacon_" not in name
    )
    linear_ms = parts.get("linear", {}).get("ms_per_token", 0.0)
    row = {
        "dtype": str(bm.dtype).removeprefix("torch."),
        "products": products,
        "context_tokens": args.context,
        "kv_entries": cache.memory_length,
        "ms_per_token": round(ms, 2),
        "tok_s": round(1000 / ms, 2),
        "profiled": parts,
        "linear_weight_bytes": weight_bytes,
        "linear_gb_per_s_profiled": round(weight_bytes / linear_ms / 1e6, 2) if linear_ms else None,
        "norm_call_us": norm_us,
    }
    print(f"{row['dtype']} after {args.context} tokens ({row['kv_entries']} entries): {ms:.2f} ms/token")
    for name, p in parts.items():
        print(f"  {name:<10} {p['ms_per_token']:7.2f} ms/token (profiled)  {p['calls_per_token']:7.1f} calls/token")
    print("  one norm call (median us): " + ", ".join(f"{k} {v}" for k, v in norm_us.items()))
    out = Path(args.out) if args.out else RESULTS / f"decode_profile{'_fast' if args.fast else ''}.json"
    data = {"threads": args.threads, "machine": machine_info(args.threads), "rows": []}
    if out.is_file():  # rows of other (dtype, context) kept
        data["rows"] = json.loads(out.read_text())["rows"]
    key = (row["dtype"], row["context_tokens"])
    data["rows"] = [r for r in data["rows"] if (r["dtype"], r["context_tokens"]) != key] + [row]
    write_json(out, data)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
