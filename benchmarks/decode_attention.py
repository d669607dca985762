"""Which attention kernel for the decode step? One generated token's attention over a long memory, every layer.

After 32K tokens of a book the default schedule keeps about 7,000 entries, and attention over them takes as long as
all the weights' matrix-vector products together (``profile_read`` / ``cpu_speed``). This script times, for the
embedded model's shapes (30 layers, 9 query heads, 3 key/value heads, head size 64) on random keys and values laid out
as the cache keeps them (views of one preallocated buffer per layer), the ways one query can attend to them:

* ``sdpa_gqa`` (the decode step's kernel): ``scaled_dot_product_attention(..., enable_gqa=True)``, 9 query heads;
* ``sdpa_folded``: the 3 query heads of each key/value head folded into 3 query rows (3 work items, not 9);
* ``split_kv_N``: the folded query against N slices of the memory at once (a batch of N), merged by their
  log-sum-exp ("flash decoding": more work items, each key read once);
* ``matmul``: scores by one batched matrix product, softmax in fp32, a second product.

Reported: milliseconds per generated token (all layers), the bytes of keys and values read per second, and the largest
difference from ``sdpa_gqa``'s output.

    python benchmarks/decode_attention.py                  # bf16 where native, 2 threads, 512 and 7,040 entries
    python benchmarks/decode_attention.py --fast           # small shapes (CI smoke run)
    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_amd_epyc.json  # another CPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import machine_info
from _results import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def kernels(q: torch.Tensor, scale: float) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> f(keys, values) for one query ``q`` (1, H, 1, D) against keys/values (1, KVH, M, D) views."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)  # (out, lse); torch's own
    _, n_heads, _, d = q.shape

    def folded_query(kvh: int) -> torch.Tensor:
        return q.view(1, kvh, n_heads // kvh, d)  # (1, KVH, G, D)

    def gqa(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, scale=scale, enable_gqa=True)  # (1, H, 1, D)

    def folded(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(folded_query(k.shape[1]), k, v, scale=scale).reshape(1, n_heads, 1, d)

    def split_kv(n: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def run(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kvh, m = k.shape[1], k.shape[2]
            s = m // n
            qf = folded_query(kvh)
            ks = k.as_strided((n, kvh, s, d), (s * d, k.stride(1), d, 1))  # (N, KVH, S, D): N slices, no copy
            vs = v.as_strided((n, kvh, s, d), (s * d, v.stride(1), d, 1))
            out, lse = flash(qf.expand(n, -1, -1, -1), ks, vs, scale=scale)  # (N, KVH, G, D), (N, KVH, G)
            if m > n * s:  # the entries after the last whole slice
                rest, rest_lse = flash(qf, k[:, :, n * s :], v[:, :, n * s :], scale=scale)
                out, lse = torch.cat([out, rest]), torch.cat([lse, rest_lse])
            weights = torch.softmax(lse.float(), 0).unsqueeze(-1)  # (N(+1), KVH, G, 1)
            return (out.float() * weights).sum(0).to(q.dtype).reshape(1, n_heads, 1, d)

        return run

    def matmul(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qf = folded_query(k.shape[1])[0]  # (KVH, G, D)
        scores = torch.matmul(qf, k[0].transpose(-1, -2)).float() * scale  # (KVH, G, M)
        return torch.matmul(torch.softmax(scores, -1).to(q.dtype), v[0]).reshape(1, n_heads, 1, d)

    found = {"sdpa_gqa": gqa, "sdpa_folded": folded, "matmul": matmul}
    if flash is not None:  # the CPU flash kernel that returns the log-sum-exp (absent: no split_kv rows)
        found.update({"split_kv_2": split_kv(2), "split_kv_4": split_kv(4)})
    return found


def time_kernel(f: Callable, keys: torch.Tensor, values: torch.Tensor, m: int, reps: int) -> float:
    """Seconds per token: ``f`` on every layer's first ``m`` entries, ``reps`` tokens after 2 untimed ones."""
    layers = keys.shape[0]
    for _ in range(2):
        for i in range(layers):
            f(keys[i, :, :, :m], values[i, :, :, :m])
    t = time.perf_counter()
    for _ in range(reps):
        for i in range(layers):
            f(keys[i, :, :, :m], values[i, :, :, :m])
    return (time.perf_counter() - t) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, nargs="+", default=[512, 7040], help="memory entries per layer")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=10, help="tokens timed per kernel and length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from beacon_llm import _compat

    if args.dtype == "auto":
        dtype = torch.bfloat16 if _compat.native_bf16_cpu() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    layers, heads, kv_heads, head_dim = 30, 9, 3, 64  # SmolLM2-135M
    if args.fast:
        layers, args.entries, args.reps = 2, [64, 131], 2
    generator = torch.Generator().manual_seed(0)
    capacity = max(args.entries) + 256  # the cache's buffer keeps room to grow: every layer's memory is a view
    keys = torch.randn(layers, 1, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    values = torch.randn(layers, 1, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    q = torch.randn(1, heads, 1, head_dim, generator=generator).to(dtype)
    rows = []
    with torch.no_grad():
        for m in args.entries:
            found = kernels(q, head_dim**-0.5)
            reference = found["sdpa_gqa"](keys[0, :, :, :m], values[0, :, :, :m])
            for name, f in found.items():
                seconds = time_kernel(f, keys, values, m, args.reps)
                kv_bytes = 2 * layers * kv_heads * m * head_dim * keys.element_size()
                diff = (f(keys[0, :, :, :m], values[0, :, :, :m]).float() - reference.float()).abs().max()
                rows.append({"entries": m, "kernel": name, "ms_per_token": round(seconds * 1000, 2),
                             "kv_gb_per_s": round(kv_bytes / seconds / 1e9, 2),
                             "max_abs_diff_vs_sdpa_gqa": float(diff)})  # fmt: skip
                print(f"{m:>6} entries  {name:<12} {seconds * 1000:8.2f} ms/token  {kv_bytes / seconds / 1e9:6.2f} GB/s"
                      f"  max |diff| {float(diff):.2e}")  # fmt: skip
    shapes = {"layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    out = Path(args.out) if args.out else RESULTS / f"decode_attention{'_fast' if args.fast else ''}.json"
    meta = {"dtype": str(dtype).removeprefix("torch."), "threads": args.threads, "torch": torch.__version__}
    write_json(out, {**meta, "machine": machine_info(args.threads), "shapes": shapes, "reps": args.reps, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
