"""One prepared GPU run for the embedded model's beacons: the long-read recipe trained for a fixed wall-clock budget,
then scored on the held-out protocols, all on the GPU.

The recipe is ``kl_r32_overlap64_8k`` of ``training_ablations.py``: 8,192-token slices of the six training novels
planned for 4,096 positions (9 windows condensed at ratio 32, the last 64 condensed tokens read again raw), KL to the
plain model reading the whole slice (top 32) on the raw tail, bf16 autocast, starting from the shipped adapter. The
model reads one sequence at a time, so the GPU gets its batch of sequences from ``--procs`` data-parallel processes
sharing it: each reads its own slices, and their gradients are averaged every step (gloo), so one step sees
``procs x grad_accum`` slices. The number of steps is fixed after a few timed ones so that the linear learning-rate
decay ends inside ``--minutes``.

The trained adapter is exported as the shipped one is (bf16, rank-64 deltas, ``fit-1024``) and scored, together with
the shipped adapter and the plain baselines at the same KV budget (full attention, truncation, StreamingLLM, tail
only), on both protocols of ``training_ablations.py``: 8K (8,192-token slices, 4,096 positions) and 2K (2,048, 1,024),
4 held-out slices of Oz and 4 of the King James Bible excerpt each, overlap 64, in float32.

    python benchmarks/gpu_train.py --minutes 6       # on a GPU: benchmarks/results/gpu_train.json + the adapter
    python benchmarks/gpu_train.py --fast            # tiny model, 2 processes (smoke run; the numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _results import write_json

DEFAULT_RECIPE = "kl_r32_overlap64_8k"
PROTOCOLS = {"8k": (8192, 4096), "2k": (2048, 1024)}  # name -> (seq_len, positions) of the held-out slices
CALIBRATION_STEPS = 3  # timed steps (the first one warms up) before the step count is fixed


def gpu_recipes() -> list[str]:
    """The recipes of ``training_ablations.py`` this script trains: those that start from the shipped adapter and
    need nothing beyond :class:`~beacon_llm.training.FitTrainConfig` (no parent run, gates, distance weights or
    placement)."""
    from training_ablations import RECIPES

    return [name for name, spec in RECIPES.items()
            if spec["init"] == "shipped" and not {"continues", "gates", "distant", "pos"} & set(spec)]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load(args: argparse.Namespace, device: str):
    """The embedded model with the shipped adapter, read as the recipe trains (fit, overlap), float32 on ``device``
    (the tiny random model when ``--fast``; every call builds the same one)."""
    from training_ablations import RECIPES

    import beacon_llm

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-0", fit_overlap=16)
        bm = tiny_beacon_model(cfg, max_position_embeddings=512)
        bm.model.to(device)
        return bm
    return beacon_llm.load(beacon_ratio_mix="fit-0", beacon_fit_overlap=int(RECIPES[args.recipe]["overlap"]),
                           shared=False, dtype="float32", device=device)  # fmt: skip


def _texts(args: argparse.Namespace) -> list[str]:
    from training_ablations import BOOKS, TRAIN_BOOKS

    import beacon_llm

    if args.fast:
        return [beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)]
    return [(BOOKS / f"{name}.txt").read_text() for name in TRAIN_BOOKS]


def _protocol(args: argparse.Namespace, name: str) -> tuple[int, int, int]:
    """(seq_len, positions, ratio) of a held-out protocol (the tiny model's when ``--fast``)."""
    return (128, 64, 4) if args.fast else (*PROTOCOLS[name], 32)


def _train_shape(args: argparse.Namespace, spec: dict) -> tuple[int, int, tuple[int, ...]]:
    """(seq_len, positions, ratios) the recipe trains with (the tiny model's when ``--fast``)."""
    if args.fast:
        return 128, 64, (4,)
    return (*spec.get("protocol", (2048, 1024)), tuple(spec["ratios"]))


def _worker(rank: int, world: int, args: argparse.Namespace, port: int, work: str) -> None:
    """One data-parallel process: train (all ranks), then score and export (rank 0)."""
    if rank:  # one progress bar (rank 0's); the others' errors still reach the launcher
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
        device = args.device
        if device == "cuda":
            torch.cuda.set_device(0)
        _train_and_score(rank, world, args, device, Path(work))
    finally:
        dist.destroy_process_group()


def _averaging(world: int, deadline: float | None, rank: int):
    """The ``grad_sync`` of :func:`beacon_llm.training.train_fit`: sums the processes' gradients (and rank 0's
    "past the deadline" flag) in one all-reduce over CPU copies, then divides by the number of processes."""

    def sync(params: list[torch.nn.Parameter]) -> bool:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        late = float(rank == 0 and deadline is not None and time.monotonic() > deadline)
        flat = torch.cat([g.detach().reshape(-1).float().cpu() for g in grads] + [torch.tensor([late])])  # (N + 1,)
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            part = (flat[offset : offset + g.numel()] / world).view_as(g).to(g.device, g.dtype)
            if p.grad is None:
                p.grad = part
            else:
                p.grad.copy_(part)
            offset += g.numel()
        return bool(flat[-1] > 0)

    return sync


def _train_and_score(rank: int, world: int, args: argparse.Namespace, device: str, work: Path) -> None:
    from training_ablations import RECIPES, recall_train_config

    from beacon_llm.distill import TeacherStore
    from beacon_llm.layers import is_beacon_parameter
    from beacon_llm.tasks import SampleStream
    from beacon_llm.training import FitTrainConfig, train_fit

    spec = RECIPES[args.recipe]
    t_start = time.monotonic()
    bm = _load(args, device)
    for name, p in bm.model.named_parameters():  # every process starts from rank 0's beacons (equal when loaded)
        if not is_beacon_parameter(name):
            continue
        data = p.data.cpu()
        dist.broadcast(data, 0)
        p.data.copy_(data.to(p.device))
    seq_len, positions, ratios = _train_shape(args, spec)
    teacher = TeacherStore(bm.model, work / "teacher", k=32)  # the scoring's; the training's too when it has KL
    stream = SampleStream(_texts(args), bm.tokenizer, seq_len, seed=1000 + rank)  # each process its own slices
    run_dir = work / f"rank{rank}"
    budget = 60.0 * args.minutes
    base = dict(seq_len=seq_len, positions=positions, ratios=ratios, grad_accum=args.grad_accum,
                **recall_train_config(spec, args.fast),
                lr=args.lr, kl_weight=spec["kl"], ce_weight=spec["ce"], autocast_bf16=device != "cpu" or args.bf16,
                warmup_steps=args.warmup, save_every=10**9, seed=rank)  # fmt: skip
    # a few timed steps fix how many fit in the budget (they train too, with their own short warmup)
    trainer_teacher = teacher if spec["kl"] > 0 else None
    calib = train_fit(bm, stream, FitTrainConfig(output_dir=str(run_dir), steps=CALIBRATION_STEPS, **base),
                      trainer_teacher, grad_sync=_averaging(world, None, rank))  # fmt: skip
    timed = calib.history[1:] or calib.history  # the first step warms up (kernels, allocator)
    step_tokens = [h2["tokens"] - h1["tokens"] for h1, h2 in zip([{"tokens": 0}, *calib.history], calib.history)]
    step_s = torch.tensor([sum(n / h["tok_per_s"] for n, h in zip(step_tokens[-len(timed) :], timed)) / len(timed)])
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    left = budget - (time.monotonic() - t_start)
    steps_t = torch.tensor([CALIBRATION_STEPS + max(1, int(left / float(step_s)))])
    dist.broadcast(steps_t, 0)  # every process runs rank 0's count (their clocks differ a little)
    steps = int(steps_t)
    deadline = time.monotonic() + left + 60.0  # a hard stop (rank 0's clock), should the steps run slower than timed
    state = train_fit(bm, stream, FitTrainConfig(output_dir=str(run_dir), steps=steps, **base), trainer_teacher,
                      grad_sync=_averaging(world, deadline, rank))  # fmt: skip
    train_s = time.monotonic() - t_start
    tokens = torch.tensor([float(state.tokens)])
    dist.all_reduce(tokens)
    # the replicas must still hold the same beacons: their sums' spread over the processes
    total = torch.tensor([sum(float(p.detach().double().sum()) for n, p in bm.model.named_parameters()
                              if is_beacon_parameter(n))], dtype=torch.float64)  # fmt: skip
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if rank == 0:
        run = {"steps": steps, "step_s": float(step_s), "tokens": float(tokens), "train_s": train_s, "world": world,
               "replica_spread": float(hi - lo), "final_dir": str(run_dir / "final")}  # fmt: skip
        _score_and_write(args, bm, _load(args, device), teacher, state, run, device)
    dist.barrier()


def _score_and_write(args, bm, start, teacher, state, run: dict, device: str) -> None:
    """Export the trained adapter to ``--adapter-dir`` and score it, the start and the baselines (rank 0)."""
    from training_ablations import (
        BASELINES,
        INIT_TOKENS,
        RECIPES,
        baseline_keep,
        held_out_samples,
        plain_tail_scores,
    )

    import beacon_llm
    from beacon_llm.schedule import fit_plan
    from beacon_llm.serialization import save_adapter
    from beacon_llm.training import evaluate_fit

    adapter_dir = Path(args.adapter_dir)
    if args.fast:
        save_adapter(bm, str(adapter_dir), dtype=torch.bfloat16)
        exported = None
    else:  # as `beacon-llm export <final> <dir> --rank 64 --dtype bfloat16 --ratio-mix fit-1024` (the shipped form)
        model_dir = beacon_llm.loading.resolve_model(None)
        staged = beacon_llm.from_pretrained(model_dir, adapter=run["final_dir"], tokenizer=False,
                                            beacon_ratio_mix="fit-1024")  # fmt: skip
        save_adapter(staged, str(adapter_dir), dtype=torch.bfloat16, rank=64)
        exported = beacon_llm.from_pretrained(model_dir, adapter=str(adapter_dir), beacon_ratio_mix="fit-0",
                                              beacon_fit_overlap=bm.config.fit_overlap, dtype="float32")  # fmt: skip
        exported.model.to(device)
    bm.model.eval()
    started = INIT_TOKENS["shipped"] if not args.fast else 0
    tokens, train_s, step_s, steps, world = run["tokens"], run["train_s"], run["step_s"], run["steps"], run["world"]
    results: dict = {
        "recipe": args.recipe, "init": "shipped", "train_shape": list(_train_shape(args, RECIPES[args.recipe])[:2]),
        "tokens_before": started, "tokens_this_run": int(tokens),
        "tokens_trained": started + int(tokens), "steps": state.step, "steps_planned": steps, "procs": world,
        "grad_accum": args.grad_accum, "slices_per_step": world * args.grad_accum, "lr": args.lr,
        "replica_spread": run["replica_spread"], "warmup_steps": args.warmup,
        "bf16_autocast": args.device != "cpu" or args.bf16,
        "held_out_per_book": args.held_out, "train_seconds": round(train_s, 1),
        "step_seconds_timed": round(step_s, 3), "tok_per_s": round(tokens / train_s, 1),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in state.history],
        "protocols": {},
    }  # fmt: skip
    write_json(args.out, results)  # the training's record, should the scoring not finish
    t0 = time.monotonic()
    for name in PROTOCOLS:
        seq_len, positions, ratio = _protocol(args, name)
        held = held_out_samples(bm.tokenizer, seq_len, args.held_out, seed=11)

        def plan_for(ids, positions=positions, ratio=ratio):
            return fit_plan(bm.config, len(ids), positions, ratio=ratio)

        n_mem = plan_for(held[0]).entries(plan_for(held[0]).raw_from)
        rows = [{"reading": b, **plain_tail_scores(bm.model, held, plan_for, teacher, baseline_keep(b, n_mem))}
                for b in BASELINES]  # fmt: skip
        for label, model, tokens_trained in (
            ("shipped adapter (the start)", start, started),
            ("trained, float32 as trained", bm, started + int(tokens)),
            ("trained, exported (bf16, rank-64 deltas)", exported, started + int(tokens)),
        ):
            if model is None:
                continue
            scores = evaluate_fit(model, held, positions, ratio, teacher)
            rows.append({"reading": label, "tokens_trained": tokens_trained,
                         **{k: round(v, 4) for k, v in scores.items()}})  # fmt: skip
        results["protocols"][name] = {"seq_len": seq_len, "positions": positions, "ratio": ratio,
                                      "kv_entries_before_tail": n_mem, "rows": rows}  # fmt: skip
        for row in rows:
            print(json.dumps({"protocol": name, **row}), flush=True)
        write_json(args.out, results)
    if RECIPES[args.recipe].get("recall"):
        models = [("shipped adapter (the start)", start), ("trained, float32 as trained", bm),
                  ("trained, exported (bf16, rank-64 deltas)", exported)]  # fmt: skip
        results["recall"] = _recall_rows(args, bm, [(label, m) for label, m in models if m is not None])
        write_json(args.out, results)
    results["score_seconds"] = round(time.monotonic() - t0, 1)
    write_json(args.out, results)
    print(f"wrote {args.out} and {adapter_dir}", flush=True)
    if run["replica_spread"] != 0:  # every process applies the same averaged update: they must stay equal
        raise RuntimeError(f"the data-parallel replicas diverged (spread of their beacon sums {run['replica_spread']})")


