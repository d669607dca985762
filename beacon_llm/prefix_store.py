"""The store of condensed prefixes behind "ingest once, ask many".

After a prompt is read, the condensed cache at its reusable boundary (a document's end) is kept in a bounded LRU in
memory and, with a ``cache_dir``, on disk (one safetensors file each), keyed by a hash of the exact token prefix,
the model identity and the plan it was read with (the fit-N plan, or the ratio an adapt-N read fixed). A later
prompt that starts with the same tokens forks the stored cache and reads only what follows. Concurrent reads of one
prefix are read once: the first caller claims it, the others wait for it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache import BeaconCache
from .serialization import load_cache, save_cache

logger = logging.getLogger(__name__)
DIGEST_CHARS = 40
MIN_SHARED_PREFIX = 32  # a guessed shared beginning shorter than this is not worth a checkpoint


def prefix_hash(ids: Sequence[int]) -> str:
    """The key of a token prefix (sha256 of its int64 ids)."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:DIGEST_CHARS]


def plan_tag(cache: BeaconCache) -> str:
    """Part of a stored prefix's key: caches of one prefix read under different fit-N plans, or with different
    fixed ratios (adapt-N, instance-random), differ."""
    plan, fixed = cache.state.fit_plan, cache.state.fixed_ratio
    if plan is not None:
        return f"f{plan.condensed_windows}r{plan.ratio}"
    return "" if fixed is None else f"a{fixed}"


def tag_order(tag: str) -> tuple[int, ...]:
    """Which of two usable caches of one prefix a read prefers, smaller first: fewer condensed windows (fit-N), or
    the smaller fixed ratio (instance-random; an adapt-N read finds only the one read at the ratio it fixes)."""
    return tuple(int(n) for n in re.findall(r"\d+", tag))


@dataclass
class StoredPrefix:
    n_tokens: int
    digest: str
    cache: BeaconCache
    checkpoint: bool = False  # a window checkpoint inside a prompt, not a document's end: dropped first


