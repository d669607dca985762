"""A bf16 read with the layers' own norms, RoPE and MLP against the native row kernels (``beacon_llm.read_layers``,
``kernels/rows_bf16.c``), in one process, alternating so that both see the same machine state.

The embedded model reads the first ``--length`` tokens of the bundled book with the default schedule (both runs with
the same attention kernel); each round times one read of each. Reports the best and median wall and CPU seconds and
how far the two reads' final hidden states and next-token log-probabilities are apart.

    python benchmarks/read_layers.py --out benchmarks/results/read_layers_amd_epyc.json
    python benchmarks/read_layers.py --fast         # tiny bf16 model, small sizes (CI smoke run)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=None, help="tokens read (default 8192)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm import model as beacon_model
    from beacon_llm import native_kernels

    if args.fast:
        from beacon_llm.testing import NATIVE_HEAD_SHAPES, tiny_beacon_model

        config = beacon_llm.BeaconConfig(window=32, ratios=(4,), ratio_mix="fit-8")
        bm = tiny_beacon_model(config, max_position_embeddings=128, **NATIVE_HEAD_SHAPES["llama"])
        bm.model.to(torch.bfloat16)
        length = args.length or 300
        ids = [4 + (i * 7) % 96 for i in range(length)]
    else:
        bm = beacon_llm.load()
        length = args.length or 8192
        book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        ids = bm.tokenizer(book, add_special_tokens=False)["input_ids"][:length]
    rounds = args.rounds or (1 if args.fast else 4)
    with_kernels = beacon_model.read_layers

    def read(mode: str, score: bool = False) -> tuple[float, float, object]:
        """One read (timed without scoring each token; ``score``: with its log-probabilities, for the difference)."""
        beacon_model.read_layers = with_kernels if mode == "row_kernels" else (lambda model, like: None)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out = bm.forward(
                    ids,
                    bm.new_cache(),
                    planned_length=length + (8 if args.fast else 256),
                    return_hidden=True,
                    return_token_logprobs=score,
                )
            return time.perf_counter() - t0, time.process_time() - c0, out
        finally:
            beacon_model.read_layers = with_kernels

    modes = ("modules", "row_kernels")
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes:
            w, c, _ = read(mode)
            wall[mode].append(w)
            cpu[mode].append(c)
        print(f"round {r + 1}: " + "  ".join(f"{m} {wall[m][-1]:.2f} s" for m in modes), flush=True)
    a, b = (read(mode, score=True)[2] for mode in modes)
    rows = {
        m: {
            "wall_best_s": round(min(wall[m]), 2),
            "wall_median_s": round(statistics.median(wall[m]), 2),
            "cpu_best_s": round(min(cpu[m]), 2),
            "cpu_median_s": round(statistics.median(cpu[m]), 2),
            "wall_s": [round(x, 2) for x in wall[m]],
        }
        for m in modes
    }
    difference = {
        "hidden_max_abs": float((a.hidden.float() - b.hidden.float()).abs().max()),
        "hidden_equal": bool(torch.equal(a.hidden, b.hidden)),
        "logprob_mean_abs": float((a.token_logprobs - b.token_logprobs).abs().mean()),
        "argmax_agreement": float((a.argmax_next == b.argmax_next).float().mean()),
    }
    for m in modes:
        print(f"{m:12s} best {rows[m]['wall_best_s']:.2f} s, median {rows[m]['wall_median_s']:.2f} s wall")
    print("difference:", difference)
    result = {
        "machine": machine_info(args.threads),
        "native_kernels": native_kernels.unavailable() or "used",
        "length": length,
        "rounds": rounds,
        "runs": rows,
        "best_wall_ratio": round(rows["row_kernels"]["wall_best_s"] / rows["modules"]["wall_best_s"], 3),
        "difference": difference,
    }
    out = Path(args.out) if args.out else RESULTS / f"read_layers{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
