"""Does the condensed memory carry a fact? A short held-out protocol for training recipes.

Each sample is a slice of held-out book text (the bundled Oz or the King James Bible excerpt; no recipe trains on
either) with a pass key or a needle planted in its first ``W`` windows, which are condensed (ratio 32, the ratio the
default settings condense at), ``--tail`` raw tokens after them, then the chat-formatted question and the answer in
the words the model itself starts with ("The pass key is 70370."; :func:`beacon_llm.tasks.make_condensed_recall`).
Scored on the asked value, teacher-forced: its mean NLL per token and ``exact``, every value token the argmax (what
greedy decoding after the same prefix writes). Methods at the same KV budget as the beacons (their entries + the
overlap read again raw): ``truncation`` (the raw tokens just before the tail instead), ``tail only`` (nothing before
the overlap), and ``full attention`` (the plain model over the whole sample: what the base model itself can do).
The control ``beacons, value swapped`` reads the same text with every digit of the planted value changed (d -> d + 5
mod 10) and is scored on the original value: beacons that carry the fact score worse there than with no memory,
beacons that only learned what answers look like score the same as with the fact. ``--positive-control`` adds both
with the fact in the overlap (the last condensed tokens, read again raw): what the scores look like when the cache
does hold the fact.

``--spans`` asks for the condensed text itself instead (the training task ``span`` in its default shape: 4 cues of
16 tokens quoted from the condensed part, each followed by the 32 tokens after it there, scored teacher-forced;
``token_acc`` is the share of those tokens that are the argmax): ``tail only`` is then what the model guesses
without the memory, ``full attention`` what copying from the raw text gives, and the control ``beacons, other text``
reads the same cues and spans after beacons of another sample's text (the overlap and tail unchanged): beacons that
carry the text do worse there, beacons that only learned what a quoted continuation looks like do not.

    python benchmarks/recall_protocol.py                                  # shipped adapter, 1 and 8 windows
    python benchmarks/recall_protocol.py --adapter runs/ablations/X/final --label X --methods beacons
    python benchmarks/recall_protocol.py --spans --ratio 4 --windows 1 --tail 64   # the condensed text itself
    python benchmarks/recall_protocol.py --fast                           # tiny model (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _results import mean_and_standard_error, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BOOKS = ROOT / "benchmarks" / "data" / "books"
METHODS = ("beacons", "beacons, value swapped", "beacons, other text", "truncation", "tail only", "full attention")
SPAN_ONLY, FACT_ONLY = "beacons, other text", "beacons, value swapped"  # each task's own control
WINDOWS, TAIL, PER_BOOK = (1, 8), 512, 10  # the protocol: condensed windows, raw tokens after them, samples per book
FAST = {"windows": (2,), "tail": 16, "per_book": 2, "ratio": 4}  # the tiny model's (smoke runs)


def held_out_texts(fast: bool) -> list[str]:
    """The protocol's held-out books: the bundled Oz and the KJV excerpt (a part of Oz for the tiny model)."""
    import beacon_llm

    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    return [book[:20000]] if fast else [book, (BOOKS / "kjv_bible_excerpt.txt").read_text()]


def recall_samples(
    tok, config, texts: list[str], n_per_book: int, windows: int, tail: int, ratio: int, seed: int,
    in_overlap: bool = False, spans: bool = False,
):  # fmt: skip
    """Held-out (sample, plan) pairs: pass keys and needles alternating, ``n_per_book`` per text. ``in_overlap``: the
    fact in the last ``fit_overlap`` condensed tokens instead, which are read again raw after the beacons. ``spans``:
    the condensed text itself asked for instead (:func:`beacon_llm.tasks.make_condensed_spans`, the training task's
    default sizes)."""
    from beacon_llm.schedule import condensing_plan
    from beacon_llm.tasks import RECALL_TASKS, make_condensed_recall, make_condensed_spans

    if spans and in_overlap:
        raise ValueError("the span task asks for text outside the overlap; in_overlap applies to facts only")
    rng = np.random.default_rng([seed, windows, tail])
    head = windows * config.window - config.fit_overlap if in_overlap else config.sink_size
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i in range(n_per_book):
            if spans:
                sample, used = make_condensed_spans(ids, window=config.window, windows=windows, tail=tail,
                                                    keep_raw=config.fit_overlap, raw_head=head, rng=rng)  # fmt: skip
            else:
                sample, used = make_condensed_recall(RECALL_TASKS[i % len(RECALL_TASKS)], ids, tok,
                                                     window=config.window, windows=windows, tail=tail,
                                                     keep_raw=0 if in_overlap else config.fit_overlap, raw_head=head,
                                                     rng=rng)  # fmt: skip
            if in_overlap and used != windows:
                raise ValueError(f"the fact is longer than the overlap ({config.fit_overlap} tokens)")
            out.append((sample, condensing_plan(config, len(sample.input_ids), used, ratio)))
    return out


