"""Per-call streaming memory of Activation Beacon (docs/design.md §3).

A :class:`BeaconCache` holds, per layer, the condensed memory (sink + beacon KVs, keys already rotated to their
fixed memory positions ``0..M-1``) and the open window (raw and pending beacon KVs, keys *before* RoPE because
their positions change when the window is committed). It also carries the scheduling state. It is created per
call or kept by the caller (conversations, ``fork()`` to branch questions off one condensed book); it is never
stored on the model. Entries, once written, are never modified, so a fork is cheap and independent: the memory is
appended in place into a buffer shared with forks, copy on write (``kv_arena``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import BeaconConfig
from .kv_arena import KVArena
from .schedule import FitPlan


@dataclass
class StepTrace:
    """What one step fed (mirrors the official per-step bookkeeping; used by parity tests and progress bars)."""

    beacon_size: int
    n_new_tokens: int
    n_input: int
    mem_before: int
    is_beacon: tuple[bool, ...]
    positions: tuple[int, ...]


@dataclass
class _State:
    n_seen: int = 0  # raw tokens ingested since reset (the stream length)
    n_steps: int = 0
    n_windows: int = 0  # completed windows
    n_sink: int = 0
    window_ratio: int = -1  # ratio of the open window (interleave: chosen at its first step)
    remainder: int = 0  # interleave: raw tokens since the window's last beacon
    fixed_ratio: int | None = None  # instance-random / adapt-X decision
    window_flags: tuple[bool, ...] = ()  # layout of the open window's cached entries
    window_sizes: list[int] = field(default_factory=list)  # beacons committed per completed window
    pending: list[int] = field(default_factory=list)  # generated token not yet fed (see generate)
    fit_plan: FitPlan | None = None  # fit-N: the read's plan, fixed at its first call
    n_raw_memory: int = 0  # raw (uncondensed) entries in the memory: ratio-0 windows, fit-N's raw part
    overlap_ids: tuple[int, ...] = ()  # fit-N with an overlap: the last condensed tokens, to be read again raw

    def copy(self) -> _State:
        """An independent copy (its lists are new; the tuples and the frozen plan are shared)."""
        return dataclasses.replace(self, window_sizes=list(self.window_sizes), pending=list(self.pending))


@dataclass(frozen=True)
class WindowClose:
    """How the complete open window closes (docs/design.md §3.2), from :meth:`BeaconCache.window_close`.

    Attributes:
        ratio: the window's compression ratio (0: kept raw).
        move: window entries that go to the memory, in order (on the first close the sink comes first).
        keep: raw entries that stay and start the next window (v2 with stride < window).
        n_moved: the window's beacons (ratio > 0) or raw entries (ratio 0) among ``move``, the sink not counted.
        n_sink: the cache's sink entries after this close.
    """

    ratio: int
    move: tuple[int, ...]
    keep: tuple[int, ...]
    n_moved: int
    n_sink: int


_KV_NAMES = ("mem_k", "mem_v", "win_k", "win_v")


class MemoryAppend:
    """Entries ``start..end-1`` of every layer's memory, reserved by :meth:`BeaconCache.reserve_memory` for one read
    that writes them layer by layer (the decode step); :meth:`BeaconCache.commit_memory` makes them the memory."""

    def __init__(self, arena: KVArena, start: int, end: int) -> None:
        self.arena, self.start, self.end = arena, start, end
        self._views: tuple[torch.Tensor, ...] | None = None

    def _slices(self) -> tuple[torch.Tensor, ...]:
        """The slices of all layers, made once per read: (L, B, KVH, n, D) views of the new and of all entries."""
        if self._views is None:
            a, s, e = self.arena, self.start, self.end
            self._views = (a.keys[..., s:e, :], a.values[..., s:e, :], a.keys[..., :e, :], a.values[..., :e, :])
        return self._views

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys`` (rotated) / ``values`` (B, KVH, end - start, D) of ``layer``; returns that layer's memory
        with them, (B, KVH, end, D) each (views: nothing is copied)."""
        new_keys, new_values, all_keys, all_values = self._slices()
        new_keys.select(0, layer).copy_(keys)  # select, not unbind: its view may be written with grad enabled
        new_values.select(0, layer).copy_(values)
        return all_keys.select(0, layer), all_values.select(0, layer)

    def layer_memory(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """That layer's memory with the reserved entries, (B, KVH, end, D) each (views), for a kernel that writes the
        reserved rows itself (the native decode layer)."""
        _, _, all_keys, all_values = self._slices()
        return all_keys.select(0, layer), all_values.select(0, layer)


class BeaconCache:
    """Condensed context of one conversation / document.

    Args:
        config: the beacon configuration of the model this cache is used with.
        num_layers: decoder layers of that model.
        generator: numpy generator for ``step-random`` / ``instance-random`` ratio draws. Defaults to
            ``numpy.random.default_rng(seed)`` (the official code uses seed 42).
        trace: record a :class:`StepTrace` per step (``cache.trace``).
        max_entries: the model's positions: the memory buffer is not grown past them in advance.
    """

    def __init__(
        self,
        config: BeaconConfig,
        num_layers: int,
        *,
        generator: np.random.Generator | None = None,
        seed: int = 42,
        trace: bool = False,
        max_entries: int | None = None,
    ) -> None:
        self.config = config
        self.max_entries = max_entries
        self.num_layers = num_layers
        self.generator = generator if generator is not None else np.random.default_rng(seed)
        self.trace: list[StepTrace] | None = [] if trace else None
        self.state = _State()
        self.mem_k: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, M, D) rotated at 0..M-1
        self.mem_v: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, M, D)
        self.win_k: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, R, D) before RoPE
        self.win_v: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, R, D)
        self._arena: KVArena | None = None  # the buffer mem_k / mem_v are views of (None: they are plain tensors)
        self.last_logits: torch.Tensor | None = None  # (V,) next-token logits after the last fed token
        self.fingerprint: tuple | None = None  # (model identity) set on first use
        # fit-N: this stream's state before its plan's last condensed window (see keep_replan_base), shared by forks
        self.replan_base: BeaconCache | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sizes
    @property
    def memory_length(self) -> int:
        """Entries of the condensed memory (sink + beacons)."""
        k = self.mem_k[0]
        return 0 if k is None else int(k.shape[-2])

    @property
    def window_length(self) -> int:
        """Entries of the open window (raw tokens and, when interleaving, its pending beacons)."""
        return len(self.state.window_flags)

    @property
    def raw_in_window(self) -> int:
        return sum(1 for f in self.state.window_flags if not f)

    def get_seq_length(self) -> int:
        """KV entries a new token attends to before itself: sink + beacon memory + open window."""
        return self.memory_length + self.window_length

    def memory_size(self) -> dict[str, int]:
        """KV entries as the official code counts them: sink, beacon (the whole memory after the sink), raw (the
        open window, its interleaved beacons included), total."""
        sink = self.state.n_sink
        mem = self.memory_length
        raw = self.window_length
        return {"sink": sink, "beacon": mem - sink, "raw": raw, "total": mem + raw}

    def kv_by_kind(self) -> dict[str, int]:
        """KV entries by what they hold: sink, condensed (beacons, committed or in the open window), raw (tokens
        kept as read: ratio-0 windows, fit-N's raw part, the open window's tokens), total."""
        sink = self.state.n_sink
        mem = self.memory_length
        raw_mem = self.state.n_raw_memory
        raw_window = self.raw_in_window
        return {
            "sink": sink,
            "condensed": mem - sink - raw_mem + self.window_length - raw_window,
            "raw": raw_mem + raw_window,
            "total": mem + self.window_length,
        }

    @property
    def n_seen(self) -> int:
        """Raw tokens read since the cache was created or reset."""
        return self.state.n_seen

    @property
    def window_sizes(self) -> list[int]:
        return list(self.state.window_sizes)

    def nbytes(self) -> int:
        tensors = [t for t in (*self.mem_k, *self.mem_v, *self.win_k, *self.win_v) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ transitions (docs/design.md §3)
    def bind(self, fingerprint: tuple) -> None:
        """Refuse a cache built by another model (``fingerprint`` differs from the one it holds), else remember
        ``fingerprint`` as its model's."""
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise ValueError(f"this cache was built by a different model {self.fingerprint}, not {fingerprint}")
        self.fingerprint = fingerprint

    @contextlib.contextmanager
    def transaction(self) -> Iterator[BeaconCache]:
        """Within the block, any exception or interrupt restores the cache as it was before it (§3.1): a failed
        call never leaves it half-updated. The caller holds the lock (:meth:`acquire`)."""
        snapshot = self._snapshot()
        try:
            yield self
        except BaseException:
            self._restore(snapshot)
            raise

    def take_pending(self) -> list[int]:
        """The generated tokens not fed yet (docs/design.md §8), removed from the cache: the caller feeds them."""
        pending, self.state.pending = self.state.pending, []
        return pending

    def set_pending(self, token: int) -> None:
        """Keep ``token`` (generated, not fed) to be fed first by the next read; the logits after the last fed token
        no longer describe the context's end, so they are dropped."""
        self.state.pending = [token]
        self.last_logits = None

    def set_last_logits(self, logits: torch.Tensor) -> None:
        """Remember the (V,) next-token logits after the last fed token (``generate(input_ids=None)`` uses them): a
        copy when they are a row of a larger tensor (a read's scored chunk of logits), which the cache and each of its
        forks would otherwise keep alive whole."""
        if logits.untyped_storage().nbytes() > logits.numel() * logits.element_size():
            logits = logits.clone()
        self.last_logits = logits

    def record(self, step: StepTrace) -> None:
        """Append ``step`` to the trace when the cache keeps one."""
        if self.trace is not None:
            self.trace.append(step)

    def ensure_fit_plan(self, choose: Callable[[], FitPlan]) -> FitPlan:
        """``fit-N``: the cache's plan, chosen by ``choose()`` at its first read and fixed from then on."""
        if self.state.fit_plan is None:
            self.state.fit_plan = choose()
        return self.state.fit_plan

    def remember_condensed(self, ids: Sequence[int], keep: int) -> None:
        """``fit_overlap``: keep the last ``keep`` condensed token ids read so far (``ids``: the step's tokens)."""
        self.state.overlap_ids = (self.state.overlap_ids + tuple(int(t) for t in ids))[-keep:]

    def take_overlap_ids(self) -> tuple[int, ...]:
        """The remembered condensed token ids, forgotten from now on (they are read again once)."""
        ids, self.state.overlap_ids = self.state.overlap_ids, ()
        return ids

    def choose_window_ratio(self, ratio: int, *, fixed: int | None) -> int:
        """Record ``ratio`` as the ratio of the window opening now and ``fixed`` as the ratio remembered for the rest
        of the stream (``instance-random`` / ``adapt-N``; pass the current one to keep it). Returns ``ratio``."""
        self.state.window_ratio = ratio
        self.state.fixed_ratio = fixed
        return ratio

    def grow_window(
        self,
        new_k: Sequence[torch.Tensor],
        new_v: Sequence[torch.Tensor],
        window_flags: tuple[bool, ...],
        *,
        n_raw: int,
        remainder: int,
    ) -> None:
        """After a step that read ``n_raw`` tokens: append its per-layer keys (before RoPE) / values to the open
        window, whose layout becomes ``window_flags`` (§3.2)."""
        st = self.state
        st.n_seen += n_raw
        st.n_steps += 1
        st.remainder = remainder
        self.win_k = [new if old is None else torch.cat([old, new], 2) for old, new in zip(self.win_k, new_k)]
        self.win_v = [new if old is None else torch.cat([old, new], 2) for old, new in zip(self.win_v, new_v)]
        st.window_flags = window_flags

    def window_close(self, ratio: int) -> WindowClose:
        """Which entries of the complete open window move to the memory and which stay (§3.2); nothing changes
        until :meth:`commit_window`."""
        cfg, st = self.config, self.state
        flags = st.window_flags
        raw_idx = [i for i, f in enumerate(flags) if not f]
        keep = raw_idx[len(raw_idx) - (cfg.window - cfg.stride) :] if cfg.window > cfg.stride else []
        if ratio > 0:
            move = [i for i, f in enumerate(flags) if f]
        else:
            move = [i for i in raw_idx if i not in set(keep)]
        n_moved = len(move)
        n_sink = st.n_sink
        if cfg.sink_size and st.n_sink == 0:
            sink = raw_idx[: cfg.sink_size]
            if ratio > 0:
                move = sink + [i for i in move if i not in set(sink)]
            else:  # as the official code: a window kept raw moves all its entries, so the sink's are there twice
                move = sink + move
            n_sink = len(sink)
        return WindowClose(ratio, tuple(move), tuple(keep), n_moved, n_sink)

    def commit_window(
        self,
        close: WindowClose,
        moved_k: Sequence[torch.Tensor],
        moved_v: Sequence[torch.Tensor],
        kept_k: Sequence[torch.Tensor | None],
        kept_v: Sequence[torch.Tensor | None],
    ) -> None:
        """Close the open window as ``close`` says: append ``moved_k`` / ``moved_v`` (per layer, the ``close.move``
        entries, keys rotated at the next memory positions) to the memory; ``kept_k`` / ``kept_v`` (the
        ``close.keep`` entries, or None) become the open window (§3.2)."""
        st = self.state
        if moved_k and moved_k[0].shape[2]:
            self._extend_memory(moved_k, moved_v)
        self.win_k, self.win_v = list(kept_k), list(kept_v)
        st.n_sink = close.n_sink
        st.window_flags = (False,) * len(close.keep)
        if close.ratio == 0:
            st.n_raw_memory += close.n_moved  # raw entries moved to memory
        st.n_windows += 1
        st.window_sizes.append(close.n_moved if close.ratio > 0 else -1)

    # ------------------------------------------------------------------ lifecycle
    def set_fit_plan(self, plan: FitPlan) -> None:
        """Fix the ``fit-N`` plan of a fresh cache (training uses its own position budget; reads plan themselves)."""
        if self.state.n_seen or self.state.fit_plan is not None:
            raise ValueError("the fit plan is chosen once, before the first read; use a fresh cache")
        if plan.window != self.config.window or plan.sink_size != self.config.sink_size:
            raise ValueError(f"{plan} does not match the cache's window {self.config.window} / sink")
        self.state.fit_plan = plan

    def can_replan(self, plan: FitPlan) -> bool:
        """Whether this ``fit-N`` cache holds what a fresh read under ``plan`` holds after the same tokens, so that
        the read can go on under ``plan`` instead of its own (a conversation grown past the room its plan kept):
        both plans condense at one ratio, and every token read so far lies in whole windows that both condense, its
        overlap not yet read and nothing pending."""
        old, st = self.state.fit_plan, self.state
        return (
            old is not None
            and plan.condensed_windows > 0
            and (old.ratio, old.window, old.sink_size, old.overlap)
            == (plan.ratio, plan.window, plan.sink_size, plan.overlap)
            and st.n_seen % plan.window == 0
            and st.n_seen < min(old.raw_from, plan.raw_from)
            and self.raw_in_window == 0
            and not st.pending
        )

    def keep_replan_base(self) -> None:
        """Remember (a fork of) this state as the one a read grown past this plan's room goes on from under a larger
        plan (:meth:`can_replan`); every later fork of this cache carries it, so every stored prefix of the stream
        can go back to it."""
        base = self.fork()
        base.replan_base = None
        self.replan_base = base

    def replan(self, plan: FitPlan) -> None:
        """Go on reading under ``plan`` (see :meth:`can_replan`); refused (``ValueError``) where the tokens read so
        far were not read as ``plan`` reads them."""
        if not self.can_replan(plan):
            raise ValueError(
                f"this cache read {self.state.n_seen} tokens under {self.state.fit_plan}, not as {plan} reads them; "
                "read the text again with a fresh cache"
            )
        self.state.fit_plan = plan

    def append_raw_memory(
        self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, new_tokens: bool = True
    ) -> None:
        """Append ``keys`` / ``values`` (per layer (B, KVH, n, D): ``n`` raw tokens, keys rotated at their memory
        positions) to the memory: a read past ``fit-N``'s condensed windows keeps every token raw. ``new_tokens``
        False: tokens of the stream read again (``fit_overlap``), entries without new stream tokens."""
        self._extend_memory(keys, values)
        self._count_raw(int(keys[0].shape[2]), new_tokens)

    def reserve_memory(self, n: int, like: torch.Tensor) -> MemoryAppend:
        """Reserve the next ``n`` memory entries of every layer for a read that writes them itself, layer by layer
        (``like``: (B, KVH, n, D) in the entries' dtype and device). Nothing changes until :meth:`commit_memory`."""
        return self._writable(self.memory_length, self.memory_length + n, like)

    def commit_memory(self, append: MemoryAppend, *, new_tokens: bool = True) -> None:
        """Make the entries written through ``append`` (raw tokens, as :meth:`append_raw_memory`) the memory."""
        if append.start != self.memory_length:
            raise ValueError(f"this reservation starts at {append.start}, the memory has {self.memory_length} entries")
        self._arena = append.arena
        self._set_memory_views(append.end)
        self._count_raw(append.end - append.start, new_tokens)

    def _count_raw(self, n_tokens: int, new_tokens: bool) -> None:
        st = self.state
        st.n_seen += n_tokens if new_tokens else 0
        st.n_steps += 1
        st.n_raw_memory += n_tokens
        st.window_ratio = 0

    def _writable(self, start: int, end: int, like: torch.Tensor) -> MemoryAppend:
        """Entries ``start..end-1`` of an arena holding this cache's first ``start`` entries: its own when it may
        append there, else a new one with those entries copied (copy on write, ``kv_arena``)."""
        arena = self._arena
        same_kind = arena is not None and arena.keys.dtype == like.dtype and arena.keys.device == like.device
        if arena is None or not same_kind or not arena.claim(start, end):
            arena = KVArena.allocate(like, self.num_layers, end, self.max_entries)
            arena.claim(0, end)
            if start:
                for i in range(self.num_layers):
                    arena.keys[i, :, :, :start] = self.mem_k[i]
                    arena.values[i, :, :, :start] = self.mem_v[i]
        return MemoryAppend(arena, start, end)

    def share_replan_base_buffer(self) -> None:
        """Point the kept state (:meth:`keep_replan_base`) at this cache's buffer, which begins with its entries
        (the same stream, read further), so it keeps no buffer of its own alive: called on the cache the store keeps
        (a read's buffer may have grown, or been copied, since the state was kept). Entries below a buffer's claim
        are never written again."""
        base, arena = self.replan_base, self._arena
        if base is None or arena is None or base._arena is arena or not 0 < base.memory_length <= self.memory_length:
            return
        if (arena.keys.dtype, arena.keys.device) != (base.mem_k[0].dtype, base.mem_k[0].device):
            return
        base._arena = arena
        base._set_memory_views(base.memory_length)

    def _extend_memory(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        if keys[0].requires_grad or (self.mem_k[0] is not None and self.mem_k[0].requires_grad):
            # training: autograd keeps the memory it read, so entries go to new tensors instead of a shared buffer
            self.mem_k = [k if old is None else torch.cat([old, k], 2) for old, k in zip(self.mem_k, keys)]
            self.mem_v = [v if old is None else torch.cat([old, v], 2) for old, v in zip(self.mem_v, values)]
            self._arena = None
            return
        append = self._writable(self.memory_length, self.memory_length + int(keys[0].shape[2]), keys[0])
        for i, (k, v) in enumerate(zip(keys, values)):
            append.write(i, k, v)
        self._arena = append.arena
        self._set_memory_views(append.end)

    def _set_memory_views(self, end: int) -> None:
        arena = self._arena
        assert arena is not None
        self.mem_k = [arena.keys[i, :, :, :end] for i in range(self.num_layers)]  # (B, KVH, end, D) views
        self.mem_v = [arena.values[i, :, :, :end] for i in range(self.num_layers)]

    def reset(self) -> None:
        """Forget everything read so far (the generator is kept, as in the official code)."""
        self.state = _State()
        self.mem_k = [None] * self.num_layers
        self.mem_v = [None] * self.num_layers
        self.win_k = [None] * self.num_layers
        self.win_v = [None] * self.num_layers
        self._arena = None
        self.last_logits = None
        self.replan_base = None
        if self.trace is not None:
            self.trace = []

    def fork(self) -> BeaconCache:
        """An independent copy: continuing one never affects the other (tensors are shared until replaced)."""
        other = copy.copy(self)
        other.state = copy.deepcopy(self.state)
        other.generator = copy.deepcopy(self.generator)
        other.mem_k, other.mem_v = list(self.mem_k), list(self.mem_v)
        other.win_k, other.win_v = list(self.win_k), list(self.win_v)
        other.trace = None if self.trace is None else list(self.trace)
        other._lock = threading.Lock()
        return other

    def _snapshot(self) -> tuple:
        return (
            self.state.copy(),
            copy.deepcopy(self.generator.bit_generator.state),
            list(self.mem_k),
            list(self.mem_v),
            list(self.win_k),
            list(self.win_v),
            self._arena,
            self.last_logits,
            None if self.trace is None else len(self.trace),
            self.fingerprint,
        )

    def _restore(self, snap: tuple) -> None:
        (
            self.state,
            generator_state,
            self.mem_k,
            self.mem_v,
            self.win_k,
            self.win_v,
            self._arena,
            self.last_logits,
            n_trace,
            self.fingerprint,
        ) = snap
        self.generator.bit_generator.state = generator_state
        if self.trace is not None and n_trace is not None:
            del self.trace[n_trace:]

    # ------------------------------------------------------------------ records (serialization.save_cache)
    def to_record(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The cache as CPU tensors and JSON-ready metadata (config, layers, model fingerprint, scheduling state,
        generator); :meth:`from_record` reads them back. Files are ``serialization``'s business."""
        tensors: dict[str, torch.Tensor] = {}
        for name in _KV_NAMES:
            for i, t in enumerate(getattr(self, name)):
                if t is not None:
                    tensors[f"{name}.{i}"] = t.detach().cpu().contiguous()
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits.detach().cpu().contiguous()
        st = self.state
        meta = {
            "config": {**self.config.to_dict(), "beacon_era": self.config.era},
            "num_layers": self.num_layers,
            "fingerprint": list(self.fingerprint) if self.fingerprint else None,
            "state": {
                "n_seen": st.n_seen,
                "n_steps": st.n_steps,
                "n_windows": st.n_windows,
                "n_sink": st.n_sink,
                "window_ratio": st.window_ratio,
                "remainder": st.remainder,
                "fixed_ratio": st.fixed_ratio,
                "window_flags": [int(f) for f in st.window_flags],
                "window_sizes": list(st.window_sizes),
                "pending": list(st.pending),
                "fit_plan": st.fit_plan.to_dict() if st.fit_plan is not None else None,
                "n_raw_memory": st.n_raw_memory,
                "overlap_ids": list(st.overlap_ids),
            },
            "generator": self.generator.bit_generator.state,
        }
        return tensors, meta

    @classmethod
    def from_record(
        cls,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        *,
        config: BeaconConfig,
        num_layers: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_entries: int | None = None,
    ) -> BeaconCache:
        """A cache from :meth:`to_record`'s output, its KVs on ``device`` in ``dtype``. ``config`` / ``num_layers``
        are the model's (the caller checks they match ``meta``'s); a missing entry raises KeyError / TypeError."""
        cache = cls(config, num_layers, max_entries=max_entries)
        s = meta["state"]
        st = cache.state
        st.n_seen, st.n_steps, st.n_windows, st.n_sink = s["n_seen"], s["n_steps"], s["n_windows"], s["n_sink"]
        st.window_ratio, st.remainder, st.fixed_ratio = s["window_ratio"], s["remainder"], s["fixed_ratio"]
        st.window_flags = tuple(bool(f) for f in s["window_flags"])
        st.window_sizes, st.pending = list(s["window_sizes"]), list(s["pending"])
        st.fit_plan = FitPlan(**s["fit_plan"]) if s.get("fit_plan") else None
        st.n_raw_memory = int(s.get("n_raw_memory", 0))
        st.overlap_ids = tuple(int(t) for t in s.get("overlap_ids", ()))
        cache.generator.bit_generator.state = meta["generator"]
        cache.fingerprint = tuple(meta["fingerprint"]) if meta["fingerprint"] else None
        for name in _KV_NAMES:
            setattr(
                cache,
                name,
                [
                    tensors[f"{name}.{i}"].to(device=device, dtype=dtype) if f"{name}.{i}" in tensors else None
                    for i in range(num_layers)
                ],
            )
        if "last_logits" in tensors:
            cache.last_logits = tensors["last_logits"].to(device=device)
        return cache

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "this BeaconCache is being used by another call right now; give each thread its own cache "
                "(cache.fork() copies a condensed context)"
            )

    def release(self) -> None:
        self._lock.release()

    def __repr__(self) -> str:
        size = self.memory_size()
        return (
            f"BeaconCache(tokens_read={self.state.n_seen}, windows={self.state.n_windows}, sink={size['sink']}, "
            f"beacon={size['beacon']}, raw={size['raw']})"
        )
