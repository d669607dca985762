"""Pure attention-visibility rules for one step (paper v2 §2.2 Fig. 3, v3 §3.1; docs/design.md §7).

Keys are ``[memory (sink + beacon memory) ; open window (cached entries, then this step's inputs)]``; queries are
this step's inputs, i.e. the last ``n_query`` window entries. True = may attend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import BeaconConfig


def window_visibility(
    config: BeaconConfig, is_beacon: Sequence[bool], ratio: int, n_query: int, mem_len: int
) -> torch.Tensor:
    """Boolean mask (n_query, mem_len + len(is_beacon)).

    * raw query: all memory, earlier raw tokens of the window (causal); beacons of the window only in the v3
      full-coverage scheme (plain causal attention over the interleaved sequence).
    * beacon query j: memory unless era v2 with ``attend_previous=False``; raw window tokens by ``attn``
      (step-expansion: t < (j+1)·α, segmentation: j·α <= t < (j+1)·α, full-coverage: all before it); itself; earlier
      beacons of the window in v3 when full-coverage or ``attend_prev``.
    """
    flags = torch.tensor(list(is_beacon), dtype=torch.bool)  # (N,)
    n = flags.numel()
    seq = torch.arange(n)
    raw_idx = torch.cumsum((~flags).long(), 0) - 1  # (N,) window raw index t (valid at raw entries)
    bcn_idx = torch.cumsum(flags.long(), 0) - 1  # (N,) window beacon index j (valid at beacon entries)
    q = slice(n - n_query, n)
    q_beacon = flags[q][:, None]  # (Q, 1)
    k_beacon = flags[None, :]  # (1, N)
    causal = seq[None, :] <= seq[q][:, None]  # (Q, N)
    v3 = config.era == "v3"
    full = config.attn == "full-coverage"

    raw_row = causal & (~k_beacon | (v3 and full))
    j = bcn_idx[q][:, None]  # (Q, 1)
    t = raw_idx[None, :]  # (1, N)
    if full:
        cover = torch.ones_like(causal)
    elif config.attn == "step-expansion":
        cover = t < (j + 1) * ratio
    else:
        cover = (t >= j * ratio) & (t < (j + 1) * ratio)
    see_prev_beacons = v3 and (full or bool(config.attend_prev))
    kj = bcn_idx[None, :]
    beacon_to_beacon = (kj == j) | ((kj < j) if see_prev_beacons else torch.zeros_like(causal))
    beacon_row = causal & torch.where(k_beacon, beacon_to_beacon, cover)
    window = torch.where(q_beacon, beacon_row, raw_row)  # (Q, N)

    mem_visible = True if v3 else bool(config.attend_previous)
    memory = (~q_beacon | mem_visible).expand(n_query, mem_len)  # (Q, M)
    return torch.cat([memory, window], dim=1)
