"""Where the time of a long read goes: torch.profiler over a beacon read and over the plain model on the same windows.

Reports, per run, the CPU time inside the main top-level operators (attention kernel, linear layers, concatenation of
the memory, beacon row scatter/gather, RoPE arithmetic) as a share of the wall time, and the top operators by self
time. This is the profile behind the efficiency section of the README.

    python benchmarks/profile_read.py                  # embedded model, 16K tokens, ratio 8, window 512
    python benchmarks/profile_read.py --fast           # tiny model (CI smoke run)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _machine import machine_info
from _results import write_json

RESULTS = Path(__file__).parent / "results"
GROUPS = {
    "attention (sdpa or the native kernel)": ("aten::scaled_dot_product_attention", "beacon_llm::read_attention"),
    "linear layers": ("aten::linear",),
    "memory concatenation": ("aten::cat",),
    "beacon rows (index_select/index_copy)": ("aten::index_select", "aten::index_copy"),
    "elementwise (RoPE, norms, residuals)": ("aten::mul", "aten::add", "aten::neg", "aten::rsqrt", "aten::pow"),
}


def profile(fn) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    by_key = {e.key: e for e in events}
    shares = {
        group: round(sum(by_key[k].cpu_time_total for k in keys if k in by_key) / 1e6 / wall, 3)
        for group, keys in GROUPS.items()
    }
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "wall_s": round(wall, 2),
        "share_of_wall": shares,
        "top_self_cpu": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 2), "calls": e.count} for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--ratio", type=int, default=8)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm

    window = args.window or (64 if args.fast else 512)
    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        bm = tiny_beacon_model(
            beacon_llm.BeaconConfig(window=window, ratios=(args.ratio,)), max_position_embeddings=1024
        )
        length = args.length or 2048
        ids = [3 + (i * 7) % 120 for i in range(length)]
    else:
        bm = beacon_llm.load(beacon_window=window, beacon_ratio=[args.ratio], beacon_ratio_mix="step-random")
        length = args.length or 16384
        book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        ids = bm.tokenizer(book, add_special_tokens=False)["input_ids"]
        while len(ids) < length:
            ids = ids + ids
        ids = ids[:length]

    def beacon_read() -> None:
        with torch.no_grad():
            bm.forward(ids, bm.new_cache(), return_token_logprobs=False)

    def plain_windows() -> None:
        with torch.no_grad():
            for start in range(0, length, window):
                bm.model(input_ids=torch.tensor([ids[start : start + window]]), use_cache=False, logits_to_keep=1)

    result = {
        "length": length,
        "ratio": args.ratio,
        "window": window,
        "threads": args.threads,
        "dtype": str(bm.dtype).removeprefix("torch."),
        "machine": machine_info(args.threads),
        "beacon": profile(beacon_read),
        "plain_same_windows": profile(plain_windows),
    }
    for name in ("beacon", "plain_same_windows"):
        r = result[name]
        print(f"{name}: {r['wall_s']} s wall")
        for group, share in r["share_of_wall"].items():
            print(f"  {group:40} {share:6.1%}")
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"profile_read{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
