"""Pure RoPE position ids for the entries of the open window (paper v2 §2.2; docs/design.md §6).

Memory entries (sink, beacon memory) always sit at ``0 .. mem_len-1``. The open window's entries (cached raw /
pending beacon entries followed by this step's inputs) are placed after them. Raw tokens take consecutive positions;
beacons are placed according to the attention scheme.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import BeaconConfig


def window_positions(config: BeaconConfig, is_beacon: Sequence[bool], ratio: int, mem_len: int) -> torch.Tensor:
    """Position id of every entry of the open window.

    Args:
        is_beacon: flags of the window's entries in sequence order (cached entries first, then the step inputs).
        ratio: the window's compression ratio (raw tokens covered by one beacon).
        mem_len: number of memory entries before the window (sink + beacon memory).

    Returns:
        LongTensor (len(is_beacon),).
    """
    m = mem_len
    r = ratio
    v3 = config.era == "v3"
    sequential = v3 and config.attn == "full-coverage"  # plain positions over the (interleaved) sequence
    out: list[int] = []
    n_raw = 0
    n_beacon = 0
    for seq, beacon in enumerate(is_beacon):
        if not beacon:
            out.append(m + (seq if sequential else n_raw))
            n_raw += 1
            continue
        j = n_beacon  # 0-based beacon index within the window
        n_beacon += 1
        if sequential:
            out.append(m + seq)
        elif not v3:
            if config.attn == "step-expansion":
                out.append(m + (j + 1) * r)
            elif config.attn == "segmentation":
                out.append(m + r)
            else:  # v2 full-coverage
                out.append(m + config.window)
        elif config.attn == "step-expansion":
            if config.attend_prev:  # as if interleaved: right after its last covered token, shifted by earlier beacons
                out.append(m + (j + 1) * r - 1 + (j + 1))
            else:  # the position of the raw token that follows its span
                out.append(m + (j + 1) * r)
        else:  # v3 segmentation
            out.append(m + r + (j if config.attend_prev else 0))
    return torch.tensor(out, dtype=torch.long)