def swap_value(sample, tok, upto: int):
    """``sample`` with the digits of its labelled value changed (d -> d + 5 mod 10) wherever the value's digit tokens
    occur before token ``upto`` (the planted fact); the labels keep the original value."""
    from beacon_llm.tasks import IGNORE

    value = [t for t in sample.labels if t != IGNORE]
    digits = [t for t in value if tok.decode([t]).strip().isdigit()]
    swapped = [tok.convert_tokens_to_ids(str((int(tok.decode([t]).strip()) + 5) % 10)) for t in digits]
    ids, n, found = list(sample.input_ids), len(digits), 0
    for i in range(upto - n + 1):
        if ids[i : i + n] == digits:
            ids[i : i + n] = swapped
            found += 1
    if not digits or not found:
        raise ValueError(f"the value {tok.decode(value)!r} is not in the first {upto} tokens as single-digit tokens")
    return replace(sample, input_ids=ids)


@torch.no_grad()
def plain_value_scores(model, sample, cut: int) -> dict[str, float]:
    """The plain model over ``sample`` from token ``cut`` on, scored as the beacons are (``labelled_scores``)."""
    from beacon_llm.tasks import IGNORE
    from beacon_llm.training import labelled_scores

    at = [i for i, label in enumerate(sample.labels) if label != IGNORE]
    logits = model(input_ids=torch.tensor([sample.input_ids[cut:]])).logits[0].float()  # (T, V)
    return labelled_scores(logits[[i - 1 - cut for i in at]], torch.tensor([sample.labels[i] for i in at]))[1]


def other_text(samples, k: int):
    """Sample ``k`` with the part only its beacons hold (the condensed tokens before the overlap) taken from the next
    sample instead: the span control (beacons that carry the text do worse on another text's memory)."""
    sample, plan = samples[k]
    other, other_plan = samples[(k + 1) % len(samples)]
    cut = plan.raw_from - plan.overlap
    if len(samples) < 2 or other_plan.raw_from - other_plan.overlap != cut:
        raise ValueError("the other-text control needs at least 2 samples with the same condensed length")
    return replace(sample, input_ids=other.input_ids[:cut] + sample.input_ids[cut:])


def score(method: str, bm, samples, tok) -> dict:
    """Mean value NLL, exact count and the KV entries before the tail, over ``samples``, for one method."""
    from beacon_llm.training import recall_loss

    nll, exact, acc, entries = [], 0, [], []
    used = float(np.mean([plan.condensed_windows for _, plan in samples]))
    for k, (sample, plan) in enumerate(samples):
        budget = plan.entries(plan.raw_from)  # the beacon cache's entries once the condensed windows close
        if method.startswith("beacons"):
            read = sample
            if method == FACT_ONLY:
                read = swap_value(sample, tok, plan.raw_from)
            elif method == SPAN_ONLY:
                read = other_text(samples, k)
            with torch.no_grad():
                _, parts = recall_loss(bm, read, plan)
        else:
            cut = {"truncation": plan.raw_from - budget, "tail only": plan.raw_from - plan.overlap,
                   "full attention": 0}[method]  # fmt: skip
            parts = plain_value_scores(bm.model, sample, cut)
            budget = plan.raw_from - cut
        nll.append(parts["nll"])
        exact += int(parts["exact"])
        acc.append(parts["token_acc"])
        entries.append(budget)
    return {"value_nll": round(float(np.mean(nll)), 4), "exact": exact, "samples": len(samples),
            "exact_share": round(exact / len(samples), 4), "token_acc": round(float(np.mean(acc)), 4),
            "kv_entries_before_tail": int(np.mean(entries)),
            "condensed_windows": used, "value_nll_each": [round(float(x), 4) for x in nll]}  # fmt: skip


