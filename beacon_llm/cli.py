"""``beacon-llm``: ask questions about a whole book, chat with it, prepare the embedded model, train beacons."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli_errors import EXIT_USAGE, CliError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away
# ``beacon-llm train``'s beacon options for fresh beacons (on the command line None means not given: an adapter given
# with --init-adapter keeps its own)
TRAIN_BEACON_DEFAULTS: dict = {
    "window": 1024,
    "ratios": [2, 4, 8, 16, 32],
    "pos": "interleave",
    "attn": "full-coverage",
    "param": ["q", "k", "v"],
    "sink_size": 0,
}
# device_map strategies transformers accepts besides a device name
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def positive_int(text: str) -> int:
    """argparse type of counts that must be >= 1 (threads, window sizes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return value


def port_number(text: str) -> int:
    """argparse type of ``--port``: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a port number from 0 to 65535 (0: any free port)")
    return value


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` this machine has not got, before anything is read or loaded: raises :class:`CliError`
    naming it and what to use instead."""
    if device is None or device in DEVICE_MAP_STRATEGIES:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise CliError(f"--device={device!r} is not a device ({exc}); use e.g. cpu, cuda, cuda:1 or auto") from exc
    if parsed.type in ("cpu", "meta"):
        return
    backend = getattr(torch, parsed.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is not None and not is_available():
        if parsed.type == "cuda" and not torch.backends.cuda.is_built():
            raise CliError(
                f"--device={device!r}: this PyTorch ({torch.__version__}) was built without CUDA; use --device cpu, "
                "or install a CUDA build of PyTorch"
            )
        raise CliError(f"--device={device!r}: no {parsed.type} device is available here; use --device cpu")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise CliError(f"--device={device!r}: there are {count()} {parsed.type} devices (0..{count() - 1})")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="base model or official beacon checkpoint (folder or hub id); default: the embedded SmolLM2-135M-Instruct",
    )
    g.add_argument("--adapter", default=None, help="beacon adapter folder (beacon_config.json + weights)")
    g.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1, auto (default: cpu)")
    g.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: bfloat16 on a CPU with native bf16, else float32; a GPU: the checkpoint's)",
    )  # fmt: skip
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def _add_beacon_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("beacons")
    g.add_argument("--window", type=positive_int, default=None, help="beacon window (raw tokens per window)")
    g.add_argument(
        "--ratio", type=int, nargs="+", default=None, help="compression ratio(s); fit-N condenses at the largest"
    )
    g.add_argument(
        "--ratio-mix",
        default=None,
        help="fit-N (default: condense only what does not fit) | adapt-N | step-random | instance-random | sequence",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beacon-llm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="read a whole document and answer one question")
    ask.add_argument("document", help=".txt, .md, .pdf or .epub file")
    ask.add_argument("question")
    chat = sub.add_parser("chat", help="read a whole document, then answer questions interactively")
    chat.add_argument("document")
    for p in (ask, chat):
        _add_model_args(p)
        _add_beacon_args(p)
        p.add_argument("--max-new-tokens", type=int, default=120)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--repetition-penalty", type=float, default=1.15, help="over the answer's own tokens")
        p.add_argument("--no-cache", action="store_true", help="do not read or write the condensed-book cache")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    ex = sub.add_parser("export", help="re-save a beacon adapter smaller (bf16, low-rank deltas over the base)")
    ex.add_argument("adapter", help="adapter or training checkpoint folder")
    ex.add_argument("output", help="new adapter folder")
    ex.add_argument("--model", default=None, help="the base model the adapter belongs to (default: embedded)")
    ex.add_argument("--rank", type=int, default=None, help="store rank-N deltas over the base projections")
    ex.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ex.add_argument("--ratio-mix", default=None, help="ratio mix saved with it, e.g. adapt-1024 for inference")

    prep = sub.add_parser("prepare", help="fetch and convert the embedded model (idempotent)")
    prep.add_argument("--cache-dir", default=None)

    tr = sub.add_parser("train", help="train beacon parameters on a frozen base model")
    _add_model_args(tr)
    tr.add_argument("--data", nargs="+", required=True, help=".txt / .md / .jsonl training files")
    tr.add_argument("--output-dir", required=True)
    tr.add_argument(
        "--init-adapter",
        default=None,
        help="start from these beacons instead of fresh ones (their config, with the beacon options given here)",
    )
    g = tr.add_argument_group("beacons (the defaults are for fresh beacons; with --init-adapter, the adapter's own)")
    d = TRAIN_BEACON_DEFAULTS
    g.add_argument("--window", type=positive_int, default=None, help=f"default {d['window']}")
    g.add_argument("--ratios", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, d['ratios']))}")
    g.add_argument("--pos", default=None, choices=["interleave", "append"], help=f"default {d['pos']}")
    g.add_argument(
        "--attn", default=None, choices=["full-coverage", "step-expansion", "segmentation"], help=f"default {d['attn']}"
    )
    g.add_argument("--no-attend-prev", action="store_true", help="beacons do not see earlier beacons of their window")
    g.add_argument("--param", nargs="+", default=None, help=f"default {' '.join(d['param'])}")
    g.add_argument("--sink-size", type=int, default=None, help=f"default {d['sink_size']}")
    tr.add_argument("--steps", type=int, default=100)
    tr.add_argument(
        "--stop-after", type=positive_int, default=None, help="end this sitting after N steps (resume later)"
    )
    tr.add_argument("--seq-len", type=int, default=2048)
    tr.add_argument("--grad-accum", type=int, default=8)
    tr.add_argument("--lr", type=float, default=5e-5)
    tr.add_argument("--warmup-steps", type=int, default=0)
    tr.add_argument("--task-rate", type=float, default=0.3, help="share of generated passkey/needle/kv samples")
    tr.add_argument("--save-every", type=int, default=10)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-gradient-checkpointing", action="store_true")
    tr.add_argument(
        "--mixed-precision",
        default=None,
        choices=["no", "bf16", "fp16"],
        help="default: the launcher's (accelerate launch's config or --mixed_precision), else no",
    )
    tr.add_argument(
        "--fresh",
        action="store_true",
        help="start afresh: an earlier run's checkpoints, final/ and history.json in --output-dir are moved into "
        "earlier-run-<time>-<pid>/ there",
    )

    srv = sub.add_parser("serve", help="serve the model and its condensed books behind an OpenAI-compatible API")
    _add_model_args(srv)
    _add_beacon_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=port_number, default=8000, help="0: any free port (default 8000)")
    srv.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable); none = open")
    srv.add_argument("--api-keys-file", default=None, help="file of API keys, one per line (# comments)")
    srv.add_argument("--store-dir", default=None, help="condensed books, per key (default: $BEACON_LLM_HOME/serve)")
    srv.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    srv.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 32 MiB)")
    srv.add_argument("--max-tokens", type=int, default=None, help="answer length when a request sets none (512)")
    srv.add_argument("--max-concurrent", type=int, default=None, help="generations at once (default 4)")
    srv.add_argument(
        "--max-queued", type=int, default=None, help="requests waiting for a worker; more get a 503 (default 64)"
    )
    srv.add_argument("--max-engines", type=int, default=None, help="per-key engines kept in memory (default 8)")
    srv.add_argument("--max-prefixes", type=int, default=None, help="condensed books per engine in memory (2)")
    srv.add_argument("--shutdown-timeout", type=float, default=None, help="seconds to finish requests at exit (30)")
    return parser


