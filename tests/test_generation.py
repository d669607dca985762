import numpy as np
import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.testing import tiny_beacon_model


@pytest.fixture(scope="module")
def bm():
    return tiny_beacon_model(BeaconConfig(window=16, ratios=(4,)))


def _ids(n, seed=0):
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(seed))


def test_greedy_equals_a_manual_one_token_loop(bm):
    prompt = _ids(45)
    out = bm.generate(prompt[None], max_new_tokens=12, eos_token_id=[])
    assert out.shape == (1, 45 + 12) and torch.equal(out[0, :45], prompt)
    cache = bm.new_cache()
    logits = bm.forward(prompt, cache).last_logits
    manual = []
    for _ in range(12):
        manual.append(int(logits.argmax()))
        logits = bm.forward([manual[-1]], cache).last_logits
    assert out[0, 45:].tolist() == manual


def test_transformers_style_call_with_tokenizer_inputs(bm):
    tok = bm.tokenizer
    inputs = tok("The whole book, read once.", return_tensors="pt")
    out = bm.generate(**inputs, max_new_tokens=5, eos_token_id=[])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_sampling_is_reproducible_with_a_generator_and_varies_without(bm):
    prompt = _ids(30, 1)
    kw = dict(
        max_new_tokens=10,
        do_sample=True,
        temperature=1.5,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.2,
        eos_token_id=[],
    )
    a = bm.generate(prompt, generator=torch.Generator().manual_seed(0), **kw)
    b = bm.generate(prompt, generator=torch.Generator().manual_seed(0), **kw)
    c = bm.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eos_stops_and_finish_reason(bm):
    prompt = _ids(30, 2)
    free = bm.generate(prompt, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True)
    stop_at = free.new_tokens[3]
    first = free.new_tokens.index(stop_at)
    res = bm.generate(prompt, max_new_tokens=8, eos_token_id=stop_at, return_dict_in_generate=True)
    assert res.finish_reason == "eos" and res.new_tokens == free.new_tokens[: first + 1]
    assert free.finish_reason == "length" and len(free.new_tokens) == 8


def test_stop_strings_cut_the_text(bm):
    prompt = _ids(30, 3)
    free = bm.generate(prompt, max_new_tokens=10, eos_token_id=[], return_dict_in_generate=True)
    stop = free.text[4:6]
    res = bm.generate(prompt, max_new_tokens=10, eos_token_id=[], stop_strings=[stop], return_dict_in_generate=True)
    assert res.finish_reason == "stop"
    assert res.text == free.text[: free.text.find(stop)]
    assert stop not in res.text


def test_streamer_receives_prompt_then_each_token(bm):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    prompt = _ids(20, 4)
    out = bm.generate(prompt, max_new_tokens=5, eos_token_id=[], streamer=rec)
    assert rec.puts[0] == prompt.tolist()
    assert [p[0] for p in rec.puts[1:]] == out[0, 20:].tolist()
    assert rec.ended


def test_conversation_continues_with_the_pending_token(bm):
    """Turn 2 on the kept cache == reading turn 1 + answer 1 + turn 2 in one go."""
    t1, t2 = _ids(25, 5), _ids(9, 6)
    cache = bm.new_cache()
    a1 = bm.generate(t1, cache=cache, max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True)
    assert cache.state.pending == [a1.new_tokens[-1]]
    a2 = bm.generate(t2, cache=cache, max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True)
    whole = torch.cat([t1, torch.tensor(a1.new_tokens), t2])
    ref = bm.generate(whole, max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True)
    assert a2.new_tokens == ref.new_tokens
    assert cache.n_seen == 25 + 6 + 9 + 5