def paired(control: dict, beacons: dict) -> dict:
    """The control against the beacons on the same samples: the mean per-sample difference of value NLL (control -
    beacons; positive when the sample's own memory helps), its standard error, and in how many samples the control
    is worse."""
    diff = [c - b for c, b in zip(control["value_nll_each"], beacons["value_nll_each"], strict=True)]
    mean, se = mean_and_standard_error(diff)
    return {"mean_nll_diff": round(mean, 4), "standard_error": None if se is None else round(se, 4),
            "control_worse": sum(d > 0 for d in diff), "samples": len(diff)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument(
        "--windows", type=int, nargs="+", default=list(WINDOWS), help="condensed windows before the tail"
    )
    parser.add_argument("--tail", type=int, default=TAIL, help="raw tokens between the condensed part and the question")
    parser.add_argument("--n", type=int, default=PER_BOOK, help="samples per book and window count")
    parser.add_argument("--ratio", type=int, default=32)
    parser.add_argument("--adapter", default=None, help="beacon adapter folder (default: the shipped one)")
    parser.add_argument("--label", default=None, help="row name of the beacons (default: the adapter folder)")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="default: all that apply")
    parser.add_argument(
        "--spans", action="store_true",
        help="ask for the condensed text itself (4 quoted cues, the 32 tokens after each) instead of a fact; writes "
        "recall_protocol_spans.json",
    )  # fmt: skip
    parser.add_argument(
        "--positive-control",
        action="store_true",
        help="also the beacons with the fact in the overlap read again raw (and its swapped value)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.spans and (args.positive_control or FACT_ONLY in (args.methods or ())):
        parser.error("--spans asks for text, not a value: no value-swapped reading and no --positive-control")
    if not args.spans and SPAN_ONLY in (args.methods or ()):
        parser.error(f"{SPAN_ONLY!r} is the control of --spans (facts have {FACT_ONLY!r})")
    args.methods = args.methods or [m for m in METHODS if m != (FACT_ONLY if args.spans else SPAN_ONLY)]
    torch.set_num_threads(args.threads)

    import beacon_llm

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model, tiny_tokenizer

        cfg = beacon_llm.BeaconConfig(window=64, ratios=(4,), ratio_mix="fit-0", fit_overlap=64)
        bm = tiny_beacon_model(cfg, max_position_embeddings=1024)
        tok = tiny_tokenizer()
        args.windows, args.tail, args.n = list(FAST["windows"]), FAST["tail"], FAST["per_book"]
        args.ratio, args.positive_control = FAST["ratio"], not args.spans
        label = "tiny"
    else:
        bm = beacon_llm.load(adapter=args.adapter, dtype="float32", shared=False, beacon_ratio_mix="fit-0")
        tok = bm.tokenizer
        label = args.label or (Path(args.adapter).name if args.adapter else "shipped adapter")
    texts = held_out_texts(args.fast)
    name = "recall_protocol" + ("_spans" if args.spans else "") + ("_fast" if args.fast else "")
    out_path = Path(args.out) if args.out else RESULTS / f"{name}.json"
    data = json.loads(out_path.read_text()) if out_path.is_file() and not args.fast else {"rows": []}
    from beacon_llm.tasks import SPAN_CUE, SPAN_PAIRS, SPAN_TOKENS

    spans = f"{SPAN_PAIRS} cues of {SPAN_CUE} tokens, the next {SPAN_TOKENS} each"
    tasks = spans if args.spans else "pass key / needle alternating"
    data["protocol"] = {"samples_per_book": args.n, "books": "Oz (bundled) + KJV excerpt" if not args.fast else "tiny",
                        "fit_overlap": bm.config.fit_overlap, "tasks": tasks,
                        "tail": "per row (raw tokens between the condensed part and the question)"}  # fmt: skip
    rows = []
    t0 = time.perf_counter()

    def score_rows(methods, samples, windows: int, prefix: str) -> None:
        """One row per method on the same ``samples`` (``prefix`` names the beacons); each control is paired with
        the beacons' row, whatever the order of the methods."""
        batch = {m: {"method": m.replace("beacons", prefix) if m.startswith("beacons") else m, "windows": windows,
                     **score(m, bm, samples, tok)} for m in methods}  # fmt: skip
        for method, row in batch.items():
            row["value_ppl"] = round(math.exp(row["value_nll"]), 3)
            if method in (FACT_ONLY, SPAN_ONLY) and "beacons" in batch:
                row["paired_vs_beacons"] = paired(row, batch["beacons"])
            rows.append(row)
            print(json.dumps(row), flush=True)

    for windows in args.windows:
        samples = recall_samples(tok, bm.config, texts, args.n, windows, args.tail, args.ratio, args.seed,
                                 spans=args.spans)  # fmt: skip
        score_rows(args.methods, samples, windows, f"beacons ({label})")
        if args.positive_control:
            control = recall_samples(tok, bm.config, texts, args.n, windows, args.tail, args.ratio, args.seed, True)
            score_rows(("beacons", FACT_ONLY), control, windows, f"beacons ({label}), fact in the overlap")
    for row in rows:
        row["ratio"], row["tail"] = args.ratio, args.tail

    def key(r: dict) -> tuple:
        return r["method"], r["windows"], r["ratio"], r.get("tail", TAIL)  # rows without one were read with TAIL

    keys = {key(r) for r in rows}
    if out_path.is_file() and not args.fast:  # re-read: another run may have added rows meanwhile
        data["rows"] = json.loads(out_path.read_text())["rows"]
    data["rows"] = [r for r in data["rows"] if key(r) not in keys] + rows
    data["rows"].sort(key=lambda r: (r["ratio"], r.get("tail", TAIL), r["windows"], r["method"]))
    write_json(out_path, data)
    print(f"wrote {out_path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
