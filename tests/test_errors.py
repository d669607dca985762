"""Bad input: each gets a clear error naming the value and the fix."""

import numpy as np
import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.testing import tiny_beacon_model


@pytest.fixture(scope="module")
def bm():
    return tiny_beacon_model()


@pytest.mark.parametrize(
    "bad,exc,message",
    [
        ("hello", TypeError, "must be a LongTensor or a list of ints, got str"),
        ([1.5, 2.0], TypeError, "list of ints"),
        ([True, False], TypeError, "list of ints"),
        (torch.tensor([1.0, 2.0]), TypeError, "integer token ids, got dtype torch.float32"),
        (np.array([1, 2]), TypeError, "got ndarray"),
        (torch.zeros(2, 5, dtype=torch.long), ValueError, "batch size 2 is not supported"),
        (torch.zeros(1, 1, 5, dtype=torch.long), ValueError, "must have shape"),
        ([], ValueError, "input_ids is empty"),
        (torch.empty(1, 0, dtype=torch.long), ValueError, "input_ids is empty"),
        ([5, 128], ValueError, r"token id 128 is outside the vocabulary \[0, 128\)"),
        ([-1, 5], ValueError, "token id -1 is outside the vocabulary"),
    ],
)
def test_bad_input_ids(bm, bad, exc, message):
    with pytest.raises(exc, match=message):
        bm.forward(bad)


def test_padding_is_refused(bm):
    with pytest.raises(ValueError, match="padding is not supported"):
        bm.forward(torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1]]))


def test_labels_must_match(bm):
    with pytest.raises(ValueError, match="labels has 2 entries but input_ids has 3"):
        bm.forward([5, 6, 7], labels=[5, 6])


def test_input_beyond_capacity_states_capacity_and_a_fitting_ratio():
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2,)))  # P=512: capacity (512-16)*2+16 = 1008
    cache = bm.new_cache()
    with pytest.raises(ValueError, match=r"1200 tokens.*ratio 2.*= 1008 tokens\. A ratio of 4 would fit"):
        bm.forward(torch.full((1200,), 5), cache)
    assert cache.n_seen == 0  # nothing was read
    adapt = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16"))
    with pytest.raises(ValueError, match=r"capacity of compression ratio 4.*A ratio of 8 would fit"):
        adapt.forward(torch.full((2500,), 5))


def test_generation_parameters_are_checked(bm):
    for kwargs, message in [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"do_sample": True, "temperature": 0.0}, "temperature=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            bm.generate([5, 6], **kwargs)
    with pytest.raises(ValueError, match="holds no context"):
        bm.generate(None, cache=bm.new_cache())


def test_flash_attention_needs_a_plain_causal_scheme():
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), pos="append", attn="step-expansion"))
    bm.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="cannot take the custom beacon mask of beacon_attn='step-expansion'"):
        bm.forward(torch.full((40,), 5))


def test_cache_from_another_model_is_refused():
    a = tiny_beacon_model()
    b = tiny_beacon_model(model_type="qwen2")
    cache = a.forward([5, 6, 7]).cache
    with pytest.raises(ValueError, match="different model"):
        b.forward([5], cache)
