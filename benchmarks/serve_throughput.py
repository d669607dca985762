"""``beacon-llm serve`` under load: follow-up latency through the server vs in process; throughput with 1-16 clients.

(a) Follow-up first-token latency. An excerpt of the bundled book (``--doc-tokens``, default 8192) is read once
through the server; then, after one untimed follow-up each way, ``--followups`` questions about it are asked both
ways, alternately: through the server with the streaming ``openai`` client (time to the first chunk with text) and
in process with ``engine.stream`` on the server's own engine, the one holding the condensed excerpt (tokenizing the
chat included, as the server does it; time to the first text delta). Medians are reported.

(b) Throughput with 1, 4 and 16 concurrent clients (``--clients``), non-streaming chat requests through the
``openai`` client, first reads and follow-ups measured separately. First reads: each request sends a new document
(an excerpt of ``--client-doc-tokens``, default 1024, at its own offset in the book) with a question. Follow-ups: a new
question about a document the first reads of that level condensed (found in the engine's memory or its disk store).
Reported: requests/s, prompt tokens read/s (prompt minus cached tokens), generated tokens/s, p50 / p95 latency.

The server is ``create_app`` run by uvicorn in a thread of this process (``serve_in_thread``), with the default
limits (4 generations at once, 2 condensed prefixes in memory per engine) unless ``--max-concurrent`` /
``--max-prefixes`` say otherwise, and a temporary store. Default: the embedded SmolLM2-135M-Instruct with its shipped
beacons, read as ``beacon-llm serve`` reads it (``fit-1024``). ``--fast``: a tiny random model (CI smoke run).

    python benchmarks/serve_throughput.py --threads 2      # embedded model, about 5-10 minutes on 2 cores
    python benchmarks/serve_throughput.py --fast           # tiny model, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"
MODEL = "bench"
QUESTIONS = [
    "Who is Toto?",
    "What does the Scarecrow want from the Wizard?",
    "What does the Tin Woodman want?",
    "Why is the Lion afraid?",
    "Where does Dorothy live?",
    "Who melts the Wicked Witch?",
    "What color are the Munchkins' clothes?",
    "Summarize this passage in one sentence.",
]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) with linear interpolation."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def excerpts(engine: Any, book: str, n_tokens: int, count: int, start: int = 0) -> list[str]:
    """``count`` excerpts of about ``n_tokens`` tokens, at evenly spaced offsets from token ``start`` (each one starts
    differently, so no two share a condensed prefix)."""
    ids = engine.encode(book)
    room = len(ids) - start - n_tokens
    if room < count:
        raise ValueError(f"the book ({len(ids)} tokens) is too short for {count} excerpts of {n_tokens} tokens")
    stride = room // count
    tok = engine.bm.tokenizer
    return [tok.decode(ids[start + i * stride : start + i * stride + n_tokens]) for i in range(count)]


def messages(doc: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": doc}, {"role": "user", "content": question}]


def server_first_token(client: Any, doc: str, question: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat request: seconds to the first chunk with text, and to the end; the usage."""
    start = time.perf_counter()
    first, usage, text = None, None, []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages(doc, question),
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - start
    return {
        "seconds_to_first_token": round(first or total, 4),
        "seconds_total": round(total, 4),
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
        "completion_tokens": usage.completion_tokens,
        "answer": "".join(text),
    }


def engine_first_token(engine: Any, doc: str, question: str, max_tokens: int) -> dict[str, Any]:
    """The same question in process: ``encode_chat`` + ``engine.stream``, seconds to the first text delta."""
    from beacon_llm import Completion

    start = time.perf_counter()
    ids, boundary = engine.encode_chat(messages(doc, question))
    first, final = None, None
    for item in engine.stream(ids, boundary=boundary, max_new_tokens=max_tokens):
        if isinstance(item, Completion):
            final = item
        elif item:
            first = first or time.perf_counter() - start
    total = time.perf_counter() - start
    return {
        "seconds_to_first_token": round(first or total, 4),
        "seconds_total": round(total, 4),
        "prompt_tokens": final.usage.input_tokens,
        "cached_tokens": final.usage.cache_read_tokens,
        "completion_tokens": final.usage.output_tokens,
        "answer": final.text,
    }


