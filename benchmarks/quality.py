"""Answer quality at an equal KV budget: trained beacons, untrained beacons, truncation, StreamingLLM and chunked RAG,
with full attention as the upper bound where the context fits the base model's positions.

Each seeded sample is a slice of held-out book text (The Wonderful Wizard of Oz, not used in training) with every probe
of ``beacon_llm.probes`` planted at random sentence boundaries: passkey, needle, multi-needle, key-value, an inserted
fact, BABILong-style two- and three-fact chains, variable tracking and counting. A method reads the context once and
answers every question from a copy of its state. Budget: the trained beacon memory's KV entries after the context
(``B``); truncation keeps the last ``B`` tokens, StreamingLLM 4 sink tokens + the last ``B - 4``, RAG the top-k
128-token chunks (LlamaIndex ``VectorStoreIndex``, all-MiniLM-L6-v2 from PyPI) that fill ``B``, in document order. Each
question (chat-formatted) follows the kept context. Scores are exact match (``Probe.score``), reported as k/n.

    python benchmarks/quality.py                                    # 4K, 8K, 16K, 32K, 2 samples each
    python benchmarks/quality.py --lengths 16384 32768 --n 3 2      # chosen lengths and sample counts
    python benchmarks/quality.py --fast                             # tiny model, mock embeddings (CI smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"
SINK = 4
METHODS = ("trained", "untrained", "truncation", "streamingllm", "rag", "full")


@torch.no_grad()
def greedy(model, cache: Any, ids: list[int], n_new: int, eos: int | None) -> list[int]:
    """Greedy continuation of ``ids`` after a prefilled plain-model ``cache`` (a copy is used)."""
    from beacon_llm._compat import plain_forward

    kv = copy.deepcopy(cache) if cache is not None else None
    logits, kv = plain_forward(model, torch.tensor([ids]), kv, logits_to_keep=1)
    out: list[int] = []
    for _ in range(n_new):
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        logits, kv = plain_forward(model, torch.tensor([[nxt]]), kv, logits_to_keep=1)
    return out


@torch.no_grad()
def prefill(model, ids: list[int]) -> Any:
    from beacon_llm._compat import plain_forward

    _, kv = plain_forward(model, torch.tensor([ids]), None, logits_to_keep=1)
    return kv


class ChunkRetriever:
    """Chunked RAG over one context: ``chunk``-token pieces in a LlamaIndex ``VectorStoreIndex``."""

    def __init__(self, tok, ctx: list[int], chunk: int, embed_model: Any) -> None:
        from llama_index.core import VectorStoreIndex
        from llama_index.core.schema import TextNode

        self.pieces = [ctx[i : i + chunk] for i in range(0, len(ctx), chunk)]
        nodes = [TextNode(text=tok.decode(p), id_=str(i)) for i, p in enumerate(self.pieces)]
        self.index = VectorStoreIndex(nodes, embed_model=embed_model)
        self.chunk = chunk

    def context(self, question: str, budget: int) -> list[int]:
        """Token ids of the best chunks that fit ``budget`` tokens, in document order."""
        k = max(1, budget // self.chunk)
        hits = self.index.as_retriever(similarity_top_k=k).retrieve(question)
        chosen = sorted(int(h.node.node_id) for h in hits)
        ids: list[int] = []
        for i in chosen:
            if len(ids) + len(self.pieces[i]) <= budget:
                ids += self.pieces[i]
        return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument(
        "--n", type=int, nargs="+", default=[2], help="samples per length (one value, or one per length)"
    )
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens generated per answer")
    parser.add_argument("--reserve", type=int, default=96, help="positions left for the question and the answer")
    parser.add_argument("--chunk", type=int, default=128, help="RAG chunk size in tokens")
    parser.add_argument("--adapter", default=None, help="trained beacons (default: the shipped adapter)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--first-sample", type=int, default=0, help="skip the samples before this one (same seeds)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="merge into the existing results file: replace the samples measured again, keep the others",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm.probes import PROBE_TASKS, make_probe_context
    from beacon_llm.tasks import chat_prompt_ids

    if args.fast:
        from llama_index.core.embeddings import MockEmbedding

        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=64, ratios=(2, 4, 8), ratio_mix="adapt-32")
        trained = tiny_beacon_model(cfg, max_position_embeddings=6656)
        untrained = tiny_beacon_model(cfg, max_position_embeddings=6656, perturb=0.0)
        embed = MockEmbedding(embed_dim=16)
        lengths = args.lengths or [6144]
    else:
        from rag_vs_beacon import minilm_embedding

        trained = beacon_llm.load(adapter=args.adapter, beacon_ratio_mix="adapt-1024")
        untrained = beacon_llm.from_pretrained(beacon_llm.loading.resolve_model(None), beacon_config=trained.config)
        embed = minilm_embedding() if "rag" in args.methods else None
        lengths = args.lengths or [4096, 8192, 16384, 32768]
    native = trained.max_positions
    tok = trained.tokenizer
    eos = tok.eos_token_id
    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    filler = tok(book, add_special_tokens=False)["input_ids"]
    while len(filler) < 2 * max(lengths):
        filler = filler + filler
    counts = args.n if len(args.n) == len(lengths) else [args.n[0]] * len(lengths)
    rows: list[dict] = []
    timing: dict[str, float] = {m: 0.0 for m in args.methods}
    for length, count in zip(lengths, counts):
        rng = np.random.default_rng([args.seed, length])
        for sample in range(count):
            ctx, probes = make_probe_context(tok, filler, length - args.reserve, rng)
            if sample < args.first_sample:
                continue  # drawn all the same, so that later samples are the ones a full run makes
            questions = [chat_prompt_ids(tok, p.question) for p in probes]
            budget = ratio = None
            results = [
                {
                    "task": p.task,
                    "length": length,
                    "sample": sample,
                    "context_tokens": len(ctx),
                    "answer": p.answer,
                    "depths": p.depths,
                }
                for p in probes
            ]
            for method in args.methods:
                t0 = time.perf_counter()
                if method in ("trained", "untrained"):
                    bm = trained if method == "trained" else untrained
                    cache = bm.new_cache()
                    with torch.no_grad():
                        bm.forward(ctx, cache, return_token_logprobs=False)
                    if method == "trained":
                        budget, ratio = cache.get_seq_length(), cache.state.window_ratio
                elif budget is None:
                    raise ValueError(f"method {method!r} needs 'trained' first: it sets the KV budget")
                plain_cache = None
                if method == "full":
                    if len(ctx) + max(map(len, questions)) + args.new_tokens > native:
                        for r in results:
                            r[method] = None
                        continue
                    plain_cache = prefill(trained.model, ctx)
                elif method == "truncation":
                    plain_cache = prefill(trained.model, ctx[-budget:])
                elif method == "streamingllm":
                    plain_cache = prefill(trained.model, ctx[:SINK] + ctx[-(budget - SINK) :])
                elif method == "rag":
                    retriever = ChunkRetriever(tok, ctx, args.chunk, embed)
                for probe, q_ids, r in zip(probes, questions, results):
                    with torch.no_grad():
                        if method in ("trained", "untrained"):
                            out = bm.generate(
                                q_ids, cache=cache.fork(), max_new_tokens=args.new_tokens, return_dict_in_generate=True
                            )
                            new = out.new_tokens
                        elif method == "rag":
                            kept = retriever.context(probe.question, budget)
                            new = greedy(trained.model, None, kept + q_ids, args.new_tokens, eos)
                        else:
                            new = greedy(trained.model, plain_cache, q_ids, args.new_tokens, eos)
                    text = tok.decode(new, skip_special_tokens=True)
                    r[method] = {"correct": probe.score(text), "output": text}
                timing[method] += time.perf_counter() - t0
            for r in results:
                r["kv_budget"], r["ratio"] = budget, ratio
                rows.append(r)
            line = {m: sum(bool(r.get(m) and r[m]["correct"]) for r in results) for m in args.methods}
            print(
                json.dumps({"length": length, "sample": sample, "budget": budget, "ratio": ratio, **line}), flush=True
            )

    out = Path(args.out) if args.out else RESULTS / f"quality{'_fast' if args.fast else ''}.json"
    runs = [vars(args)]
    if args.update and out.is_file():
        previous = json.loads(out.read_text())
        if previous["args"]["methods"] != args.methods or previous["args"]["seed"] != args.seed:
            raise SystemExit(f"{out} was made with other methods or another seed; cannot merge")
        done = {(r["length"], r["sample"]) for r in rows}
        rows = [r for r in previous["rows"] if (r["length"], r["sample"]) not in done] + rows
        rows.sort(key=lambda r: (r["length"], r["sample"]))
        lengths = sorted({r["length"] for r in rows})
        for m, sec in previous["seconds_per_method"].items():
            timing[m] = timing.get(m, 0.0) + sec
        runs = previous.get("runs", [previous["args"]]) + runs

    def score(sel: list[dict], method: str) -> str:
        if not sel or not all(r.get(method) for r in sel):
            return "n/a"
        return f"{sum(r[method]['correct'] for r in sel)}/{len(sel)}"

    table: dict[str, dict[str, str]] = {}
    for task in PROBE_TASKS:
        for length in lengths:
            sel = [r for r in rows if r["length"] == length and r["task"] == task]
            table[f"{task}@{length}"] = {m: score(sel, m) for m in args.methods}
    for length in lengths:
        sel = [r for r in rows if r["length"] == length]
        table[f"all@{length}"] = {m: score(sel, m) for m in args.methods}
    print(f"{'task@length':26}" + "".join(f"{m:>14}" for m in args.methods))
    for key, vals in table.items():
        print(f"{key:26}" + "".join(f"{vals[m]:>14}" for m in args.methods))
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "table": table,
        "rows": rows,
        "seconds_per_method": {m: round(s, 1) for m, s in timing.items()},
        "args": vars(args),
        "runs": runs,
        "native_positions": native,
    }
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
