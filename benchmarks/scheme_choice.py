"""Which placement / attention scheme to train for the embedded model: held-out continuation loss of the
*initialised* (untrained) beacons of each scheme, at the same window and ratio, plus the plain model's loss with the
same KV budget (truncation) as the floor a useful scheme must beat.

    python benchmarks/scheme_choice.py                 # SmolLM2, 4K tokens of held-out text, window 512, ratio 8
    python benchmarks/scheme_choice.py --fast
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"
SCHEMES = {
    "interleave + full-coverage (v3, Qwen-2 release)": dict(pos="interleave", attn="full-coverage"),
    "append + full-coverage (v3)": dict(pos="append", attn="full-coverage"),
    "append + step-expansion, attend_prev (v3)": dict(pos="append", attn="step-expansion", attend_prev=True),
    "append + step-expansion (v2, Llama-2 release)": dict(era="v2", pos="append", attn="step-expansion"),
    "append + segmentation (v2)": dict(era="v2", pos="append", attn="segmentation"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--target", type=int, default=512)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--ratio", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm import BeaconConfig, BeaconModel
    from beacon_llm.layers import detach_beacon_modules

    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    if args.fast:
        from beacon_llm.testing import tiny_base_model

        base = tiny_base_model(max_position_embeddings=2048)
        ids = [3 + (ord(c) % 100) for c in book]
        window, context, target = 64, 512, 128
    else:
        from beacon_llm import _compat

        path = beacon_llm.loading.resolve_model(None)
        base = _compat.load_base_model(path, _compat.load_base_config(path)).eval()
        ids = _compat.load_tokenizer(path)(book, add_special_tokens=False)["input_ids"]
        window, context, target = args.window, args.context, args.target
    start = 20000 if len(ids) > 20000 + context + target else 0  # the middle of the book
    seq = ids[start : start + context + target]
    rows = []
    for name, kw in SCHEMES.items():
        bm = BeaconModel.attach(base, BeaconConfig(window=window, ratios=(args.ratio,), **kw))
        t0 = time.perf_counter()
        with torch.no_grad():
            out = bm.forward(seq)
        nll = -float(out.token_logprobs[-target:].mean())
        rows.append(
            {
                "scheme": name,
                "ppl": round(math.exp(nll), 3),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        detach_beacon_modules(base)
    budget = context // args.ratio
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([seq[context - budget :]])).logits[0, budget - 1 : -1].float()
    trunc = math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(seq[context:]))))
    rows.append({"scheme": f"plain model, last {budget} tokens (same KV budget)", "ppl": round(trunc, 3)})
    print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    out_path = Path(args.out) if args.out else RESULTS / f"scheme_choice{'_fast' if args.fast else ''}.json"
    write_json(out_path, {"rows": rows, "args": vars(args)})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
