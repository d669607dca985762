"""The read's attention: torch's SDPA (masked, grouped query heads: the stock read's call) against the native kernel
(``beacon_llm.native_kernels``, ``kernels/read_attention_bf16.c``), in the embedded model's shape, in one process,
alternating so that both see the same machine state.

One window of 528 queries (512 tokens and 16 beacons) in 9 query heads over 3 key/value heads of 64, after a memory
of ``--memory`` entries, with the window causal over itself (the mask of a raw window after the memory; a beacon
window's differs only inside the window): milliseconds per call, GFLOP/s of the visible scores and value sums, and
each kernel's largest difference from the float64 attention. The first ask of the bundled book reads windows after
memories of up to about 2,100 beacons and, past the condensed part, raw windows after up to about 7,000 entries.

    python benchmarks/read_attention.py --out benchmarks/results/read_attention_amd_epyc.json
    python benchmarks/read_attention.py --fast         # small sizes (CI smoke run; the kernel where it builds)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _machine import machine_info
from _results import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def window_case(t: int, memory: int, seed: int) -> tuple[torch.Tensor, ...]:
    """query (1, 9, T, 64) as the layer makes it (a transposed view), keys / values (1, 3, M + T, 64), and the
    (1, 1, T, M + T) bool mask: the memory visible, the window causal."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, 9, 64, generator=gen).bfloat16().transpose(1, 2)
    keys, values = (torch.randn(1, 3, memory + t, 64, generator=gen).bfloat16() for _ in range(2))
    mask = torch.ones(t, memory + t, dtype=torch.bool).tril(memory)[None, None]
    return q, keys, values, mask


def sdpa(q, keys, values, mask) -> torch.Tensor:
    """The stock read's call (``_compat.masked_gqa_sdpa``), (1, T, H, D)."""
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def largest_error(got: torch.Tensor, q, keys, values, mask) -> float:
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), keys.double(), values.double(), attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    return float((got.double() - exact).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", type=int, nargs="+", default=None, help="memory entries before the window")
    parser.add_argument("--window", type=int, default=None, help="queries per window (default 528)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from beacon_llm import native_kernels

    memories = args.memory or ([0, 100] if args.fast else [0, 512, 1536, 4096, 7000])
    t = args.window or (40 if args.fast else 528)
    rounds = args.rounds or (2 if args.fast else 15)
    kernel = native_kernels.kernels()
    rows = []
    for memory in memories:
        q, keys, values, mask = window_case(t, memory, seed=memory)
        runs = {"sdpa": lambda: sdpa(q, keys, values, mask)}
        if kernel is not None:
            runs["native"] = lambda: kernel.read_attention(q, keys, values, mask, 0.125)
        errors = {name: largest_error(run(), q, keys, values, mask) for name, run in runs.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        visible = int(mask.sum())
        flop = visible * 9 * 64 * 4  # scores and value sums of the visible (query, key) pairs, 9 query heads
        row = {"memory": memory, "queries": t, "visible_pairs_per_head": visible}
        for name in runs:
            ms = statistics.median(times[name]) * 1e3
            row[name] = {"ms": round(ms, 3), "gflop_s": round(flop / ms / 1e6, 1), "max_error": errors[name]}
        if kernel is not None:
            row["speedup"] = round(row["sdpa"]["ms"] / row["native"]["ms"], 2)
        rows.append(row)
        native = row.get("native", {})
        print(
            f"memory {memory:6}: sdpa {row['sdpa']['ms']:8.2f} ms ({row['sdpa']['gflop_s']:6.1f} GFLOP/s, error "
            f"{errors['sdpa']:.2e})"
            + (
                f"  native {native['ms']:8.2f} ms ({native['gflop_s']:6.1f} GFLOP/s, error {errors['native']:.2e}) "
                f"{row['speedup']}x"
                if native
                else ""
            ),
            flush=True,
        )
    result = {
        "machine": machine_info(args.threads),
        "native_kernels": native_kernels.unavailable() or "used",
        "rounds": rounds,
        "rows": rows,
    }
    out = Path(args.out) if args.out else RESULTS / f"read_attention{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
