"""fit-N against the official adapt-1024 mode with the beacon configurations of the three released checkpoints
(Llama-2 era v2, Mistral and Qwen-2 era v3), on tiny random models with the same windows, ratios and positions.

Random weights say nothing about answer quality; what this measures is what each mode keeps and what it costs: the
ratio, the windows condensed, the raw tokens kept, the KV entries (positions) in use after the read, the read time,
and, for inputs that fit the positions, how far the last logits are from the plain model's (fit-N: exactly 0).

    python benchmarks/fit_vs_adapt_configs.py
    python benchmarks/fit_vs_adapt_configs.py --fast
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"
# released checkpoint -> (beacon config keys, base max_position_embeddings), from their config.json / recipes
RELEASED = {
    "activation-beacon-llama2-7b-chat": (
        {"beacon_window": 1024, "beacon_stride": [1024], "beacon_attn": "step-expansion",
         "beacon_attend_previous": True, "beacon_ratio": [2, 4, 8, 16, 32, 64, 128],
         "beacon_param": ["q", "k", "v", "o"]}, 4096),
    "activation-beacon-mistral-7b": (
        {"beacon_window": 2048, "beacon_stride": 2048, "beacon_attn": "step-expansion", "beacon_attend_prev": False,
         "beacon_ratio": [2, 4, 8], "beacon_param": ["q", "k", "v", "o"], "beacon_sink_size": 1}, 32768),
    "beacon-qwen-2-7b-instruct": (
        {"beacon_window": 2048, "beacon_stride": 2048, "beacon_attn": "full-coverage", "beacon_pos": "interleave",
         "beacon_attend_prev": True, "beacon_ratio": [2, 4, 8], "beacon_param": ["q", "k", "v"]}, 32768),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--multiples", type=float, nargs="+", default=[0.5, 1.5, 3.0, 6.0],
                        help="input lengths as multiples of the base positions")  # fmt: skip
    parser.add_argument("--answer", type=int, default=256, help="answer reserve planned after the input")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fast:
        args.multiples, args.answer = [0.5, 3.0], 32

    from beacon_llm import BeaconConfig
    from beacon_llm.testing import tiny_beacon_model

    rows = []
    for name, (keys, positions) in RELEASED.items():
        scale = 8 if args.fast else 1
        keys = dict(keys)
        if args.fast:  # the same shape of plan, 8x smaller
            w = keys["beacon_window"] // scale
            keys["beacon_window"] = w
            keys["beacon_stride"] = [w] if isinstance(keys["beacon_stride"], list) else w
            positions //= scale
        model_type = {"llama2": "llama", "mistral": "mistral", "qwen": "qwen2"}[next(
            k for k in ("llama2", "mistral", "qwen") if k in name)]  # fmt: skip
        for mode in ("adapt-1024", "fit-1024"):
            cfg = BeaconConfig.from_dict(keys, beacon_ratio_mix=mode)
            bm = tiny_beacon_model(cfg, model_type=model_type, max_position_embeddings=positions)
            for multiple in args.multiples:
                n = int(positions * multiple) - args.answer
                ids = torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(n))
                cache = bm.new_cache()
                t0 = time.perf_counter()
                with torch.no_grad():
                    try:
                        out = bm.forward(ids, cache, return_token_logprobs=False, planned_length=n + args.answer)
                    except ValueError as exc:
                        rows.append({"checkpoint": name, "mode": mode, "tokens": n, "refused": str(exc)[:160]})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                seconds = time.perf_counter() - t0
                size = cache.kv_by_kind()
                row = {
                    "checkpoint": name,
                    "mode": mode,
                    "positions": positions,
                    "window": cfg.window,
                    "tokens": n,
                    "planned": n + args.answer,
                    "ratio": cache.state.fit_plan.ratio if cfg.is_fit else cache.state.fixed_ratio,
                    "condensed_windows": sum(1 for s in cache.window_sizes if s > 0),
                    "raw_kept": size["raw"],
                    "kv_entries": size["total"],
                    "read_seconds": round(seconds, 3),
                }
                if n + args.answer <= positions:
                    with torch.no_grad():
                        plain = bm.model(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()
                    row["last_logits_max_abs_diff_vs_plain"] = float((out.last_logits - plain).abs().max())
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out_path = Path(args.out) if args.out else RESULTS / f"fit_vs_adapt_configs{'_fast' if args.fast else ''}.json"
    write_json(out_path, {"rows": rows, "args": vars(args)})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
