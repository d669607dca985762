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
    ratio), or of the smallest one for random and sequence mixes, whose small draws bound the positions.
    ``fit-N``: :func:`fit_capacity`."""
    ratios = config.ratios
    if config.is_fit:
        return fit_capacity(max(ratios), max_positions, config.window, config.sink_size, config.fit_overlap)
    ratio = max(ratios) if (len(ratios) == 1 or config.is_adaptive) else min(ratios)
    return ratio_capacity(ratio, max_positions, config.window)


def adaptive_ratio(ratios: tuple[int, ...], needed: int, max_positions: int, window: int) -> int:
    """``adapt-X``: the ratio with the smallest capacity that is still >= ``needed``; else the largest ratio."""
    fitting = [(ratio_capacity(r, max_positions, window), r) for r in ratios]
    ok = [item for item in fitting if item[0] >= needed]
    if ok:
        return min(ok)[1]
    return max(ratios)


def adapt_ratio(config: BeaconConfig, max_positions: int, planned: int) -> int:
    """``adapt-X``: the ratio a read planned for ``planned`` tokens fixes when it opens its first window, the one
    whose capacity holds ``planned + X`` (docs/design.md §2.1). A stored prefix of an adapt-X read serves a later
    read only if it was read at the ratio that read would fix."""
    return adaptive_ratio(config.ratios, planned + config.adapt_extra, max_positions, config.window)


def fit_capacity(ratio: int, max_positions: int, window: int, sink_size: int = 0, overlap: int = 0) -> int:
    """Longest read ``fit-N`` can always plan with ``ratio``: up to it, every length fits ``max_positions``, with
    its oldest full windows condensed to ``window / ratio`` beacons each (plus the sink and the ``overlap`` tokens
    read again raw) and the rest raw.

    Two bounds (docs/fit_schedule.md): while the last condensed window is read, its ``window`` raw tokens and its
    beacons sit after the memory, so ``sink + k·W/α + W <= P`` bounds the condensed windows k; once they are
    closed, ``sink + k·W/α + overlap + raw <= P`` bounds the raw tokens after them."""
    if ratio == 0:
        return max_positions
    per_window, sink = window // ratio, min(sink_size, window)
    most = (max_positions - sink - window) // per_window  # condensed windows whose last read fits the positions
    if most < 1:
        return max_positions
    raw = max_positions - sink - most * per_window - overlap  # raw tokens after them
    return max(max_positions, most * window + raw)


@dataclass(frozen=True)
class FitPlan:
    """How ``fit-N`` reads one context (this project's mode): the first ``condensed_windows`` windows get beacons
    at ``ratio``, everything after token ``raw_from`` stays raw; the last ``overlap`` condensed tokens are read once
    more, raw, right after the beacons (``BeaconConfig.fit_overlap``). Chosen once per read from ``planned_length``
    (document + question + answer reserve), so a condensed document stays reusable for follow-up questions."""

    planned_length: int
    ratio: int
    condensed_windows: int
    window: int
    sink_size: int = 0
    overlap: int = 0

    @property
    def raw_from(self) -> int:
        return self.condensed_windows * self.window

    @property
    def condensed_entries(self) -> int:
        """KV entries the condensed windows leave: the sink and the beacons (0 when nothing is condensed)."""
        if self.condensed_windows == 0:
            return 0
        return min(self.sink_size, self.window) + self.condensed_windows * (self.window // self.ratio)

    def entries(self, n_tokens: int) -> int:
        """KV entries (= positions) in use once ``n_tokens`` tokens are read, past the condensed windows."""
        if self.condensed_windows == 0:
            return n_tokens
        overlap = self.overlap if n_tokens >= self.raw_from else 0  # read again once the condensed windows close
        return self.condensed_entries + overlap + max(n_tokens - self.raw_from, 0)

    def to_dict(self) -> dict[str, int]:
        out = {
            "planned_length": self.planned_length,
            "ratio": self.ratio,
            "condensed_windows": self.condensed_windows,
            "window": self.window,
            "sink_size": self.sink_size,
        }
        if self.overlap:
            out["overlap"] = self.overlap
        return out


def fit_plan(config: BeaconConfig, planned_length: int, max_positions: int, ratio: int | None = None) -> FitPlan:
    """``fit-N``: condense only what does not fit. A read of ``planned_length`` tokens that fits ``max_positions``
    is read raw (the plain model). A longer one condenses its oldest windows at the largest configured ratio (each
    condensed window frees the most positions, so the most recent text stays raw) and no more windows than needed.
    Raises ``ValueError`` with the numbers when even condensing every window does not fit. ``ratio`` overrides the
    condensing ratio (training draws one per sample)."""
    window, sink, overlap = config.window, config.sink_size, config.fit_overlap
    if planned_length <= max_positions:
        return FitPlan(planned_length, 0, 0, window, sink)
    ratio = max(config.ratios) if ratio is None else ratio
    capacity = fit_capacity(ratio, max_positions, window, sink, overlap)
    if ratio == 0 or planned_length > capacity:
        raise ValueError(
            f"the read is planned for {planned_length} tokens (prompt + answer reserve), beyond the capacity of "
            f"{capacity} tokens of ratio {ratio} with window {window} in {max_positions} positions; configure a "
            "larger ratio, or shorten the document, the question or the answer length"
        )
    freed = window - window // ratio  # positions one condensed window gives back
    windows = -(-(planned_length + min(sink, window) + overlap - max_positions) // freed)
    return FitPlan(planned_length, ratio, windows, window, sink, overlap)


def condensing_plan(config: BeaconConfig, length: int, windows: int, ratio: int) -> FitPlan:
    """A ``fit-N`` plan for ``length`` tokens with exactly its first ``windows`` windows condensed at ``ratio``
    (training and evaluating the memory at a chosen depth, whatever positions that leaves)."""
    if windows < 1 or ratio < 1 or windows * config.window >= length:
        raise ValueError(
            f"windows={windows} at ratio={ratio} must condense at least one window and leave raw tokens of the "
            f"{length}-token sample (window {config.window})"
        )
    return FitPlan(length, ratio, windows, config.window, config.sink_size, config.fit_overlap)


def planned_read_length(
    config: BeaconConfig, max_positions: int, prompt_tokens: int, answer_reserve: int, document_end: int | None
) -> int:
    """The length a read is planned for: the prompt plus its answer reserve (one position more than generation
    feeds, since its last token stays pending: room for the next turn). When ``fit-N`` must condense anyway,
    room for follow-up questions is kept too: at least N tokens after ``document_end`` (where the question starts),
    within the mode's capacity, so the condensed document can be reused for them."""
    total = prompt_tokens + answer_reserve
    if not config.is_fit or total <= max_positions:
        return total
    room = (document_end if document_end is not None else prompt_tokens) + config.adapt_extra
    return max(total, min(room, config_capacity(config, max_positions)))


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
    (``instance-random`` and ``adapt-X`` decide once; docs/design.md §2.1).
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
    r = adapt_ratio(config, max_positions, stream_total)
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
    every remaining token without beacons. Interleave: beacons are inserted in every step (docs/design.md §4).
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