class PrefixStore:
    """Condensed prefixes of one model: ``max_prefixes`` in memory (least recently used dropped), all on disk in
    ``cache_dir`` when given, named by the model's identity (base model, beacon weights and config)."""

    def __init__(
        self,
        bm: Any,
        *,
        max_prefixes: int = 4,
        cache_dir: Path | None = None,
        min_prefix: int = 0,
    ) -> None:
        for name, value in (("max_prefixes", max_prefixes), ("min_prefix", min_prefix)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
            raise ValueError(f"cache_dir={str(cache_dir)!r} is a file, not a folder; pass a folder (it is created)")
        self.bm = bm
        self.max_prefixes = max_prefixes
        self.cache_dir = cache_dir
        self.min_prefix = min_prefix
        self._entries: OrderedDict[tuple[int, str, str], StoredPrefix] = OrderedDict()
        self._recent: deque[np.ndarray] = deque(maxlen=4)  # recent prompts (int64), to guess shared prefixes
        self._lock = threading.Lock()
        # prefixes being read now -> (set when done, the reading thread)
        self._reading: dict[tuple[int, str], tuple[threading.Event, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.pop("_reading", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._reading = {}

    def identity(self) -> str:
        """A hash of the base model, the beacon weights and config and the reading kernels (the model remembers its
        weights' digests until a weight changes, so a store follows weights trained or edited in place)."""
        return self.bm.identity()

    @property
    def enabled(self) -> bool:
        return bool(self.max_prefixes) or self.cache_dir is not None

    def stored(self) -> list[StoredPrefix]:
        """The prefixes kept in memory, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    # ------------------------------------------------------------------ finding
    def lookup(self, ids: Sequence[int], usable: Callable[[BeaconCache], int | None]) -> tuple[BeaconCache | None, int]:
        """The stored prefix of ``ids`` this read starts furthest into (a fork of it, and its length), or (None, 0).
        ``usable(cache)`` says where a read would start from ``cache`` (its length, or an earlier token it can go
        back to, e.g. a conversation grown past a fit-N plan's room), or None when it cannot serve this read. Of two
        starting at the same token, the one :func:`tag_order` puts first."""
        model = self.bm._fingerprint()  # entries read before the weights (or kernels) changed are not this model's
        with self._lock:
            found = []
            for e in self._entries.values():
                mine = e.cache.fingerprint == model
                if e.n_tokens <= len(ids) and mine and prefix_hash(ids[: e.n_tokens]) == e.digest:
                    start = usable(e.cache)
                    if start is not None:
                        found.append((start, e))
            best = min(found, key=lambda f: (-f[0], -f[1].n_tokens, tag_order(plan_tag(f[1].cache))), default=None)
            if best is not None:
                entry = best[1]
                self._entries.move_to_end((entry.n_tokens, entry.digest, plan_tag(entry.cache)))
        disk = self._lookup_disk(ids, best[0] if best else 0, usable)
        if disk is not None:
            return disk
        return (best[1].cache.fork(), best[1].n_tokens) if best is not None else (None, 0)

    def _disk_path(self, n: int, digest: str, tag: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{self.identity()}-{n}-{digest}{tag}.safetensors"

    def _lookup_disk(
        self, ids: Sequence[int], better_than: int, usable: Callable[[BeaconCache], int | None]
    ) -> tuple[BeaconCache, int] | None:
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return None
        found: list[tuple[int, str, str, Path]] = []
        for path in self.cache_dir.glob(f"{self.identity()}-*.safetensors"):
            parts = path.stem.split("-")
            if len(parts) == 3 and parts[1].isdigit() and better_than < int(parts[1]) <= len(ids):
                found.append((int(parts[1]), parts[2][:DIGEST_CHARS], parts[2][DIGEST_CHARS:], path))
        for n, digest, tag, path in sorted(found, key=lambda f: (-f[0], tag_order(f[2]))):
            if prefix_hash(ids[:n]) != digest:
                continue
            try:
                cache, _ = load_cache(str(path), self.bm)
            except ValueError as exc:  # corrupt or foreign: read again instead
                logger.warning("ignoring unusable condensed cache %s: %s", path, exc)
                continue
            if plan_tag(cache) != tag:  # named without its ratio (written before the tag held it): name it right
                self._rename_mislabelled(path, n, digest, plan_tag(cache))
            start = usable(cache)
            if start is None or start <= better_than:
                continue
            self.remember(ids[:n], cache, persist=False)
            return cache.fork(), n
        return None

    def _rename_mislabelled(self, path: Path, n: int, digest: str, tag: str) -> None:
        """Give a cache file whose name lacks its plan tag the name it is looked up by, so it is found (and loaded)
        only for the reads that can use it; when a file of that name exists already, this one is a copy of it (the
        same prefix read under the same plan by the same model) and is removed."""
        right = self._disk_path(n, digest, tag)
        try:
            if right.exists():
                path.unlink()
            else:
                path.replace(right)
        except OSError as exc:  # a read-only folder: it stays as it is, loaded and skipped
            logger.warning("cannot rename the condensed cache %s to %s: %s", path, right.name, exc)

    def shared_lengths(self, ids: list[int]) -> list[int]:
        """How long a beginning ``ids`` shares with each recent prompt (oldest first); ``ids`` becomes a recent
        prompt."""
        current = np.asarray(ids, dtype=np.int64)
        lengths = []
        with self._lock:
            for prev in self._recent:
                n = min(len(prev), len(current))
                diff = np.flatnonzero(prev[:n] != current[:n])
                lengths.append(int(diff[0]) if diff.size else n)
            self._recent.append(current)
        return lengths

    def shared_prefix(self, ids: list[int]) -> int | None:
        """The longest beginning ``ids`` shares with a recent prompt (None if under ``MIN_SHARED_PREFIX``); ``ids``
        becomes a recent prompt."""
        best = max(self.shared_lengths(ids), default=0)
        return best if best >= MIN_SHARED_PREFIX else None

    # ------------------------------------------------------------------ storing
    def remember(
        self, prefix: Sequence[int], cache: BeaconCache, persist: bool = True, checkpoint: bool = False
    ) -> None:
        """Keep (a fork of) ``cache`` as the condensed form of ``prefix``; ``persist``: also write it to disk;
        ``checkpoint``: a window checkpoint inside a prompt, which leaves memory before any document's end does."""
        if len(prefix) < max(self.min_prefix, 1):
            return
        digest = prefix_hash(prefix)
        entry = StoredPrefix(len(prefix), digest, cache.fork(), checkpoint)
        entry.cache.share_replan_base_buffer()  # a kept state shares the stored buffer, holds none of its own
        key = (entry.n_tokens, digest, plan_tag(cache))
        self._keep(key, entry)
        if persist and self.cache_dir is not None:
            path = self._disk_path(entry.n_tokens, digest, key[2])
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                save_cache(entry.cache, str(path), extra={"n_tokens": len(prefix)})
            except OSError as exc:  # the read itself succeeded: answer it, from the copy kept in memory
                logger.warning("could not write the condensed prefix to %s (%s); check that cache_dir is a writable "
                               "folder with free space", path, exc)  # fmt: skip

    def add(self, n_tokens: int, digest: str, cache: BeaconCache) -> None:
        """Keep an imported prefix (already keyed) in memory, within ``max_prefixes`` like a read one."""
        self._keep((n_tokens, digest, plan_tag(cache)), StoredPrefix(n_tokens, digest, cache))

    def _keep(self, key: tuple[int, str, str], entry: StoredPrefix) -> None:
        """Store ``entry`` as the most recently used; beyond ``max_prefixes``, drop the least recently used window
        checkpoint, else the least recently used entry (a question's checkpoint never pushes its document out)."""
        if not self.max_prefixes:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_prefixes:
                victim = next((k for k, e in self._entries.items() if e.checkpoint), next(iter(self._entries)))
                del self._entries[victim]

    # ------------------------------------------------------------------ one read per prefix
    def claim(
        self, ids: list[int], boundary: int | None, still_waiting: Callable[[], None]
    ) -> Callable[[], None] | None:
        """One read per prefix, also under concurrency: if another call is reading the same prefix (the same ids up
        to ``boundary``) right now, wait until it is done, so this call then finds it stored instead of reading it
        again; then mark it as being read by this call. Returns the release function (call it when the read ends,
        however it ends), or None when nothing is claimed. ``still_waiting`` is called while waiting and may raise
        (cancel, deadline); if the other read fails, this one reads."""
        if boundary is None or not max(self.min_prefix, 1) <= boundary < len(ids) or not self.enabled:
            return None
        key = (boundary, prefix_hash(ids[:boundary]))
        me = threading.get_ident()
        while True:
            with self._lock:
                other, owner = self._reading.get(key, (None, None))
                # a claim of this very thread is one an interrupt left behind (KeyboardInterrupt between taking it
                # and the caller's try): nobody will release it, and waiting for it would wait forever
                if other is None or owner == me:
                    if other is not None:
                        other.set()  # others waiting for the abandoned claim look again (and wait for this one)
                    mine = threading.Event()
                    self._reading[key] = (mine, me)
                    break
            while not other.wait(0.05):
                still_waiting()
            still_waiting()

        def release() -> None:
            with self._lock:
                if self._reading.get(key, (None, None))[0] is mine:
                    del self._reading[key]
            mine.set()

        return release