def load_level(client: Any, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict[str, Any]:
    """``jobs`` (document, question) sent by ``clients`` concurrent clients, each taking the next job when done."""
    latencies: list[float] = []
    read = cached = generated = 0
    lock = threading.Lock()
    pending = iter(jobs)

    def worker() -> None:
        nonlocal read, cached, generated
        while True:
            with lock:
                job = next(pending, None)
            if job is None:
                return
            start = time.perf_counter()
            response = client.chat.completions.create(model=MODEL, messages=messages(*job), max_tokens=max_tokens)
            seconds = time.perf_counter() - start
            usage = response.usage
            with lock:
                latencies.append(seconds)
                hit = usage.prompt_tokens_details.cached_tokens
                read += usage.prompt_tokens - hit
                cached += hit
                generated += usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(jobs),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(jobs) / wall, 3),
        "prompt_tokens_read_per_s": round(read / wall, 1),
        "generated_tokens_per_s": round(generated / wall, 2),
        "p50_latency_s": round(percentile(latencies, 0.5), 3),
        "p95_latency_s": round(percentile(latencies, 0.95), 3),
        "prompt_tokens_read": read,
        "cached_tokens": cached,
        "generated_tokens": generated,
    }


def requests_for(clients: int, per_client: int, minimum: int) -> int:
    return max(clients * per_client, minimum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny random model (CI smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--doc-tokens", type=int, default=None, help="(a) the document's tokens (default 8192)")
    parser.add_argument("--followups", type=int, default=5, help="(a) follow-up questions each way")
    parser.add_argument("--client-doc-tokens", type=int, default=None, help="(b) each document's tokens (default 1024)")
    parser.add_argument("--clients", default="1,4,16", help="(b) concurrent clients, comma-separated")
    parser.add_argument("--per-client", type=int, default=2, help="(b) requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=4, help="(b) at least this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length of every request")
    parser.add_argument("--max-concurrent", type=int, default=None, help="the server's generations at once")
    parser.add_argument("--max-prefixes", type=int, default=None, help="condensed prefixes kept in memory")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/serve_throughput*.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from openai import OpenAI

    import beacon_llm
    from beacon_llm.serve import ServeLimits, create_app, load_model, serve_in_thread

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        # fit-128: room for a question and the answer after the condensed document (1 token per character)
        bm = tiny_beacon_model(beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-128"))
        name = "tiny random Llama (2 layers, hidden 32), window 16, fit-128"
        doc_tokens, client_doc_tokens = args.doc_tokens or 1024, args.client_doc_tokens or 128
    else:
        bm = load_model()  # beacon_llm.load() as `beacon-llm serve` loads it: fit-1024
        name = "SmolLM2-135M-Instruct + shipped beacons (fit-1024)"
        doc_tokens, client_doc_tokens = args.doc_tokens or 8192, args.client_doc_tokens or 1024
    levels = [int(c) for c in args.clients.split(",")]
    defaults = ServeLimits()
    limits = ServeLimits(
        max_concurrent=args.max_concurrent or defaults.max_concurrent,
        max_prefixes=defaults.max_prefixes if args.max_prefixes is None else args.max_prefixes,
    )
    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as store:
        app = create_app(bm, model_name=MODEL, store_dir=store, limits=limits)
        engine = app.state.server.engines.get("public")  # the server's own engine: the same condensed documents
        counts = {c: requests_for(c, args.per_client, args.min_requests) for c in levels}
        client_docs = excerpts(engine, book, client_doc_tokens, sum(counts.values()), start=doc_tokens)
        (doc,) = excerpts(engine, book, doc_tokens, 1)
        with serve_in_thread(app) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)

            # (a) read the document once, then follow-ups both ways, alternately
            start = time.perf_counter()
            first = client.chat.completions.create(
                model=MODEL, messages=messages(doc, QUESTIONS[0]), max_tokens=args.max_tokens
            )
            read_seconds = time.perf_counter() - start
            print(f"{name}: document of {first.usage.prompt_tokens} prompt tokens read in {read_seconds:.1f} s")
            # one untimed follow-up each way first: the first in-process call (on this thread) was 1.3-1.8 s slower
            warmup = {
                "server": server_first_token(client, doc, QUESTIONS[-1], args.max_tokens),
                "in_process": engine_first_token(engine, doc, QUESTIONS[-1], args.max_tokens),
            }
            rows: dict[str, list[dict[str, Any]]] = {"server": [], "in_process": []}
            for i in range(args.followups):
                question = QUESTIONS[1 + i % (len(QUESTIONS) - 2)]
                rows["server"].append(
                    {"question": question, **server_first_token(client, doc, question, args.max_tokens)}
                )
                rows["in_process"].append(
                    {"question": question, **engine_first_token(engine, doc, question, args.max_tokens)}
                )
            latency = {
                way: {
                    "median_seconds_to_first_token": round(
                        statistics.median(r["seconds_to_first_token"] for r in rs), 4
                    ),
                    "median_seconds_total": round(statistics.median(r["seconds_total"] for r in rs), 4),
                    "rows": rs,
                    "warmup_not_counted": {"question": QUESTIONS[-1], **warmup[way]},
                }
                for way, rs in rows.items()
            }
            missed = [r["question"] for rs in rows.values() for r in rs if not r["cached_tokens"]]
            if missed:
                print(f"warning: these follow-ups read the document again (no cached tokens): {missed}")
            overhead = (
                latency["server"]["median_seconds_to_first_token"]
                - latency["in_process"]["median_seconds_to_first_token"]
            )

            # (b) throughput: first reads of new documents, then follow-ups about the documents just read
            throughput = []
            used = 0
            for level in levels:
                n = counts[level]
                docs, used = client_docs[used : used + n], used + n
                reads = [(d, QUESTIONS[j % len(QUESTIONS)]) for j, d in enumerate(docs)]
                follow = [(d, QUESTIONS[(j + 3) % len(QUESTIONS)]) for j, d in enumerate(docs)]
                for kind, jobs in (("first_read", reads), ("follow_up", follow)):
                    row = {"kind": kind, **load_level(client, jobs, level, args.max_tokens)}
                    throughput.append(row)
                    print(f"  {kind:10} {level:3d} client(s): {row['requests_per_s']:.2f} req/s", flush=True)

    result = {
        "model": name,
        "fast": args.fast,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "server": "create_app + uvicorn in a thread of this process (serve_in_thread), plain HTTP on localhost",
        "limits": {"max_concurrent": limits.max_concurrent, "max_prefixes": limits.max_prefixes},
        "max_tokens": args.max_tokens,
        "followup_latency": {
            "document_prompt_tokens": first.usage.prompt_tokens,
            "document_read_seconds": round(read_seconds, 3),
            "server_overhead_seconds_to_first_token": round(overhead, 4),
            **latency,
        },
        "client_doc_tokens": client_doc_tokens,
        "throughput": throughput,
    }
    a = result["followup_latency"]
    print(
        f"\n(a) follow-up first token, {args.followups} questions on a document of {a['document_prompt_tokens']} "
        f"prompt tokens (read once in {a['document_read_seconds']:.1f} s), median:"
    )
    print(f"{'way':12} {'first token s':>13} {'total s':>8}")
    for way in ("server", "in_process"):
        print(f"{way:12} {a[way]['median_seconds_to_first_token']:13.3f} {a[way]['median_seconds_total']:8.3f}")
    print(f"server overhead to the first token: {overhead * 1000:.0f} ms")
    print(f"\n(b) throughput, documents of ~{client_doc_tokens} tokens, answers of at most {args.max_tokens} tokens:")
    head = ("req/s", "read tok/s", "gen tok/s", "p50 s", "p95 s")
    print(
        f"{'kind':10} {'clients':>7} {'requests':>8} {head[0]:>7} {head[1]:>10} {head[2]:>9} {head[3]:>7} {head[4]:>7}"
    )
    for r in throughput:
        print(
            f"{r['kind']:10} {r['clients']:7d} {r['requests']:8d} {r['requests_per_s']:7.2f} "
            f"{r['prompt_tokens_read_per_s']:10.1f} {r['generated_tokens_per_s']:9.2f} {r['p50_latency_s']:7.2f} "
            f"{r['p95_latency_s']:7.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"serve_throughput{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
