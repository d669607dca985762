"""Append-only key/value storage for a cache's memory, shared by its forks (docs/design.md §3.1).

The memory only grows: each read appends entries (beacons of a closed window, raw tokens, one generated token at a
time). Storing each layer's memory as one tensor that is re-concatenated on every append copies the whole memory per
token. Here every layer's memory is a view of the first ``M`` entries of a preallocated buffer, and an append writes
its entries in place, so a decode step costs the same whatever the memory length.

Forks share a buffer. The buffer remembers how far it has been *claimed*: the cache whose memory ends exactly there
appends in place and moves the claim; any other cache on the same buffer (the fork that the other branch already
extended, a cache restored after a failed call) first copies its own entries into a new buffer (copy on write).
Entries below a view's end are never written again, so a fork, a snapshot or a saved view keeps seeing what it saw.
"""

from __future__ import annotations

import threading

import torch

_GROW = 256  # capacity is rounded up to a multiple of this many entries


class KVArena:
    """Keys and values of every layer, (L, B, KVH, C, D) each, with the first ``claimed`` entries in use.

    ``claim(start, end)`` hands out entries ``start..end-1`` to the one cache whose memory ends at ``start``.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
        self.keys = keys  # (L, B, KVH, C, D), keys rotated at their memory positions
        self.values = values  # (L, B, KVH, C, D)
        self.claimed = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[3])

    def claim(self, start: int, end: int) -> bool:
        """Take entries ``start..end-1`` if the claim ends at ``start`` and they fit; False otherwise (the caller
        then copies its entries into a new arena)."""
        with self._lock:
            if self.claimed != start or end > self.capacity:
                return False
            self.claimed = end
            return True

    @classmethod
    def allocate(
        cls,
        like: torch.Tensor,
        num_layers: int,
        needed: int,
        limit: int | None = None,
    ) -> KVArena:
        """An empty arena for at least ``needed`` entries per layer, shaped like ``like`` (B, KVH, n, D) in dtype and
        device. It leaves room to grow by half again (rounded up to 256), but not past ``limit`` (the model's
        positions) unless ``needed`` itself is beyond it."""
        capacity = grown_capacity(needed, limit)
        b, kvh, _, d = like.shape
        shape = (num_layers, b, kvh, capacity, d)
        return cls(like.new_empty(shape), like.new_empty(shape))


def grown_capacity(needed: int, limit: int | None) -> int:
    """Entries to allocate for ``needed``: 1.5 x ``needed`` rounded up to a multiple of 256, capped at ``limit``
    (never below ``needed``)."""
    if needed < 1:
        raise ValueError(f"needed={needed} must be >= 1")
    capacity = -(-(needed + needed // 2) // _GROW) * _GROW
    if limit is not None:
        capacity = min(capacity, max(limit, needed))
    return capacity
