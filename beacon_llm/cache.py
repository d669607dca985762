"""Per-call streaming memory of Activation Beacon (docs/design.md §3).

A :class:`BeaconCache` holds, per layer, the condensed memory (sink + beacon KVs, keys already rotated to their
fixed memory positions ``0..M-1``) and the open window (raw and pending beacon KVs, keys *before* RoPE because
their positions change when the window is committed). It also carries the scheduling state. It is created per
call or kept by the caller (conversations, ``fork()`` to branch questions off one condensed book); it is never
stored on the model. Tensors are never modified in place, so a fork is cheap and independent.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import BeaconConfig
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


class BeaconCache:
    """Condensed context of one conversation / document.

    Args:
        config: the beacon configuration of the model this cache is used with.
        num_layers: decoder layers of that model.
        generator: numpy generator for ``step-random`` / ``instance-random`` ratio draws. Defaults to
            ``numpy.random.default_rng(seed)`` (the official code uses seed 42).
        trace: record a :class:`StepTrace` per step (``cache.trace``).
    """

    def __init__(
        self,
        config: BeaconConfig,
        num_layers: int,
        *,
        generator: np.random.Generator | None = None,
        seed: int = 42,
        trace: bool = False,
    ) -> None:
        self.config = config
        self.num_layers = num_layers
        self.generator = generator if generator is not None else np.random.default_rng(seed)
        self.trace: list[StepTrace] | None = [] if trace else None
        self.state = _State()
        self.mem_k: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, M, D) rotated at 0..M-1
        self.mem_v: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, M, D)
        self.win_k: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, R, D) before RoPE
        self.win_v: list[torch.Tensor | None] = [None] * num_layers  # (B, KVH, R, D)
        self.last_logits: torch.Tensor | None = None  # (V,) next-token logits after the last fed token
        self.fingerprint: tuple | None = None  # (model identity) set on first use
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

    # ------------------------------------------------------------------ lifecycle
    def set_fit_plan(self, plan: FitPlan) -> None:
        """Fix the ``fit-N`` plan of a fresh cache (training uses its own position budget; reads plan themselves)."""
        if self.state.n_seen or self.state.fit_plan is not None:
            raise ValueError("the fit plan is chosen once, before the first read; use a fresh cache")
        if plan.window != self.config.window or plan.sink_size != self.config.sink_size:
            raise ValueError(f"{plan} does not match the cache's window {self.config.window} / sink")
        self.state.fit_plan = plan

    def append_raw_memory(self, keys: list[torch.Tensor], values: list[torch.Tensor], n_tokens: int) -> None:
        """Make ``keys`` / ``values`` (per layer: the old memory followed by ``n_tokens`` raw entries, keys rotated
        at their positions) the memory: a read past ``fit-N``'s condensed windows keeps every token raw."""
        st = self.state
        self.mem_k, self.mem_v = list(keys), list(values)
        st.n_seen += n_tokens
        st.n_steps += 1
        st.n_raw_memory += n_tokens
        st.window_ratio = 0

    def reset(self) -> None:
        """Forget everything read so far (the generator is kept, as in the official code)."""
        self.state = _State()
        self.mem_k = [None] * self.num_layers
        self.mem_v = [None] * self.num_layers
        self.win_k = [None] * self.num_layers
        self.win_v = [None] * self.num_layers
        self.last_logits = None
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
            copy.deepcopy(self.state),
            copy.deepcopy(self.generator),
            list(self.mem_k),
            list(self.mem_v),
            list(self.win_k),
            list(self.win_v),
            self.last_logits,
            None if self.trace is None else len(self.trace),
            self.fingerprint,
        )

    def _restore(self, snap: tuple) -> None:
        (
            self.state,
            self.generator,
            self.mem_k,
            self.mem_v,
            self.win_k,
            self.win_v,
            self.last_logits,
            n_trace,
            self.fingerprint,
        ) = snap
        if self.trace is not None and n_trace is not None:
            del self.trace[n_trace:]

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
