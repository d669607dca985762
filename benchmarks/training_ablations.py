"""Training recipes for the embedded model's beacons, compared on one held-out protocol (one row per run).

Protocol (the regime the default fit-N schedule reads in): held-out samples of 2,048 tokens (4 from The Wonderful
Wizard of Oz, 4 from the King James Bible excerpt; no recipe trains on either) are planned as if the model had
``--positions`` (1,024) positions, so their first windows are condensed at ratio 32 and the last tokens are read raw
after the beacons. Scored on those last tokens: perplexity and KL to the teacher (the plain model reading the whole
sample, top-32 tokens). Baselines at the same KV budget (the beacon entries + the raw tail): truncation (the raw tokens
just before the tail instead of the beacons), StreamingLLM (4 sink tokens + recent ones), and full attention.

    python benchmarks/training_ablations.py --recipe baselines          # shipped adapter, fresh beacons, baselines
    python benchmarks/training_ablations.py --recipe kl_r32 --steps 25  # train a recipe, evaluate, add a row
    python benchmarks/training_ablations.py --fast                      # tiny model (CI smoke run)

Runs go to ``runs/ablations/<recipe>`` (resumable), the teacher's top-k to ``runs/teacher`` (the tail-only
reference of the distance-weighted recipes to ``runs/teacher_tail_only``). A recipe that ``continues`` another starts
from its last checkpoint, step count included: ``--steps`` is the total (the parent's steps + this recipe's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BOOKS = ROOT / "benchmarks" / "data" / "books"
TRAIN_BOOKS = ("frankenstein", "adventures_of_sherlock_holmes", "pride_and_prejudice", "dracula",
               "tale_of_two_cities", "oliver_twist")  # fmt: skip
# the adapters a recipe can start from ("init"), with the tokens they were trained on (the model card's sittings);
# "fresh" starts from untrained beacons
SHIPPED_TOKENS = 2_129_920
FIRST_SITTING = ROOT / "benchmarks" / "adapters" / "smollm2-135m-instruct-interleave-368k"
FIRST_SITTING_TOKENS = 368_640
# the shipped adapter + 1,351,680 tokens in the long-read shape (kl_r32_overlap64_8k, then its _long), exported
LONG_READ = ROOT / "benchmarks" / "adapters" / "smollm2-135m-instruct-long-read-3.5m"
LONG_READ_TOKENS = 3_481_600
# the shipped adapter + 589,366 tokens of span samples at ratio 4 (span_only_r4_overlap64 in bf16, 400 steps), exported
SPAN_R4 = ROOT / "benchmarks" / "adapters" / "smollm2-135m-instruct-span-r4-2.72m"
SPAN_R4_TOKENS = 2_719_286
# SPAN_R4 + 449,442 tokens of span_kl_mixed_overlap64 (160 steps in bf16), exported
SPAN_MIXED = ROOT / "benchmarks" / "adapters" / "smollm2-135m-instruct-span-mixed-3.17m"
SPAN_MIXED_TOKENS = 3_168_728
# SPAN_MIXED + 977,854 tokens of span_kl_text_r32_from_mixed (its checkpoint 290 of 360 in bf16), exported
SPAN_TEXT = ROOT / "benchmarks" / "adapters" / "smollm2-135m-instruct-span-text-4.15m"
SPAN_TEXT_TOKENS = 4_146_582
# SPAN_TEXT + 1,345,760 tokens of span_kl_text_r32_from_export (400 steps in bf16), exported
SPAN_TEXT_5M = ROOT / "benchmarks" / "adapters" / "smollm2-135m-instruct-span-text-5.49m"
SPAN_TEXT_5M_TOKENS = 5_492_342
INIT_ADAPTERS = {"first_sitting": FIRST_SITTING, "long_read": LONG_READ, "span_r4": SPAN_R4, "span_mixed": SPAN_MIXED,
                 "span_text": SPAN_TEXT, "span_text_5m": SPAN_TEXT_5M}  # fmt: skip
INIT_TOKENS = {"shipped": SHIPPED_TOKENS, "first_sitting": FIRST_SITTING_TOKENS, "long_read": LONG_READ_TOKENS,
               "span_r4": SPAN_R4_TOKENS, "span_mixed": SPAN_MIXED_TOKENS, "span_text": SPAN_TEXT_TOKENS,
               "span_text_5m": SPAN_TEXT_5M_TOKENS, "fresh": 0}  # fmt: skip
# name -> (start from, ratios drawn per sample, KL weight, CE weight, learning rate[, distant: FitTrainConfig's
# distant_weight, the KL weighted toward tail tokens the tail alone predicts badly][, overlap: the model's
# fit_overlap in training and evaluation][, protocol: (seq_len, positions) the recipe trains and is scored in]
# [, gates: memory gates added at "init" and trained at "lr", "only" = the rest of the adapter frozen]
# [, recall: the share of samples that are facts planted in the condensed windows ("rate"), up to "windows" condensed
# windows and "tail" raw tokens before the question, "tasks" what they ask (default: pass key and needle; "span" the
# condensed text itself): FitTrainConfig's recall_*][, pos: the placement of fresh beacons,
# "append" or the shipped "interleave"])
_LONG_READ = {"init": "shipped", "ratios": (32,), "kl": 1.0, "ce": 0.0, "lr": 1e-4, "overlap": 64,
              "protocol": (8192, 4096)}  # fmt: skip
_ONLY_R4 = {"init": "shipped", "ratios": (4,), "kl": 0.0, "ce": 0.0, "lr": 3e-4, "overlap": 64}  # task samples only
RECIPES: dict[str, dict] = {
    "ce_r32": {"init": "first_sitting", "ratios": (32,), "kl": 0.0, "ce": 1.0, "lr": 1e-4},
    "kl_r32": {"init": "first_sitting", "ratios": (32,), "kl": 1.0, "ce": 0.0, "lr": 1e-4},
    "kl_ce_r32": {"init": "first_sitting", "ratios": (32,), "kl": 1.0, "ce": 0.5, "lr": 1e-4},
    "kl_r32_lr3e-4": {"init": "first_sitting", "ratios": (32,), "kl": 1.0, "ce": 0.0, "lr": 3e-4},
    "kl_r32_lr1e-3": {"init": "first_sitting", "ratios": (32,), "kl": 1.0, "ce": 0.0, "lr": 1e-3},
    "kl_mixed": {"init": "first_sitting", "ratios": (8, 16, 32), "kl": 1.0, "ce": 0.0, "lr": 1e-4},
    "kl_r32_fresh": {"init": "fresh", "ratios": (32,), "kl": 1.0, "ce": 0.0, "lr": 3e-4},
    # the best short run, trained on: starts from the last checkpoint of kl_r32 (same precision), new lr schedule
    "kl_r32_long": {"init": "first_sitting", "ratios": (32,), "kl": 1.0, "ce": 0.0, "lr": 1e-4, "continues": "kl_r32"},
    "kl_r32_long2": {
        "init": "first_sitting",
        "ratios": (32,),
        "kl": 1.0,
        "ce": 0.0,
        "lr": 1e-4,
        "continues": "kl_r32_long",
    },
    # the plateaued kl_r32_long2, trained on with the KL weighted by the teacher's distance to the tail-only model
    "kl_r32_distant": {
        "init": "first_sitting",
        "ratios": (32,),
        "kl": 1.0,
        "ce": 0.0,
        "lr": 1e-4,
        "distant": 0.8,
        "continues": "kl_r32_long2",
    },
    # kl_r32_long2 trained on with the last 64 condensed tokens read again raw after the beacons (fit_overlap)
    "kl_r32_overlap64": {
        "init": "first_sitting",
        "ratios": (32,),
        "kl": 1.0,
        "ce": 0.0,
        "lr": 1e-4,
        "overlap": 64,
        "continues": "kl_r32_long2",
    },
    # the shipped adapter (kl_r32_overlap64) trained on in the shape of a long read: 8,192-token samples planned for
    # 4,096 positions, so the tail after the beacons is thousands of tokens long, as after a book (protocol: the same)
    "kl_r32_overlap64_8k": _LONG_READ,
    # kl_r32_overlap64_8k trained on (its last checkpoint, a new linear decay over the added steps)
    "kl_r32_overlap64_8k_long": {**_LONG_READ, "continues": "kl_r32_overlap64_8k"},
    # the next sitting from a clone: the same recipe from the committed export of kl_r32_overlap64_8k_long
    "kl_r32_overlap64_8k_from_long_read": {**_LONG_READ, "init": "long_read"},
    # memory gates (one per layer and query head, starting at 1 = the shipped adapter as it reads) trained alone on
    # the shipped adapter, in the long-read shape: how much each head should trust the beacons
    "gates_r32_overlap64_8k": {**_LONG_READ, "gates": {"init": 1.0, "lr": 3e-2, "only": True}},
    # the same gates trained together with the adapter (lr 1e-4, as kl_r32_overlap64_8k): compare at equal tokens
    # with that recipe's checkpoint of the same step
    "gates_kl_r32_overlap64_8k": {**_LONG_READ, "gates": {"init": 1.0, "lr": 3e-2, "only": False}},
    # the shipped adapter taught to carry facts: half the samples a pass key or needle planted in 1-4 condensed windows
    # and asked for after up to 1,024 raw tokens (cross-entropy of the value), half KL on text as kl_r32_overlap64
    "recall_kl_r32_overlap64": {
        "init": "shipped",
        "ratios": (32,),
        "kl": 1.0,
        "ce": 0.0,
        "lr": 1e-4,
        "overlap": 64,
        "recall": {"rate": 0.5, "windows": 4, "tail": 1024},
    },
    # fresh beacons trained in the fit regime with the overlap, at equal tokens and data: the placement chosen from
    # the paper (interleave) against append, which hurt less untrained (scheme_choice.json: 41 against 105)
    "kl_r32_overlap64_fresh": {"init": "fresh", "ratios": (32,), "kl": 1.0, "ce": 0.0, "lr": 3e-4, "overlap": 64},
    "kl_r32_overlap64_fresh_append": {
        "init": "fresh",
        "ratios": (32,),
        "kl": 1.0,
        "ce": 0.0,
        "lr": 3e-4,
        "overlap": 64,
        "pos": "append",
    },
    # can beacons carry a fact at all when they condense little? Recall samples only, ratio 4, lr 3e-4
    "recall_only_r4_overlap64": {**_ONLY_R4, "recall": {"rate": 1.0, "windows": 2, "tail": 512}},
    # the same question with dense labels: the condensed text itself, asked for by 4 quoted cues of 16 tokens, each
    # followed by the 32 tokens it precedes there (tasks.make_condensed_spans), one window at ratio 4
    "span_only_r4_overlap64": {**_ONLY_R4, "recall": {"rate": 1.0, "windows": 1, "tail": 64, "tasks": ("span",)}},
    # span_only_r4_overlap64 trained on towards the default reading: every ratio the default condenses at or below,
    # half the samples spans, half KL on text (so the text the beacons condense stays readable); its --steps count
    # the parent's too, and the learning rate decays linearly from where that count puts it
    "span_kl_mixed_overlap64": {
        "init": "shipped",
        "ratios": (4, 8, 16, 32),
        "kl": 1.0,
        "ce": 0.0,
        "lr": 3e-4,
        "overlap": 64,
        "recall": {"rate": 0.5, "windows": 1, "tail": 64, "tasks": ("span",)},
        "continues": "span_only_r4_overlap64",
    },
}
# the next sitting from a clone: the same recipes from the committed exports of their last runs (400 steps of the
# span task; 160 more of the mixed recipe); these start a new learning-rate decay from the recipe's lr
RECIPES["span_only_r4_overlap64_from_export"] = {**RECIPES["span_only_r4_overlap64"], "init": "span_r4"}
RECIPES["span_kl_mixed_overlap64_from_export"] = {
    **{k: v for k, v in RECIPES["span_kl_mixed_overlap64"].items() if k != "continues"},
    "init": "span_mixed",
}
# the mixed export trained on towards the default's text: half the samples condensed at ratio 32 (the default's), a
# quarter of them spans, the rest KL on text, at a third of the learning rate (its text KL was still falling)
RECIPES["span_kl_text_r32_from_mixed"] = {
    **RECIPES["span_kl_mixed_overlap64_from_export"],
    "ratios": (8, 16, 32, 32),
    "lr": 1e-4,
    "recall": {"rate": 0.25, "windows": 1, "tail": 64, "tasks": ("span",)},
}
# the same from its export (checkpoint 290 of a 360-step run, lr then 2e-5): a new linear decay from 1e-4 (the same
# sample stream, so its first 290 steps read the parent's samples a second time)
RECIPES["span_kl_text_r32_from_export"] = {**RECIPES["span_kl_text_r32_from_mixed"], "init": "span_text"}
# the next sitting from that run's export: the same recipe on samples neither run drew (another stream seed)
RECIPES["span_kl_text_r32_from_5m"] = {**RECIPES["span_kl_text_r32_from_mixed"], "init": "span_text_5m", "data_seed": 1}


def held_out_samples(tok, seq_len: int, n_per_book: int, seed: int) -> list[list[int]]:
    import beacon_llm

    texts = [beacon_llm.read_document(beacon_llm.BUNDLED_BOOK), (BOOKS / "kjv_bible_excerpt.txt").read_text()]
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in rng.choice(len(ids) - seq_len, n_per_book, replace=False):
            out.append(ids[int(start) : int(start) + seq_len])
    return out


@torch.no_grad()
def plain_tail_scores(model, samples, plan_for, teacher, keep, score_from: int = 0) -> dict[str, float]:
    """The plain model on the tail after a context chosen by ``keep(ids, plan) -> kept ids before the tail``
    (scored from offset ``score_from`` of the tail on)."""
    from beacon_llm.distill import topk_kl

    nll = kl = 0.0
    n = 0
    device = next(model.parameters()).device
    for ids in samples:
        plan = plan_for(ids)
        start = plan.raw_from
        kept = keep(ids, plan)
        seq = kept + ids[start:]
        logits = model(input_ids=torch.tensor([seq], device=device)).logits[0, len(kept) - 1 + score_from : -1]
        logits = logits.float()  # (T, V)
        target = torch.tensor(ids[start + score_from :], device=device)
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        if teacher is not None:
            idx, logp = teacher.get(ids, start)
            kl += float(topk_kl(logits, idx[score_from:].to(device), logp[score_from:].to(device)).sum())
        n += len(target)
    return {"kl": round(kl / n, 4), "ppl": round(math.exp(nll / n), 3), "tokens": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="baselines", choices=["baselines", *RECIPES])
    parser.add_argument("--steps", type=int, default=25, help="optimiser steps (grad-accum x seq-len tokens each)")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--held-out", type=int, default=4, help="samples per held-out book")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training (evaluation stays fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=str(ROOT / "runs"))
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--eval-ratio", type=int, default=32,
                        help="ratio of the condensed windows in the held-out protocol (rows of other ratios are named "
                        "'<recipe> @r<ratio>'; baselines then keep the matching budget)")  # fmt: skip
    parser.add_argument(
        "--overlap", type=int, default=None,
        help="fit_overlap of the evaluation (default: the recipe's, 0 for baselines): the last N condensed tokens "
        "read again raw; rows get ' +overlapN' and the baselines' budget grows by N",
    )  # fmt: skip
    parser.add_argument(
        "--fresh-pos", choices=["interleave", "append"], default="interleave",
        help="baselines: the placement of the fresh (untrained) beacons scored (named in the row unless interleave)",
    )  # fmt: skip
    parser.add_argument(
        "--shipped-only",
        action="store_true",
        help="baselines: score the plain baselines and the shipped adapter only (no fresh beacons, no runs' adapters)",
    )
    parser.add_argument(
        "--adapter", nargs="+", default=[], metavar="DIR",
        help="baselines: also score these adapter folders (e.g. a run's export), one row each named after the folder",
    )  # fmt: skip
    parser.add_argument(
        "--late", type=int, default=None, metavar="N",
        help="score every existing row again on the tail tokens from offset N on (what the memory adds once the tail "
        "gives the local context): adds kl_late / ppl_late to the rows (baselines and the runs' final adapters)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm.distill import TeacherStore
    from beacon_llm.schedule import fit_plan
    from beacon_llm.tasks import SampleStream
    from beacon_llm.training import FitTrainConfig, evaluate_fit, train_fit

    runs = Path(args.runs)
    eval_ratio = args.eval_ratio
    overlap = args.overlap if args.overlap is not None else int(RECIPES.get(args.recipe, {}).get("overlap", 0))
    if args.fast:
        import tempfile

        from beacon_llm.testing import tiny_beacon_model

        runs = Path(tempfile.mkdtemp(prefix="ablation-"))
        overlap = min(overlap, 16)
        cfg = beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-0", fit_overlap=overlap)
        shipped = tiny_beacon_model(cfg, max_position_embeddings=512)
        fresh = tiny_beacon_model(cfg, max_position_embeddings=512, perturb=0.0)
        args.seq_len, args.positions, args.steps, args.held_out, eval_ratio = 128, 64, 2, 1, 4
        # tiny runs start afresh: no parent run to continue from
        recipes = {k: {**{f: x for f, x in v.items() if f != "continues"}, "ratios": (4,)} for k, v in RECIPES.items()}
    else:
        shipped = beacon_llm.load(beacon_ratio_mix="fit-0", beacon_fit_overlap=overlap, shared=False,
                                  dtype="float32")  # evaluation in fp32  # fmt: skip
        fresh = None
        recipes = RECIPES
    tok, base = shipped.tokenizer, shipped.model
    teacher = TeacherStore(base, runs / "teacher", k=32)
    held = held_out_samples(tok, args.seq_len, args.held_out, seed=11)

    def plan_for(ids):
        return fit_plan(shipped.config, len(ids), args.positions, ratio=eval_ratio)

    out_path = Path(args.out) if args.out else RESULTS / f"training_ablations{'_fast' if args.fast else ''}.json"
    data = json.loads(out_path.read_text()) if out_path.is_file() else {"protocol": {}, "rows": []}
    suffix = ("" if eval_ratio == 32 or args.fast else f" @r{eval_ratio}") + (f" +overlap{overlap}" if overlap else "")
    if not suffix or args.fast or not data["protocol"]:  # the protocol of a new results file
        data["protocol"] = {"seq_len": args.seq_len, "positions": args.positions, "ratio": eval_ratio,
                            "held_out": "4 x Oz + 4 x KJV excerpt" if not args.fast else "tiny", "teacher_topk": 32,
                            "condensed_windows": plan_for(held[0]).condensed_windows,
                            "tail_tokens": args.seq_len - plan_for(held[0]).raw_from}  # fmt: skip
    rows: list[dict] = []
    t0 = time.perf_counter()
    if args.late is not None:
        late_rows(args, data, shipped, fresh, base, held, teacher, runs)
        scored = {r["recipe"]: r for r in data["rows"] if r.get("late_from") == args.late}
        if out_path.is_file():  # re-read: another run may have added rows meanwhile
            data["rows"] = json.loads(out_path.read_text())["rows"]
        data["rows"] = [{**r, **scored.get(r["recipe"], {})} for r in data["rows"]]
        write_json(out_path, data)
        print(f"wrote {out_path} ({time.perf_counter() - t0:.0f} s)")
        return
    if args.recipe == "baselines":
        n_mem = plan_for(held[0]).entries(plan_for(held[0]).raw_from)  # beacon entries before the tail
        for name in BASELINES:
            keep = baseline_keep(name, n_mem)
            rows.append({"recipe": name + suffix, "tokens_trained": 0,
                         **plain_tail_scores(base, held, plan_for, teacher, keep)})  # fmt: skip
        shipped_tokens = SHIPPED_TOKENS if not args.fast else 0
        fresh_name = "fresh beacons (untrained" + (")" if args.fresh_pos == "interleave" else f", {args.fresh_pos})")
        adapters = [("shipped adapter (no further training)", shipped, shipped_tokens),
                    (fresh_name, None, 0)][: 1 if args.shipped_only else 2]  # fmt: skip
        adapters += [(f"adapter {d}", Path(d), None) for d in args.adapter]  # tokens: see its run
        for name, bm, tokens in adapters:
            where = {}
            if isinstance(bm, Path):
                where = {"adapter_dir": str(bm)}  # what a --late run loads again
                bm = beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None), adapter=str(bm),
                                                beacon_ratio_mix="fit-0", beacon_fit_overlap=overlap)  # fmt: skip
            elif bm is None:
                bm = fresh_beacons(args, shipped, fresh, args.fresh_pos)
            scores = evaluate_fit(bm, held, args.positions, eval_ratio, teacher)
            rows.append({"recipe": name + suffix, "tokens_trained": tokens, **where,
                         **{k: round(v, 4) for k, v in scores.items()}})  # fmt: skip
        if overlap and not args.fast and not args.shipped_only:  # the runs' adapters trained without it, read with it
            for run in sorted((runs / "ablations").glob("*/final/beacon_model.safetensors")):
                name = run.parent.parent.name
                if int(RECIPES.get(name.split("+")[0], {}).get("overlap", 0)):
                    continue
                bm = beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None), adapter=str(run.parent),
                                                beacon_ratio_mix="fit-0", beacon_fit_overlap=overlap)  # fmt: skip
                scores = evaluate_fit(bm, held, args.positions, eval_ratio, teacher)
                rows.append({"recipe": f"{name}{suffix} (trained without it)", "adapter": f"runs/ablations/{name}",
                             **{k: round(v, 4) for k, v in scores.items()}})  # fmt: skip
    else:
        spec = recipes[args.recipe]
        if "pos" in spec and spec["init"] != "fresh":
            raise SystemExit(f"{args.recipe}: 'pos' places fresh beacons; an adapter ({spec['init']}) keeps its own")
        if spec["init"] == "shipped" or (args.fast and spec["init"] in INIT_ADAPTERS):
            bm = shipped
        elif spec["init"] in INIT_ADAPTERS:
            bm = beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None),
                                            adapter=str(INIT_ADAPTERS[spec["init"]]),
                                            beacon_ratio_mix="fit-0", beacon_fit_overlap=overlap)  # fmt: skip
        else:
            bm = fresh_beacons(args, shipped, fresh, spec.get("pos"))
        texts = [(BOOKS / f"{name}.txt").read_text() for name in TRAIN_BOOKS] if not args.fast else [
            beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)]  # fmt: skip
        data_seed = int(spec.get("data_seed", 0))  # the text slices, the recall samples and the ratio draws
        stream = SampleStream(texts, tok, args.seq_len, seed=data_seed)
        name = args.recipe + ("+bf16" if args.bf16 else "")
        protocol = tuple(spec.get("protocol", (2048, 1024)))
        if not args.fast and (args.seq_len, args.positions) != protocol:
            raise SystemExit(
                f"{args.recipe} trains on {protocol[0]}-token samples planned for {protocol[1]} positions: "
                f"run it with --seq-len {protocol[0]} --positions {protocol[1]} (and its own --out)"
            )
        if overlap != min(int(spec.get("overlap", 0)), 16 if args.fast else 1 << 30):  # --fast caps it at 16
            raise SystemExit(f"--overlap {overlap}: {args.recipe} trains with overlap {spec.get('overlap', 0)}")
        run_dir = runs / "ablations" / name
        gates = spec.get("gates")
        if gates:
            bm.add_memory_gates(gates["init"])
        start_step = 0
        if spec.get("continues"):
            from beacon_llm.training import latest_checkpoint

            parent = runs / "ablations" / (spec["continues"] + ("+bf16" if args.bf16 else ""))
            last = latest_checkpoint(parent) if parent.is_dir() else None
            if last is None:
                raise SystemExit(f"{args.recipe} continues {parent}: run that recipe first (no checkpoint there)")
            start_step = int(last.name.split("-")[1])
            if args.steps <= start_step:  # the step count includes the parent's: nothing would be trained
                raise SystemExit(
                    f"--steps {args.steps} counts {spec['continues']}'s {start_step} steps too: give more than "
                    f"{start_step} to train {args.recipe} at all"
                )
            if not run_dir.exists():
                shutil.copytree(last, run_dir / last.name)
        distant = float(spec.get("distant", 0.0))
        reference = None
        if distant > 0:
            from beacon_llm.distill import TailReferenceStore

            reference = TailReferenceStore(base, runs / "teacher_tail_only", context=1)  # = "tail only (no memory)"
        recall = spec.get("recall", {})
        cfg = FitTrainConfig(output_dir=str(run_dir), steps=args.steps, **recall_train_config(spec, args.fast),
                             seq_len=args.seq_len, positions=args.positions, ratios=tuple(spec["ratios"]),
                             grad_accum=args.grad_accum, lr=spec["lr"], kl_weight=spec["kl"], ce_weight=spec["ce"],
                             distant_weight=distant, autocast_bf16=args.bf16, save_every=5, seed=data_seed,
                             gate_lr=gates["lr"] if gates else None,
                             gates_only=bool(gates and gates["only"]))  # fmt: skip
        state = train_fit(bm, stream, cfg, teacher if spec["kl"] > 0 else None, reference)
        own = [h for h in state.history if h["step"] > start_step]  # this recipe's steps (history is cumulative)
        scores = evaluate_fit(bm, held, args.positions, eval_ratio, teacher)
        base_tokens = INIT_TOKENS[spec["init"]] if not args.fast else 0
        rows.append({
            "recipe": name, "init": spec.get("continues") or spec["init"], "ratios": list(spec["ratios"]),
            "kl_weight": spec["kl"], "ce_weight": spec["ce"], "lr": spec["lr"], "distant_weight": distant,
            "pos": bm.config.pos, **({"data_seed": data_seed} if data_seed else {}),
            "tokens_trained": base_tokens + state.tokens, "tokens_this_recipe": state.tokens,
            "train_seconds": round(state.elapsed_s, 1), "bf16_autocast": args.bf16,
            "tok_per_s": round(state.tokens / max(state.elapsed_s, 1e-9), 1),
            "first_loss": state.history[0]["loss"], "last_loss": state.history[-1]["loss"],
            **({"start_step": start_step, "steps_this_recipe": len(own),
                "tokens_this_recipe_only": state.tokens - sum(h["tokens"] for h in state.history
                                                              if h["step"] == start_step),
                "first_loss_this_recipe": own[0]["loss"], "first_kl_this_recipe": own[0]["kl"],
                "last_kl": own[-1]["kl"]} if own else {}),
            **({"gates": {**gates, **gate_summary(bm)}} if gates else {}),
            **({"recall": recall, "recall_nll_first": _recall_mean(own[:10], "recall_nll"),
                "recall_nll_last": _recall_mean(own[-10:], "recall_nll"),
                "recall_token_acc_first": _recall_mean(own[:10], "recall_token_acc"),
                "recall_token_acc_last": _recall_mean(own[-10:], "recall_token_acc")} if recall and own else {}),
            **{k: round(v, 4) for k, v in scores.items()},
        })  # fmt: skip
    for row in rows:
        row["threads"] = args.threads
        row["eval_ratio"] = eval_ratio
        row["kv_entries_before_tail"] = plan_for(held[0]).entries(plan_for(held[0]).raw_from)
        row["overlap"] = overlap
        print(json.dumps(row), flush=True)
    if out_path.is_file():  # re-read: another run may have written rows meanwhile
        data["rows"] = json.loads(out_path.read_text())["rows"]
    before = {r["recipe"]: r for r in data["rows"]}
    for row in rows:  # a row scored again with the same result keeps its late scores (--late), still valid
        old = before.get(row["recipe"], {})
        if (old.get("kl"), old.get("ppl")) == (row.get("kl"), row.get("ppl")):
            row.update({k: v for k, v in old.items() if k in ("late_from", "kl_late", "ppl_late")})
    data["rows"] = [r for r in data["rows"] if r["recipe"] not in {x["recipe"] for x in rows}] + rows
    write_json(out_path, data)
    print(f"wrote {out_path} ({time.perf_counter() - t0:.0f} s)")


def recall_train_config(spec: dict, fast: bool) -> dict:
    """The :class:`~beacon_llm.training.FitTrainConfig` fields of a recipe's recall samples (none without them; a tiny
    model's tail is at most 32 tokens)."""
    recall = spec.get("recall")
    if not recall:
        return {}
    return {"recall_rate": recall["rate"], "recall_windows": recall["windows"],
            "recall_tail": min(recall["tail"], 32 if fast else 1 << 30),
            **({"recall_tasks": tuple(recall["tasks"])} if "tasks" in recall else {})}  # fmt: skip