def test_generate_without_input_feeds_the_pending_token(bm):
    prompt = _ids(30, 7)
    cache = bm.new_cache()
    first = bm.generate(prompt, cache=cache, max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True)
    more = bm.generate(None, cache=cache, max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True)
    ref = bm.generate(
        torch.cat([prompt, torch.tensor(first.new_tokens)]),
        max_new_tokens=4,
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    assert more.new_tokens == ref.new_tokens and cache.n_seen == 30 + 4 + 3


@pytest.mark.parametrize("stop", [None, ["e"], ["zz", " t"]])
def test_generate_and_the_engine_share_one_decode_loop(stop):
    """The same prompt, options and stop strings give the same tokens, text and finish reason through
    ``BeaconModel.generate`` and ``BeaconEngine.complete`` (both run :class:`beacon_llm.generation.Decoding`)."""
    from beacon_llm import BeaconEngine
    from beacon_llm.testing import tiny_beacon_model

    bm = tiny_beacon_model()
    ids = bm.tokenizer("Dorothy lived in Kansas with Uncle Henry and Aunt Em and her dog Toto. " * 3,
                       add_special_tokens=False)["input_ids"]  # fmt: skip
    out = bm.generate(torch.tensor([ids]), max_new_tokens=12, stop_strings=stop, return_dict_in_generate=True)
    done = BeaconEngine(tiny_beacon_model()).complete(ids, max_new_tokens=12, stop=stop)
    assert done.text == out.text and done.finish_reason == out.finish_reason
    expected = out.new_tokens[:-1] if out.finish_reason == "eos" else out.new_tokens
    assert done.token_ids == expected


@pytest.mark.parametrize(
    "eos, expected",
    [
        (2, {2}),
        ([], set()),
        ([2, 5], {2, 5}),
        ((7,), {7}),
        ({3, 4}, {3, 4}),
        (np.int64(2), {2}),
        ([np.int32(2), 9], {2, 9}),
        (np.array([4, 6]), {4, 6}),
        (torch.tensor(2), {2}),
        (torch.tensor([2, 3]), {2, 3}),
        (torch.tensor([], dtype=torch.long), set()),
        ("2", ValueError),
        (2.0, ValueError),
        ([2, 2.5], ValueError),
        (True, ValueError),
        (torch.tensor([[2, 3]]), ValueError),
        (torch.tensor(2.0), ValueError),
        (object(), ValueError),
    ],
)
def test_eos_ids(bm, eos, expected):
    from beacon_llm.generation import _eos_ids

    if expected is ValueError:
        with pytest.raises(ValueError, match=r"eos_token_id=.* must be a token id \(an int\), a list of them"):
            _eos_ids(bm, eos)
    else:
        assert _eos_ids(bm, eos) == expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eos_token_id": "2"}, "eos_token_id='2' must be a token id"),
        ({"eos_token_id": 2.5}, "eos_token_id=2.5 must be a token id"),
        ({"eos_token_id": [2, 2.5]}, r"eos_token_id=\[2, 2.5\] must be a token id"),
        ({"do_sample": True, "generator": 42}, "generator=42 must be a torch.Generator"),
        ({"generator": "seed"}, "generator='seed' must be a torch.Generator"),
    ],
)
def test_bad_eos_or_generator_is_refused_before_the_prompt_is_read(bm, options, message):
    """A refused call leaves the cache as it was, so a retry on it reads the prompt once."""
    prompt = _ids(30, 8)
    cache = bm.new_cache()
    with pytest.raises(ValueError, match=message):
        bm.generate(prompt, cache=cache, max_new_tokens=4, **options)
    assert cache.n_seen == 0 and not cache.state.pending
    retry = bm.generate(prompt, cache=cache, max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True)
    fresh = bm.generate(prompt, max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True)
    assert retry.new_tokens == fresh.new_tokens and cache.n_seen == 30 + 3


@pytest.mark.parametrize("wrap", [np.int64, torch.tensor, lambda t: torch.tensor([t])], ids=["np", "0-d", "1-d"])
def test_numpy_and_tensor_eos_stop_like_an_int(bm, wrap):
    prompt = _ids(30, 2)
    free = bm.generate(prompt, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True)
    stop_at = free.new_tokens[3]
    expected = bm.generate(prompt, max_new_tokens=8, eos_token_id=stop_at, return_dict_in_generate=True)
    res = bm.generate(prompt, max_new_tokens=8, eos_token_id=wrap(stop_at), return_dict_in_generate=True)
    assert res.finish_reason == expected.finish_reason == "eos" and res.new_tokens == expected.new_tokens
