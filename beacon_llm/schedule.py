"""Pure scheduling functions: ratio choice, window capacity, interleaved layouts (paper v2 §2.2, v3 §3.1).

Nothing here touches tensors or models; the cache calls these to plan each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BeaconConfig


def ratio_capacity(ratio: int, max_positions: int, window: int) -> int:
    """Longest input a ratio can cover with ``max_positions`` RoPE positions: ``(P - W)·α + W`` (v2 App. E).

    Ratio 0 keeps every raw KV, so it covers exactly ``P`` tokens.
    """
    if ratio == 0:
        return max_positions
    return (max_positions - window) * ratio + window


def config_capacity(config: BeaconConfig, max_positions: int) -> int:
    """Most tokens a context can hold: the capacity of the largest ratio this config may use (adaptive or a single
    ratio), or of the smallest one for random and sequence mixes, whose small draws bound the positions."""
    ratios = config.ratios
    ratio = max(ratios) if (len(ratios) == 1 or config.is_adaptive) else min(ratios)
    return ratio_capacity(ratio, max_positions, config.window)


def adaptive_ratio(ratios: tuple[int, ...], needed: int, max_positions: int, window: int) -> int:
    """``adapt-X``: the ratio with the smallest capacity that is still >= ``needed``; else the largest ratio."""
    fitting = [(ratio_capacity(r, max_positions, window), r) for r in ratios]
    ok = [item for item in fitting if item[0] >= needed]
    if ok:
        return min(ok)[1]
    return max(ratios)


def smallest_fitting_power_of_two(needed: int, max_positions: int, window: int) -> int | None:
    """The smallest ratio 2^k whose capacity covers ``needed`` tokens (for error messages); None if W >= P."""
    if max_positions <= window:
        return None
    r = 1
    while ratio_capacity(r, max_positions, window) < needed:
        r *= 2
    return r


def pick_ratio(
    config: BeaconConfig,
    *,
    n_steps: int,
    n_windows: int,
    fixed: int | None,
    stream_total: int,
    max_positions: int,
    rng: np.random.Generator,
) -> tuple[int, int | None]:
    """Choose the ratio for the window being opened.

    Returns ``(ratio, fixed)`` where ``fixed`` is the ratio remembered for the rest of the sequence
    (``instance-random`` and ``adapt-X`` decide once; spec §2.2).
    """
    ratios = config.ratios
    if len(ratios) == 1:
        return ratios[0], fixed
    mix = config.ratio_mix
    if mix == "step-random":
        return int(rng.choice(list(ratios))), fixed
    if fixed is not None:
        return fixed, fixed
    if mix == "instance-random":
        r = int(rng.choice(list(ratios)))
        return r, r
    if mix == "sequence":
        if config.era == "v2":
            return ratios[min(n_steps, len(ratios) - 1)], None
        return ratios[n_windows % len(ratios)], None
    r = adaptive_ratio(ratios, stream_total + config.adapt_extra, max_positions, config.window)
    return r, r


def interleave_slots(n_raw: int, ratio: int, remainder: int) -> tuple[list[bool], int]:
    """Layout of ``n_raw`` new raw tokens with one beacon after every ``ratio``-th raw token of the window.

    ``remainder`` counts raw tokens of the window already seen since its last beacon. Returns the flags of the
    extended sequence (True = beacon) and the new remainder (v3 ``beacon_pos='interleave'``).
    """
    flags: list[bool] = []
    seen = remainder
    for _ in range(n_raw):
        flags.append(False)
        seen += 1
        if ratio > 0 and seen == ratio:
            flags.append(True)
            seen = 0
    return flags, (seen if ratio > 0 else 0)


@dataclass(frozen=True)
class StepPlan:
    """What one model call (one window chunk) feeds: ``n_raw`` raw tokens laid out as ``is_beacon``."""

    n_raw: int
    ratio: int
    is_beacon: tuple[bool, ...]
    completes_window: bool
    remainder: int
    trace_beacon_size: int  # the official per-step count: >0 beacons, 0 none, -1 ratio 0 (raw kept)

    @property
    def n_input(self) -> int:
        return len(self.is_beacon)

    @property
    def n_beacons(self) -> int:
        return sum(self.is_beacon)


def plan_step(config: BeaconConfig, *, raw_in_window: int, remaining: int, ratio: int, remainder: int) -> StepPlan:
    """Plan the next step given ``remaining`` tokens of the call and ``raw_in_window`` already cached raw tokens.

    Append placement: a step either fills the window (then ``stride/ratio`` beacons follow its raw tokens) or takes
    every remaining token without beacons. Interleave: beacons are inserted in every step (spec §3.3-3.4).
    ``ratio`` must already be chosen for the window (see :func:`pick_ratio`).
    """
    need = config.window - raw_in_window
    if config.interleave:
        take = min(remaining, need)
        flags, rem = interleave_slots(take, ratio, remainder)
        size = sum(flags) if ratio > 0 else -1
        return StepPlan(take, ratio, tuple(flags), raw_in_window + take == config.window, rem, size)
    if remaining >= need:
        n_beacons = config.stride // ratio if ratio > 0 else 0
        flags = (False,) * need + (True,) * n_beacons
        return StepPlan(need, ratio, flags, True, 0, n_beacons if ratio > 0 else -1)
    return StepPlan(remaining, ratio, (False,) * remaining, False, 0, 0)