def fresh_beacons(args, shipped, fresh, pos: str | None):
    """Untrained beacons on the base model, placed ``pos`` ("append" / "interleave"; None: as the shipped config)."""
    import beacon_llm

    base = fresh.config if args.fast else shipped.config
    if fresh is not None and pos in (None, base.pos):
        return fresh
    scheme = dataclasses.replace(base, pos=pos or base.pos)
    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        return tiny_beacon_model(scheme, max_position_embeddings=512, perturb=0.0)
    return beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None), beacon_config=scheme)


def _recall_mean(history: list[dict], key: str) -> float | None:
    """The mean of a recall figure over the steps of ``history`` that drew recall samples (None: none did)."""
    values = [h[key] for h in history if key in h]
    return round(float(np.mean(values)), 4) if values else None


def gate_summary(bm) -> dict:
    """The trained memory gates: mean, min, max and the share below 0.5 (of layers x heads)."""
    from beacon_llm.layers import memory_gate

    g = torch.stack([memory_gate(layer.self_attn).detach().float() for layer in bm.model.model.layers])  # (L, H)
    return {"mean": round(float(g.mean()), 4), "min": round(float(g.min()), 4), "max": round(float(g.max()), 4),
            "below_half": round(float((g < 0.5).float().mean()), 4)}  # fmt: skip