def _recall_rows(args: argparse.Namespace, bm, models: list[tuple[str, object]]) -> dict:
    """``recall_protocol.py`` on the GPU: facts planted in the first 1 and 8 windows of held-out Oz and KJV text,
    condensed at the recipe's largest ratio, 512 raw tokens after them; each model's beacons with the fact and with its
    digits swapped (beacons that carry the fact do worse swapped), and the plain baselines at the same budget once.
    A recipe that trains on the span task also gets the protocol's ``--spans`` rows (``task``: "span"; the control
    reads another text's beacons)."""
    from recall_protocol import (
        FACT_ONLY,
        FAST,
        PER_BOOK,
        SPAN_ONLY,
        TAIL,
        WINDOWS,
        held_out_texts,
        recall_samples,
        score,
    )
    from training_ablations import RECIPES

    from beacon_llm.tasks import SPAN_TASK

    texts = held_out_texts(args.fast)
    spec = RECIPES[args.recipe]
    ratio = _train_shape(args, spec)[2][-1]
    tail, per_book, windows_list = (FAST["tail"], FAST["per_book"], FAST["windows"]) if args.fast else (
        TAIL, PER_BOOK, WINDOWS)  # fmt: skip
    tasks = ("fact", SPAN_TASK) if SPAN_TASK in spec["recall"].get("tasks", ()) else ("fact",)
    out: dict = {"ratio": ratio, "tail": tail, "samples_per_book": per_book, "rows": []}
    for task in tasks:
        methods = ("beacons", SPAN_ONLY if task == SPAN_TASK else FACT_ONLY)  # with the task's own control
        for windows in windows_list:
            samples = recall_samples(bm.tokenizer, bm.config, texts, per_book, windows, tail, ratio, seed=2026,
                                     spans=task == SPAN_TASK)  # fmt: skip
            runs = [(label, method, model) for label, model in models for method in methods]
            runs += [(method, method, bm) for method in ("truncation", "tail only", "full attention")]
            for label, method, model in runs:
                name = label + method[len("beacons") :] if method.startswith("beacons") else label
                row = {"reading": name, "task": task, "windows": windows,
                       **score(method, model, samples, bm.tokenizer)}  # fmt: skip
                out["rows"].append(row)
                print(json.dumps({"protocol": "recall", **row}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget of the training, scoring after it (default 5; 0.1 with --fast)",
    )
    parser.add_argument(
        "--procs", type=int, default=None, help="data-parallel processes sharing the device (default 8; 2 with --fast)"
    )
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=gpu_recipes(),
                        help=f"a recipe of training_ablations.py that starts from the shipped adapter "
                             f"(default {DEFAULT_RECIPE}; recall recipes add the recall protocol's rows)")  # fmt: skip
    parser.add_argument("--grad-accum", type=int, default=1, help="slices per process per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=5, help="warmup steps of the learning rate (0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on a GPU)")
    parser.add_argument("--out", default=None, help="results JSON (default results/gpu_train.json, or "
                        "results/gpu_train_<recipe>.json for another recipe)")  # fmt: skip
    parser.add_argument(
        "--adapter-dir",
        default=None,
        help="where the trained adapter is exported (default: next to --out, '<out>_adapter')",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / procs)")
    parser.add_argument("--held-out", type=int, default=4, help="held-out slices per book (4: the protocols')")
    parser.add_argument("--fast", action="store_true", help="tiny random model (smoke run)")
    args = parser.parse_args()
    if args.fast:
        args.held_out = 1
    args.procs = args.procs if args.procs is not None else (2 if args.fast else 8)
    args.minutes = args.minutes if args.minutes is not None else (0.1 if args.fast else 5.0)
    results = Path(__file__).parent / "results"
    out = Path(
        args.out or results / ("gpu_train.json" if args.recipe == DEFAULT_RECIPE else f"gpu_train_{args.recipe}.json")
    )
    args.out = str(out)
    args.adapter_dir = args.adapter_dir or str(out.with_name(out.stem + "_adapter"))
    for name in ("procs", "grad_accum", "held_out", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup} must be >= 0 (0: no warmup)")
    if not (args.lr > 0 and args.lr < float("inf")):  # also rejects NaN, before the processes start
        raise SystemExit(f"--lr={args.lr} must be a finite number > 0 (e.g. 2e-4)")
    if not args.minutes > 0:
        raise SystemExit(f"--minutes={args.minutes} must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu (or run on a GPU machine)")
    if not args.fast:
        import beacon_llm

        beacon_llm.loading.resolve_model(None)  # converts the embedded model once, before the processes start
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as work:
        torch.multiprocessing.start_processes(_worker, args=(args.procs, args, _free_port(), work),
                                              nprocs=args.procs, start_method="spawn")  # fmt: skip


if __name__ == "__main__":
    main()
