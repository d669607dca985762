"""What storing an adapter as bf16 low-rank deltas costs: continuation loss of held-out book text with the
full-precision training checkpoint vs the compressed adapter (same window, ratio and input).

    python benchmarks/adapter_compression.py CHECKPOINT_DIR [COMPRESSED_DIR]
    python benchmarks/adapter_compression.py --fast
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("compressed", nargs="?", default=None, help="default: the shipped adapter")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--target", type=int, default=512)
    parser.add_argument("--ratio", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import beacon_llm

    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    overrides = {"beacon_ratio": [args.ratio], "beacon_ratio_mix": "step-random"}
    if args.fast:
        from beacon_llm.testing import tiny_base_model, tiny_beacon_model

        bm = tiny_beacon_model(beacon_llm.BeaconConfig(window=64, ratios=(args.ratio,)), max_position_embeddings=2048)
        full_dir, small_dir = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        beacon_llm.save_adapter(bm, str(full_dir))
        beacon_llm.save_adapter(bm, str(small_dir), rank=8, dtype=torch.bfloat16)
        full = beacon_llm.load_adapter(tiny_base_model(max_position_embeddings=2048), str(full_dir))
        small = beacon_llm.load_adapter(tiny_base_model(max_position_embeddings=2048), str(small_dir))
        ids = [3 + (ord(c) % 100) for c in book][:1024]
        target = 128
    else:
        path = beacon_llm.loading.resolve_model(None)
        full = beacon_llm.from_pretrained(path, adapter=args.checkpoint, **overrides)
        small = beacon_llm.from_pretrained(
            path, adapter=args.compressed or beacon_llm.loading.shipped_adapter(), **overrides
        )
        ids = full.tokenizer(book, add_special_tokens=False)["input_ids"][20000 : 20000 + args.tokens + args.target]
        target = args.target
    row = {}
    for name, bm in (("full_precision", full), ("compressed", small)):
        with torch.no_grad():
            out = bm.forward(ids)
        row[name] = round(math.exp(-float(out.token_logprobs[-target:].mean())), 4)
    row["relative_change"] = round(row["compressed"] / row["full_precision"] - 1, 5)
    print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    out_path = Path(args.out) if args.out else RESULTS / f"adapter_compression{'_fast' if args.fast else ''}.json"
    write_json(out_path, {"row": row, "args": vars(args)})


if __name__ == "__main__":
    main()