BASELINES = ("full attention (teacher)", "truncation (same KV budget)", "StreamingLLM (4 sink + recent, same budget)",
             "tail only (no memory)")  # fmt: skip


def baseline_keep(name: str, n_mem: int):
    """What each baseline keeps before the tail (``n_mem``: the beacon entries the fit cache holds there)."""
    return {
        BASELINES[0]: lambda ids, plan: ids[: plan.raw_from],
        BASELINES[1]: lambda ids, plan: ids[plan.raw_from - n_mem : plan.raw_from],
        BASELINES[2]: lambda ids, plan: ids[:4] + ids[plan.raw_from - n_mem + 4 : plan.raw_from],
        BASELINES[3]: lambda ids, plan: ids[plan.raw_from - 1 : plan.raw_from],
    }[name]


def late_rows(args, data, shipped, fresh, base, held, teacher, runs) -> None:
    """Add ``kl_late`` / ``ppl_late`` (tail tokens from offset ``args.late`` on) to every row that can be re-scored:
    the baselines, the shipped and fresh adapters, and every trained recipe whose final adapter is in ``runs`` (rows
    scored at this offset already are kept), each at its own protocol ratio."""
    import beacon_llm
    from beacon_llm.schedule import fit_plan
    from beacon_llm.training import evaluate_fit

    for row in data["rows"]:
        name = row["recipe"].split(" @r")[0].split(" +overlap")[0]
        ratio = int(row.get("eval_ratio", 32)) if not args.fast else 4
        if row.get("late_from") == args.late:
            continue  # scored already
        if int(row.get("overlap", 0)) != shipped.config.fit_overlap:
            continue  # scored by a --late run with its --overlap

        def plan_for(ids, ratio=ratio):
            return fit_plan(shipped.config, len(ids), args.positions, ratio=ratio)

        if name in BASELINES:
            n_mem = plan_for(held[0]).entries(plan_for(held[0]).raw_from)
            scores = plain_tail_scores(base, held, plan_for, teacher, baseline_keep(name, n_mem), args.late)
        else:
            if name.startswith("shipped"):
                bm = shipped
            elif name.startswith("fresh"):
                bm = fresh if fresh is not None else beacon_llm.from_pretrained(
                    beacon_llm.loading.resolve_model(None), beacon_config=shipped.config)  # fmt: skip
            else:  # an adapter folder scored by --adapter, or a run's final adapter
                final = Path(row["adapter_dir"]) if row.get("adapter_dir") else runs / "ablations" / name / "final"
                if not (final / "beacon_model.safetensors").is_file():
                    print(f"skipping {name}: no final adapter in {final}", flush=True)
                    continue
                overlap_now = shipped.config.fit_overlap
                bm = beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None), adapter=str(final),
                                                beacon_ratio_mix="fit-0", beacon_fit_overlap=overlap_now,
                                                ) if not args.fast else shipped  # fmt: skip
            scores = evaluate_fit(bm, held, args.positions, ratio, teacher, score_from=args.late)
        row.update({"late_from": args.late, "kl_late": round(scores["kl"], 4), "ppl_late": round(scores["ppl"], 3)})
        print(json.dumps({"recipe": row["recipe"], "kl_late": row["kl_late"], "ppl_late": row["ppl_late"]}), flush=True)


if __name__ == "__main__":
    main()
