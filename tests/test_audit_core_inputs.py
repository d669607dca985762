"""Audit of the core: RoPE-scaled position counts, ``planned_length`` checks, the plain path of ``disabled()``."""

import numpy as np
import pytest
import torch

from beacon_llm import _compat
from beacon_llm.config import BeaconConfig
from beacon_llm.testing import tiny_base_model, tiny_beacon_model, tiny_config

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed))


def test_llama3_rope_positions_are_max_position_embeddings_not_times_the_factor():
    """Llama 3.1 / 3.2 configs give the scaled length as max_position_embeddings (131072 = 8192 pretraining x 16
    headroom, factor 8 over original_max_position_embeddings): multiplying it by the factor again gave 8x
    positions the model never saw, so fit-N read raw far past them and adapt-N chose too small a ratio."""
    config = tiny_config("llama", max_position_embeddings=512, rope_parameters=dict(LLAMA3_ROPE))
    assert _compat.max_positions(config) == 512
    raw = {"max_position_embeddings": 131072, "rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}}
    assert _compat.max_positions_from_dict(raw) == 131072
    base = tiny_base_model("llama", max_position_embeddings=512, rope_parameters=dict(LLAMA3_ROPE))
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-0"), max_position_embeddings=512,
                           rope_parameters=dict(LLAMA3_ROPE))  # fmt: skip
    assert bm.max_positions == 512 and base.config.max_position_embeddings == 512
    with torch.no_grad():
        out = bm.forward(_ids(600), planned_length=608)
    assert out.cache.state.fit_plan.condensed_windows > 0  # 600 tokens do not fit 512 positions: condensed
    assert out.cache.memory_length <= 512


def test_yarn_and_linear_scaling_still_extend_the_positions():
    """YaRN with the pretraining length as max_position_embeddings (Qwen2.5 style), YaRN with an explicit original
    length (Yarn-Mistral style) and linear scaling keep extending the positions by the factor."""
    qwen = tiny_config("qwen2", max_position_embeddings=128, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    assert _compat.max_positions(qwen) == 512
    yarn = {"rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192}}
    assert _compat.max_positions_from_dict({"max_position_embeddings": 32768, **yarn}) == 131072
    linear = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert _compat.max_positions_from_dict(linear) == 16384
    assert _compat.max_positions_from_dict({"max_position_embeddings": 4096, "rope_scaling": None}) == 4096


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mix", ["adapt-0", "fit-0"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 100.5, 100.0, -1, True, "100"])
def test_planned_length_that_is_not_a_count_is_refused(mix, bad):
    """A float planned_length made a float fit plan, NaN a NaN plan read silently, and infinity under adapt-N
    never returned (the capacity message's search for a fitting power of two doubled forever)."""
    bm = tiny_beacon_model(BeaconConfig(window=8, ratios=(2, 4), ratio_mix=mix), max_position_embeddings=64)
    cache = bm.new_cache()
    with torch.no_grad(), pytest.raises(ValueError, match="planned_length"):
        bm.forward(_ids(20), cache, planned_length=bad)
    assert cache.n_seen == 0 and cache.state.fit_plan is None


@pytest.mark.parametrize("good", [100, np.int64(100), torch.tensor(100), 0, None])
def test_planned_length_integers_of_any_kind_are_read(good):
    bm = tiny_beacon_model(BeaconConfig(window=8, ratios=(2, 4), ratio_mix="fit-0"), max_position_embeddings=64)
    with torch.no_grad():
        out = bm.forward(_ids(20), planned_length=good)
    plan = out.cache.state.fit_plan
    assert type(plan.planned_length) is int and type(plan.condensed_windows) is int
    assert plan.planned_length == (100 if good else 20)


def test_disabled_refuses_empty_input_with_a_value_error():
    bm = tiny_beacon_model()
    with torch.no_grad(), bm.disabled(), pytest.raises(ValueError, match="empty"):
        bm.forward([])


def test_disabled_refuses_a_cache_whose_context_it_would_ignore():
    """Inside disabled() the plain model read input_ids alone and silently dropped the context the given cache held
    (the next-token logits were those of the two new tokens, not of the conversation)."""
    bm = tiny_beacon_model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(30), cache)
        with bm.disabled():
            with pytest.raises(ValueError, match="disabled"):
                bm.forward([5, 6], cache)
            fresh = bm.forward([5, 6], bm.new_cache())  # a fresh cache (or none) is the plain model, as before
    assert cache.n_seen == 30
    assert torch.equal(fresh.last_logits, bm.model(torch.tensor([[5, 6]])).logits[0, -1].float())