def _torch_setup(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)


def _training_texts(paths: Sequence[str]) -> list[str]:
    """The texts of the ``--data`` files (:func:`beacon_llm.tasks.read_corpus`; its errors name the file)."""
    from .tasks import read_corpus

    try:
        return read_corpus(paths)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc


def cmd_train(args: argparse.Namespace) -> int:
    from . import BeaconConfig, from_pretrained
    from ._compat import load_tokenizer
    from .loading import resolve_model
    from .tasks import SampleStream
    from .training import TrainConfig, train

    _torch_setup(args)
    if args.ratios is not None and not any(r > 0 for r in args.ratios):
        raise CliError(
            f"--ratios {' '.join(map(str, args.ratios))}: training needs a ratio > 0 (ratio 0 keeps raw keys and "
            "values, so no beacon would be trained)"
        )
    # the beacon options given on the command line; every window is read at a ratio drawn for it (step-random),
    # fresh beacons or an adapter's (whose own mix may be an inference one, e.g. fit-N, that would condense nothing)
    given = {
        "beacon_window": args.window,
        "beacon_ratio": args.ratios,
        "beacon_pos": args.pos,
        "beacon_attn": args.attn,
        "beacon_attend_prev": False if args.no_attend_prev else None,
        "beacon_param": args.param,
        "beacon_sink_size": args.sink_size,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    overrides["beacon_ratio_mix"] = "step-random"
    try:
        if args.init_adapter:
            beacons: dict = {"adapter": args.init_adapter, **overrides}
        else:
            d = {
                k: default if getattr(args, k) is None else getattr(args, k)
                for k, default in TRAIN_BEACON_DEFAULTS.items()
            }
            cfg = BeaconConfig(
                window=d["window"],
                ratios=tuple(d["ratios"]),
                ratio_mix="step-random",
                pos=d["pos"],
                attn=d["attn"],
                attend_prev=not args.no_attend_prev,
                param=tuple(d["param"]),
                sink_size=d["sink_size"],
            )
            beacons = {"beacon_config": cfg}
        tcfg = TrainConfig(
            output_dir=args.output_dir,
            steps=args.steps,
            seq_len=args.seq_len,
            grad_accum=args.grad_accum,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            task_rate=args.task_rate,
            save_every=args.save_every,
            seed=args.seed,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            mixed_precision=args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
        )
        texts = _training_texts(args.data)
        path = resolve_model(args.model)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    tokenizer = load_tokenizer(path)  # the data is tokenised before the model is loaded: bad data fails fast
    if tokenizer is None:
        raise CliError(f"{path} has no tokenizer; training needs one")
    try:
        stream = SampleStream(texts, tokenizer, args.seq_len, task_rate=args.task_rate, seed=args.seed)
    except ValueError as exc:
        raise CliError(f"{', '.join(args.data)}: {exc}") from exc
    try:
        bm = from_pretrained(path, **beacons, dtype=args.dtype, device_map=args.device, tokenizer=False)
    except (ValueError, OSError) as exc:
        raise CliError(f"cannot load the model: {exc}") from exc
    bm.tokenizer = tokenizer
    try:
        state = train(bm, stream, tcfg, resume=not args.fresh, stop_after=args.stop_after)
    except ValueError as exc:  # refused before a step (a checkpoint past --steps, a launcher's settings, ...)
        raise CliError(f"cannot train: {exc}") from exc
    print(
        f"trained to step {state.step}: {state.tokens} tokens in {state.elapsed_s:.0f} s; "
        f"last loss {state.history[-1]['loss']:.4f}"
        if state.history
        else "nothing to do"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from . import from_pretrained, save_adapter
    from .loading import resolve_model

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank={args.rank} must be >= 1")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CliError(f"{output} is a file; give the folder to write the adapter to (new, or an adapter to replace)")
    try:
        overrides = {"beacon_ratio_mix": args.ratio_mix} if args.ratio_mix else {}
        bm = from_pretrained(resolve_model(args.model), adapter=args.adapter, tokenizer=False, **overrides)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc
    try:
        save_adapter(bm, str(output), dtype=getattr(torch, args.dtype), rank=args.rank)
    except OSError as exc:
        raise CliError(f"cannot write the adapter to {output}: {exc}") from exc
    size = sum(f.stat().st_size for f in output.iterdir())
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .embedded import embedded_model_path

    try:
        print(embedded_model_path(args.cache_dir))
    except RuntimeError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:  # a --cache-dir that cannot be made or written
        raise CliError(f"cannot prepare the embedded model in {args.cache_dir or 'the cache'}: {exc}") from exc
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import run
    except ImportError as exc:
        raise CliError(f"beacon-llm serve needs the serve extra ({exc}): pip install 'beacon-llm[serve]'") from exc
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    handlers = {"train": cmd_train, "prepare": cmd_prepare, "export": cmd_export, "serve": cmd_serve}
    if args.command in ("ask", "chat"):
        from .ask import cmd_ask, cmd_chat

        handlers.update(ask=cmd_ask, chat=cmd_chat)
    # the first run's fetch (93 MB) and conversion (most of a minute) say what they do unless asked to be quiet
    fetching = logging.getLogger("beacon_llm.embedded")
    level = fetching.level
    quiet = getattr(args, "quiet", False)
    if not quiet:
        fetching.setLevel(min(logging.INFO, fetching.getEffectiveLevel()))
    try:
        if not quiet:
            return _run_command(handlers, args)
        from . import _compat

        with _compat.no_progress_bars():  # --quiet: no progress bar, transformers' own (loading weights) included
            return _run_command(handlers, args)
    finally:
        fetching.setLevel(level)


def _run_command(handlers: dict[str, Callable[[argparse.Namespace], int]], args: argparse.Namespace) -> int:
    try:
        check_device(getattr(args, "device", None))
        return handlers[args.command](args)
    except CliError as exc:
        print(f"beacon-llm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the answer went away (`beacon-llm ask ... | head`): nothing left to do
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point the closed standard output at the null device, so the interpreter's flush at exit does not fail again
    (Python's documented answer to SIGPIPE: https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing will flush it
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
