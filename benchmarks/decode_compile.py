"""Does ``torch.compile`` pay for the decode step? The embedded model after 512 tokens of the bundled book, one process:
the decode step as shipped (eager; fused products, oneDNN packed or native, for bf16 weights on a CPU with native
bf16), the same step with ``F.linear`` kernels, and that step compiled by inductor (``dynamic=True``, ``freezing``
so that inductor packs the weights itself; inductor cannot take the already-packed weights). Reported: milliseconds per
token and the compile time (paid at the first generated token of every process).

    python benchmarks/decode_compile.py                 # bf16 where native, 2 threads
    python benchmarks/decode_compile.py --dtype float32
    python benchmarks/decode_compile.py --fast          # tiny model (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens timed per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    import beacon_llm.model as model_module
    from beacon_llm import decode

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        bm = tiny_beacon_model(beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-8"))
        ids = [3 + i % 90 for i in range(64)]
        args.tokens = 4
    else:
        bm = beacon_llm.load(dtype=args.dtype, shared=False)
        book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        ids = bm.tokenizer(book, add_special_tokens=False)["input_ids"][: args.context]
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ids, cache, planned_length=len(ids) + 4 * args.tokens + 16, return_token_logprobs=False)

    def ms_per_token(n: int) -> float:
        c = cache.fork()
        with torch.no_grad():
            bm.generate(None, cache=c, max_new_tokens=2, eos_token_id=[])  # the step's kernels made
            t = time.perf_counter()
            bm.generate(None, cache=c, max_new_tokens=n, eos_token_id=[])
        return round((time.perf_counter() - t) / n * 1000, 2)

    shipped = decode.raw_token_step
    plain = decode.DecodeLinears(bm.model)
    with torch.no_grad():
        products = bm._decode_linears().products
    rows = {"shipped": {"products": products, "ms_per_token": ms_per_token(args.tokens)}}
    try:
        model_module.raw_token_step = lambda m, linears, tok, append, attention: shipped(
            m, plain, tok, append, attention
        )
        rows["f_linear"] = {"products": "linear", "ms_per_token": ms_per_token(args.tokens)}
        compiled = torch.compile(shipped, dynamic=True, options={"freezing": True})
        model_module.raw_token_step = lambda m, linears, tok, append, attention: compiled(
            m, plain, tok, append, attention
        )
        t0 = time.perf_counter()
        try:
            ms_per_token(1)
            compile_s = round(time.perf_counter() - t0, 1)
            rows["compiled"] = {
                "products": "linear",
                "compile_s": compile_s,
                "ms_per_token": ms_per_token(args.tokens),
            }
        except Exception as e:  # recorded, not hidden: what inductor refused
            rows["compiled"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        model_module.raw_token_step = shipped
    data = {
        "model": "tiny" if args.fast else "embedded SmolLM2-135M-Instruct",
        "dtype": str(bm.dtype).removeprefix("torch."),
        "context": len(ids),
        "threads": args.threads,
        "tokens_timed": args.tokens,
        "torch": torch.__version__,
        "rows": rows,
    }
    print(json.dumps(data, indent=2))
    out = Path(args.out) if args.out else RESULTS / f"decode_compile{'_fast' if args.fast else ''}.json"
    write_json(out, data)


if __name__ == "__main__":
    main()
