"""The official sink behaviour when a window is kept raw (ratio 0): the sink takes the first s entries of the
window and the window's raw entries all move into the memory, so those s entries sit in the memory twice, as the
official code does (its memory is [sink, beacon memory, raw memory]; on completion at ratio 0 "all W raw entries go to
the beacon memory"; the sink is "the first s entries of that step")."""

import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.testing import tiny_beacon_model

W = 16


@pytest.mark.parametrize(
    "name,config",
    [
        ("v3 interleave (Qwen-2 code)", BeaconConfig(window=W, ratios=(0,), pos="interleave", sink_size=1)),
        (
            "v3 append (Mistral-style sink)",
            BeaconConfig(window=W, ratios=(0,), pos="append", sink_size=1, attn="full-coverage"),
        ),  # fmt: skip
        ("v3 interleave, sink 2", BeaconConfig(window=W, ratios=(0,), pos="interleave", sink_size=2)),
    ],
)
def test_a_raw_window_keeps_the_sink_entries_twice(name, config):
    bm = tiny_beacon_model(config)
    s = config.sink_size
    ids = list(range(4, 4 + W + 5))
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ids[:W], cache)  # exactly one window, read in one step and kept raw
    assert cache.memory_size() == {"sink": s, "beacon": W, "raw": 0, "total": s + W}
    for layer in range(bm.num_layers):
        v = cache.mem_v[layer]  # (B, KVH, s + W, D): [sink, the window's W raw entries]
        assert torch.equal(v[:, :, :s], v[:, :, s : 2 * s])  # the sink's entries are also the window's first ones
    # the next tokens attend to all s + W entries, at positions 0 .. s + W - 1
    with torch.no_grad():
        out = bm.forward(ids[W:], cache)
    assert out.cache.memory_length + out.cache.window_length == s + W + len(ids) - W
    # one call or several give the same: the sink is the first window's first entries either way (the official v3
    # code re-takes it from every call until the memory has an entry, a known bug this project does not copy)
    again = bm.new_cache()
    with torch.no_grad():
        bm.forward(ids[:5], again)
        bm.forward(ids[5:W], again)
        assert torch.allclose(bm.forward(ids[W:], again).token_logprobs, out.token_logprobs, atol=1e-5)


def test_with_ratio_above_zero_the_sink_is_not_duplicated():
    bm = tiny_beacon_model(BeaconConfig(window=W, ratios=(4,), pos="interleave", sink_size=1))
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(list(range(4, 4 + W)), cache)
    assert cache.memory_size() == {"sink": 1, "beacon": W // 4, "raw": 0, "total": 1 + W // 4}
