"""One prepared GPU run (~10 minutes on one H200-class GPU): a Llama-2-7B-shaped model with random bf16 weights
and beacons (era v2 layout: window 1024, q/k/v/o beacons), prefill time, peak memory and decode tokens/s at 32K,
128K and ~400K tokens, against plain full attention where it fits; with the physical floor of each prefill computed
from the measured matmul rate and copy bandwidth.

    python benchmarks/gpu_7b.py                  # on a GPU; writes benchmarks/results/gpu_7b.json
    python benchmarks/gpu_7b.py --fast           # a tiny model on CPU (smoke run; the numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured_rates(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) measured on this device."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    reps = 20 if device == "cuda" else 3
    for _ in range(reps):
        a @ b
    sync()
    flops = 2 * n**3 * reps / (time.perf_counter() - t)
    x = torch.empty(256 * 2**20 if device == "cuda" else 16 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    bandwidth = 2 * x.numel() * reps / (time.perf_counter() - t)  # read + write
    return flops, bandwidth


def floor_seconds(cfg, n_tokens: int, window: int, ratio: int, flops: float, bandwidth: float) -> float:
    """Lower bound of a beacon prefill: its matmul FLOPs at the measured rate, or its weight + KV traffic."""
    d, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    params = layers * (4 * d * d + 3 * d * inter)
    per_window = window + window // ratio
    windows = -(-n_tokens // window)
    linear = 2 * params * per_window * windows
    attention = sum(4 * per_window * (k * window // ratio + per_window) * d * layers for k in range(windows))
    weight_bytes = 2 * params * windows  # bf16 weights read once per window step
    return max((linear + attention) / flops, weight_bytes / bandwidth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    import beacon_llm
    from beacon_llm._compat import plain_forward

    device = "cuda" if torch.cuda.is_available() and not args.fast else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.fast:
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        )
        lengths = args.lengths or [2048, 8192]
    else:  # Llama-2-7B: 32 layers, hidden 4096, 32 heads, MLP 11008, 4096 positions
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        )
        lengths = args.lengths or [32768, 131072, 393216]  # 393,216 = the most ratio 128 covers: (4096-1024)*128+1024
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    window = 1024 if not args.fast else 256
    bm = beacon_llm.BeaconModel.attach(
        model,
        beacon_llm.BeaconConfig(
            era="v2",
            pos="append",
            attn="step-expansion",
            window=window,
            ratios=(2, 4, 8, 16, 32, 64, 128),
            ratio_mix="adapt-64",
            param=("q", "k", "v", "o"),
        ),
    )
    flops, bandwidth = measured_rates(device, dtype)
    rows: list[dict] = []
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "matmul_tflops": round(flops / 1e12, 2),
        "copy_gb_s": round(bandwidth / 1e9, 1),
        "rows": rows,
        "fast": args.fast,
    }
    out_path = Path(args.out) if args.out else RESULTS / f"gpu_7b{'_fast' if args.fast else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in lengths:
        ids = torch.randint(3, cfg.vocab_size, (n,), generator=gen)
        row = {"tokens": n}
        for method in ("beacon", "plain"):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    sync()
                    t0 = time.perf_counter()
                    if method == "beacon":
                        cache = bm.new_cache()
                        bm.forward(ids, cache, return_token_logprobs=False)
                        sync()
                        t1 = time.perf_counter()
                        # the entries the context left (the plain model's are the n context tokens), then decode
                        row["beacon_kv_entries"] = cache.get_seq_length()
                        bm.generate(None, cache=cache, max_new_tokens=args.decode, eos_token_id=[])
                        row["beacon_ratio"] = cache.state.window_ratio
                        row["beacon_kv_entries_after_decode"] = cache.get_seq_length()
                    else:
                        if n > cfg.max_position_embeddings * 32:
                            raise RuntimeError("skipped: beyond 32x the trained positions")
                        logits, kv = plain_forward(model, ids[None].to(device), logits_to_keep=1)
                        sync()
                        t1 = time.perf_counter()
                        for _ in range(args.decode - 1):
                            logits, kv = plain_forward(model, logits[:, -1:].argmax(-1), kv)
                    sync()
                    t2 = time.perf_counter()
                row[f"{method}_prefill_s"] = round(t1 - t0, 2)
                row[f"{method}_decode_tok_s"] = round((args.decode - 1) / (t2 - t1), 2)
                if torch.cuda.is_available():
                    row[f"{method}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                row[f"{method}_error"] = str(exc).splitlines()[0][:160]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if "beacon_ratio" in row:
            row["beacon_floor_s"] = round(floor_seconds(cfg, n, window, row["beacon_ratio"], flops, bandwidth), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(out_path, result)  # after every length, so the lengths done are kept if a later one is stopped
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), f"wrote {out_path}")


if __name__ == "__main__":
    main()
