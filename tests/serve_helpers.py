"""What the ``beacon-llm serve`` tests share: a tiny model read with ``fit-N``, a server on a free port, documents."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from beacon_llm import BeaconConfig, BeaconEngine, BeaconModel, Completion
from beacon_llm.serve import ServeLimits, create_app, serve_in_thread
from beacon_llm.testing import tiny_beacon_model

MODEL = "tiny"
MAX_TOKENS = 8
NAMES = ["Dorothy", "Toto", "Glinda", "Ozma"]


def tiny_model() -> BeaconModel:
    """The tiny test model (512 positions, capacity 2000 tokens), read as the server reads: ``fit-N``."""
    return tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-64"))


def document(i: int) -> str:
    """A few hundred characters (the tiny tokenizer: one token each), different for each ``i``."""
    name = NAMES[i % len(NAMES)]
    return f"Chapter {i}. {name} walked along the yellow brick road and counted {i + 3} crows on a fence. " * 3


def chat_body(doc: str, question: str, **options: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": doc}, {"role": "user", "content": question}]
    return {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **options}


def ask(client: httpx.Client, doc: str, question: str, **options: Any) -> dict[str, Any]:
    """A chat completion that must succeed; returns the response JSON."""
    response = client.post("/v1/chat/completions", json=chat_body(doc, question, **options))
    assert response.status_code == 200, response.text
    return response.json()


def cached(response: dict[str, Any]) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


@contextmanager
def running(bm: BeaconModel, store: Path, *, headers: dict[str, str] | None = None, **kwargs: Any) -> Iterator[Any]:
    """A server over ``bm`` and ``store`` on a free port; yields an httpx client with ``.app`` and ``.url``."""
    kwargs.setdefault("limits", ServeLimits(min_prefix=8))
    app = create_app(bm, model_name=MODEL, store_dir=store, **kwargs)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        client.app, client.url = app, url
        yield client


class RecordingEngine(BeaconEngine):
    """An engine that records the final :class:`Completion` of every call (to see where a generation stopped) and
    takes at least ``delay`` seconds per text delta (a generation as slow as a real model's, on any machine)."""

    def __init__(self, *args: Any, finals: list[Completion], delay: float = 0.005, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finals, self.delay = finals, delay

    def stream(self, ids: Any, **kwargs: Any) -> Iterator[Any]:
        for item in super().stream(ids, **kwargs):
            if isinstance(item, Completion):
                self.finals.append(item)
            else:
                time.sleep(self.delay)
            yield item
