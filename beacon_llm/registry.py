"""A bounded, thread-safe LRU map whose values are loaded on demand: the process-wide model and engine registries.

A load runs outside the registry's lock, so callers asking for other keys are never blocked by it; callers asking
for the same key wait for that one load and get its value (or its exception)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Pending(Generic[V]):
    """One load in flight: its result, the threads waiting for it, and whether an unload asked not to keep it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.owner = threading.get_ident()
        self.value: V | None = None
        self.error: BaseException | None = None
        self.waiters = 0
        self.discarded = False


class Registry(Generic[K, V]):
    """A least-recently-used map of at most ``max_size`` entries, filled by :meth:`get`'s loader.

    Args:
        name: what it holds (for messages), e.g. ``"models"``.
        max_size: the bound; ``None`` reads ``env`` (or ``default``) at each insertion, so it can change at run time.
        env: the environment variable that sets the bound (an integer >= 0; 0 keeps nothing).
        default: the bound when neither ``max_size`` nor ``env`` is set.
        on_evict: called (outside the lock) with the values dropped to respect the bound; not for :meth:`discard`.

    Evicting or discarding only drops the registry's reference: a value still held by a caller keeps working.
    """

    def __init__(
        self,
        name: str,
        *,
        max_size: int | None = None,
        env: str | None = None,
        default: int = 4,
        on_evict: Callable[[list[V]], None] | None = None,
    ) -> None:
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size={max_size} must be >= 0")
        self.name = name
        self._max_size = max_size
        self.env = env
        self.default = default
        self.on_evict = on_evict
        self._lock = threading.Lock()
        self._items: OrderedDict[K, V] = OrderedDict()
        self._pending: dict[K, _Pending[V]] = {}

    @property
    def max_size(self) -> int:
        """The bound: the constructor's ``max_size``, else ``$env``, else ``default``."""
        if self._max_size is not None:
            return self._max_size
        raw = os.environ.get(self.env, "") if self.env else ""
        if not raw.strip():
            return self.default
        try:
            size = int(raw)
        except ValueError:
            size = -1
        if size < 0:
            raise ValueError(f"{self.env}={raw!r}: the most {self.name} to keep loaded must be an integer >= 0")
        return size

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def keys(self) -> list[K]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._items)

    def values(self) -> list[V]:
        """The values held, least recently used first."""
        with self._lock:
            return list(self._items.values())

    def waiting(self) -> int:
        """How many callers are now waiting for a load in flight (another caller's)."""
        with self._lock:
            return sum(p.waiters for p in self._pending.values())

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The value for ``key``, calling ``load()`` (outside the lock) if no one holds or is loading it.

        Concurrent callers for the same key share one load: they get its value, or its exception re-raised. A failed
        load is not kept, so the next call tries again."""
        max_size = self.max_size  # a bad environment variable fails before any loading
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending()
                owner = True
            elif pending.owner == threading.get_ident():
                raise RuntimeError(f"loading {self.name} {key!r} asked for itself (a recursive load)")
            else:
                pending.waiters += 1
                owner = False
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value  # type: ignore[return-value]
        try:
            value = load()
        except BaseException as exc:
            pending.error = exc
            with self._lock:
                self._pending.pop(key, None)
            pending.done.set()
            raise
        evicted: list[V] = []
        with self._lock:
            self._pending.pop(key, None)
            if not pending.discarded:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > max_size:
                    evicted.append(self._items.popitem(last=False)[1])
        pending.value = value
        pending.done.set()
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        return value

    def discard(
        self, key_matches: Callable[[K], bool] | None = None, value_matches: Callable[[V], bool] | None = None
    ) -> list[V]:
        """Drop the entries whose key or value matches (all of them when neither test is given) and return their
        values. Loads in flight for a matching key (all, when no test is given) still answer their callers but are
        not kept."""
        everything = key_matches is None and value_matches is None
        with self._lock:
            drop = [
                k
                for k, v in self._items.items()
                if everything
                or (key_matches is not None and key_matches(k))
                or (value_matches is not None and value_matches(v))
            ]
            for k, p in self._pending.items():
                if everything or (key_matches is not None and key_matches(k)):
                    p.discarded = True
            return [self._items.pop(k) for k in drop]
