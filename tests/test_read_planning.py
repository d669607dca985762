"""One plan per read: the engine plans a prompt from its whole length plus the answer reserve, also when it reads
the prompt in several calls (a cached-prefix boundary), for the official adapt-N mode as for fit-N."""

import pytest

from beacon_llm import BeaconConfig, BeaconEngine
from beacon_llm.testing import tiny_beacon_model


@pytest.mark.parametrize("mix", ["adapt-16", "fit-16"])
def test_a_prompt_under_capacity_read_in_two_calls_is_not_refused(mix):
    """adapt-N used to choose its ratio from the first call only (the short part before the boundary), so the rest
    of a prompt well under the stated capacity was refused."""
    engine = BeaconEngine(tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix=mix),
                                            max_position_embeddings=128))  # fmt: skip
    ids = [5 + i % 90 for i in range(engine.capacity - 40)]
    out = engine.complete(ids, boundary=20, max_new_tokens=8)
    assert out.usage.read_tokens == len(ids)
    assert out.finish_reason in ("length", "eos")


def test_the_answer_reserve_is_planned_before_reading():
    engine = BeaconEngine(tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-0"),
                                            max_position_embeddings=128))  # fmt: skip
    ids = [5] * (engine.capacity - 4)
    with pytest.raises(ValueError, match=r"the answer may take 8 more"):
        engine.complete(ids, max_new_tokens=8)
