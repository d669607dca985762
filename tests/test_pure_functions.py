"""Table-driven tests of the pure schedule / position / mask functions."""

import numpy as np
import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.masks import window_visibility
from beacon_llm.positions import window_positions
from beacon_llm.schedule import (
    adaptive_ratio,
    interleave_slots,
    pick_ratio,
    plan_step,
    ratio_capacity,
    smallest_fitting_power_of_two,
)

V2 = dict(era="v2", pos="append", attn="step-expansion")


@pytest.mark.parametrize(
    "ratio,P,W,cap", [(0, 4096, 1024, 4096), (2, 4096, 1024, 7168), (128, 4096, 1024, 394240), (8, 256, 32, 1824)]
)
def test_ratio_capacity(ratio, P, W, cap):
    assert ratio_capacity(ratio, P, W) == cap


@pytest.mark.parametrize(
    "needed,expected", [(100, 0), (256, 0), (257, 2), (480, 2), (481, 4), (928, 4), (929, 8), (10**6, 8)]
)
def test_adaptive_ratio(needed, expected):
    assert adaptive_ratio((0, 2, 4, 8), needed, 256, 32) == expected


def test_smallest_fitting_power_of_two():
    assert smallest_fitting_power_of_two(65536, 8192, 1024) == 16
    assert smallest_fitting_power_of_two(100, 64, 64) is None


@pytest.mark.parametrize(
    "n,ratio,rem,flags,new_rem",
    [
        (4, 2, 0, "rrbrrb", 0),
        (3, 2, 0, "rrbr", 1),
        (3, 2, 1, "rbrrb", 0),
        (5, 4, 3, "rbrrrrb", 0),
        (6, 4, 3, "rbrrrrbr", 1),
        (2, 0, 0, "rr", 0),
    ],
)
def test_interleave_slots(n, ratio, rem, flags, new_rem):
    got, r = interleave_slots(n, ratio, rem)
    assert "".join("b" if f else "r" for f in got) == flags
    assert r == new_rem


@pytest.mark.parametrize(
    "cfg,raw_in_window,remaining,ratio,n_raw,n_beacons,completes,size",
    [
        (BeaconConfig(window=8, ratios=(4,), pos="append"), 0, 20, 4, 8, 2, True, 2),
        (BeaconConfig(window=8, ratios=(4,), pos="append"), 0, 5, 4, 5, 0, False, 0),
        (BeaconConfig(window=8, ratios=(4,), pos="append"), 5, 3, 4, 3, 2, True, 2),
        (BeaconConfig(window=8, ratios=(0,), pos="append"), 0, 8, 0, 8, 0, True, -1),
        (BeaconConfig(window=8, ratios=(4,)), 0, 5, 4, 5, 1, False, 1),
        (BeaconConfig(window=8, ratios=(4,)), 5, 10, 4, 3, 1, True, 1),
        (BeaconConfig(window=8, ratios=(0,)), 0, 3, 0, 3, 0, False, -1),
        (BeaconConfig(window=8, stride=4, ratios=(2,), **V2), 4, 4, 2, 4, 2, True, 2),
    ],
)
def test_plan_step(cfg, raw_in_window, remaining, ratio, n_raw, n_beacons, completes, size):
    rem = raw_in_window % ratio if (ratio and cfg.interleave) else 0
    plan = plan_step(cfg, raw_in_window=raw_in_window, remaining=remaining, ratio=ratio, remainder=rem)
    assert (plan.n_raw, plan.n_beacons, plan.completes_window, plan.trace_beacon_size) == (
        n_raw,
        n_beacons,
        completes,
        size,
    )


def test_pick_ratio_mixes():
    rng = np.random.default_rng(42)
    kw = dict(n_steps=0, n_windows=0, fixed=None, stream_total=0, max_positions=256, rng=rng)
    seq2 = BeaconConfig(window=32, ratios=(2, 4, 8), ratio_mix="sequence", **V2)
    assert [pick_ratio(seq2, **{**kw, "n_steps": k})[0] for k in range(5)] == [2, 4, 8, 8, 8]
    seq3 = BeaconConfig(window=32, ratios=(2, 4, 8), ratio_mix="sequence")
    assert [pick_ratio(seq3, **{**kw, "n_windows": k})[0] for k in range(5)] == [2, 4, 8, 2, 4]
    steprand = BeaconConfig(window=32, ratios=(2, 4, 8), ratio_mix="step-random")
    assert [pick_ratio(steprand, **kw)[0] for _ in range(5)] == [2, 8, 4, 4, 4]  # official default_rng(42) draws
    inst = BeaconConfig(window=32, ratios=(2, 4, 8), ratio_mix="instance-random")
    r, fixed = pick_ratio(inst, **kw)
    assert fixed == r and pick_ratio(inst, **{**kw, "fixed": fixed}) == (r, r)
    adapt = BeaconConfig(window=32, ratios=(0, 2, 4, 8), ratio_mix="adapt-100")
    assert pick_ratio(adapt, **{**kw, "stream_total": 600}) == (4, 4)


