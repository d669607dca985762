"""asyncio over blocking generators: the model runs in a worker thread, never on the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


async def iterate_in_thread(start: Callable[[threading.Event], Iterator[T]], name: str = "beacon") -> AsyncIterator[T]:
    """Run the generator ``start(cancel)`` in a worker thread and yield its items on the event loop.

    Leaving the ``async for`` early, cancelling the task, or closing the loop sets ``cancel``, which the generator
    checks (e.g. every window step and every token) to stop its work; an exception in the generator is re-raised
    here."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def post(item: object, exc: BaseException | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, exc))
        except RuntimeError:  # the event loop is closed: nobody listens any more
            cancel.set()
            return False
        return True

    def worker() -> None:
        items = None
        try:
            items = start(cancel)  # may raise too (a bad keyword argument): re-raised on the event loop as well
            for item in items:
                if not post(item, None):
                    return
        except BaseException as exc:  # re-raised on the event loop
            post(done, exc)
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        post(done, None)

    threading.Thread(target=worker, name=name, daemon=True).start()
    try:
        while True:
            item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is done:
                break
            yield item
    finally:
        cancel.set()