# docs/design.md §7.2 example: W=8, α=4, memory m1 m2 (M=2). 1 = may attend.
def _rows(mask):
    return ["".join("1" if x else "." for x in row.tolist()) for row in mask]


def test_mask_v2_step_expansion_spec_example():
    cfg = BeaconConfig(window=8, ratios=(4,), **V2)
    flags = [False] * 8 + [True] * 2
    rows = _rows(window_visibility(cfg, flags, 4, 10, 2))
    assert rows[0] == "11" + "1......." + ".."
    assert rows[3] == "11" + "1111...." + ".."
    assert rows[7] == "11" + "11111111" + ".."
    assert rows[8] == "11" + "1111...." + "1."
    assert rows[9] == "11" + "11111111" + ".1"
    assert window_positions(cfg, flags, 4, 2).tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 6, 10]
    noprev = BeaconConfig(window=8, ratios=(4,), attend_previous=False, **{**V2})
    assert _rows(window_visibility(noprev, flags, 4, 2, 2))[0][:2] == ".."


@pytest.mark.parametrize(
    "attn,b1,b2,pos",
    [
        ("segmentation", "1111....", "....1111", [6, 6]),
        ("full-coverage", "11111111", "11111111", [10, 10]),
    ],
)
def test_mask_v2_other_schemes(attn, b1, b2, pos):
    cfg = BeaconConfig(window=8, ratios=(4,), era="v2", pos="append", attn=attn)
    flags = [False] * 8 + [True] * 2
    rows = _rows(window_visibility(cfg, flags, 4, 2, 2))
    assert rows == ["11" + b1 + "1.", "11" + b2 + ".1"]
    assert window_positions(cfg, flags, 4, 2).tolist()[8:] == pos


def test_mask_v3_append_step_expansion_attend_prev():
    cfg = BeaconConfig(window=8, ratios=(4,), pos="append", attn="step-expansion", attend_prev=True)
    flags = [False] * 8 + [True] * 2
    rows = _rows(window_visibility(cfg, flags, 4, 2, 2))
    assert rows == ["11" + "1111...." + "1.", "11" + "11111111" + "11"]
    assert window_positions(cfg, flags, 4, 2).tolist()[8:] == [6, 11]


def test_mask_v3_interleave_full_coverage_is_plain_causal():
    cfg = BeaconConfig(window=8, ratios=(4,))
    flags = [False] * 4 + [True] + [False] * 4 + [True]
    mask = window_visibility(cfg, flags, 4, 10, 2)
    expected = torch.cat([torch.ones(10, 2, dtype=torch.bool), torch.ones(10, 10, dtype=torch.bool).tril()], 1)
    assert torch.equal(mask, expected)
    assert window_positions(cfg, flags, 4, 2).tolist() == list(range(2, 12))


def test_mask_v3_interleave_step_expansion_hides_window_beacons():
    """The intended behaviour of the official interleave + step-expansion branch (fixture d5 is the bug)."""
    cfg = BeaconConfig(window=8, ratios=(4,), attn="step-expansion", attend_prev=False)
    flags = [False] * 4 + [True] + [False] * 4 + [True]
    rows = _rows(window_visibility(cfg, flags, 4, 10, 2))
    assert rows[5] == "11" + "1111.1...."  # raw x5 does not see b1
    assert rows[9] == "11" + "1111.1111" + "1"  # b2 sees x1..x8 and itself, not b1
    # raw tokens keep consecutive positions; a beacon takes the position of the raw token after it
    assert window_positions(cfg, flags, 4, 2).tolist() == [2, 3, 4, 5, 6, 6, 7, 8, 9, 10]
