"""Stop strings and seeds: one normalisation and one validation (before anything is read), special-token stops,
and the repetition penalty on the first answer token."""

import pytest
import torch

import beacon_llm.engine
from beacon_llm import BeaconEngine, check_sampling_options, normalize_stop
from beacon_llm.generation import Decoding, TokenSampler, special_stop_ids
from beacon_llm.testing import tiny_beacon_model, tiny_tokenizer

NOT_IN_ANY_TEXT = "\u2603"  # not in the tiny tokenizer's vocabulary: never generated


@pytest.fixture(scope="module")
def bm():
    return tiny_beacon_model()


# ------------------------------------------------------------------ pure functions
@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (None, []),
        ([], []),
        ("ab", ["ab"]),  # one string is one stop string, not its characters
        (["ab", "c"], ["ab", "c"]),
        (("x",), ["x"]),
        ("<|im_start|>", ["<|im_start|>"]),
    ],
)
def test_normalize_stop(stop, expected):
    assert normalize_stop(stop) == expected


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        ([123], "stop strings must be non-empty str, got 123 in stop=[123]"),
        ([None], "stop strings must be non-empty str, got None in stop=[None]"),
        (["a", ""], "stop strings must be non-empty str, got '' in stop=['a', '']"),
        ("", "stop strings must be non-empty str, got '' in stop=''"),
        (5, "stop=5 must be a str or a list of str, or None"),
        ({"a"}, "stop={'a'} must be a str or a list of str, or None"),
    ],
)
def test_normalize_stop_refuses_bad_entries(stop, message):
    with pytest.raises(ValueError) as info:
        normalize_stop(stop)
    assert str(info.value) == message


@pytest.mark.parametrize("seed", [None, 0, 42, -1, 2**64 - 1, -(2**63)])
def test_seeds_torch_takes_are_accepted(seed):
    check_sampling_options(seed=seed)
    if seed is not None:
        torch.Generator().manual_seed(seed)  # the range is torch's own


@pytest.mark.parametrize("seed", ["42", 1.5, True, 2**64, -(2**63) - 1])
def test_bad_seeds_are_refused_naming_the_value(seed):
    with pytest.raises(ValueError, match=rf"^seed={seed!r} must be an int in \[-2\*\*63, 2\*\*64 - 1\]"):
        check_sampling_options(seed=seed)


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (["<|im_start|>"], {1: "<|im_start|>"}),
        (["<|im_end|>", "ab"], {2: "<|im_end|>"}),
        (["<|im_start|>x"], {}),  # a special token and text: matched in the text only
        (["a", "<"], {}),
    ],
)
def test_special_stop_ids(stops, expected):
    assert special_stop_ids(tiny_tokenizer(), stops) == expected


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([], 0),  # nothing generated yet: token 0 is not penalised
        ([5], 0),
        ([0], 3),  # 5 / 2 < 4
    ],
)
def test_repetition_penalty_looks_at_the_history_only(history, expected):
    logits = torch.zeros(10)
    logits[0], logits[3] = 5.0, 4.0
    assert TokenSampler(repetition_penalty=2.0)(logits, history) == expected


# ------------------------------------------------------------------ decoding
class Scripted:
    """A sampler that returns the given tokens in turn (the model's logits are ignored)."""

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def __call__(self, logits, history):
        return self.tokens[len(history)]


@pytest.mark.parametrize("stream_text", [False, True])
def test_a_special_token_stop_ends_the_answer_on_that_token(bm, stream_text):
    tok = bm.tokenizer
    script = tok.encode("Hi", add_special_tokens=False) + [1] + tok.encode("there", add_special_tokens=False)
    cache = bm.new_cache()
    logits = bm.forward(tok.encode("Say hi.", add_special_tokens=False), cache).last_logits
    decoding = Decoding(bm, cache, logits, Scripted(script), 20, stops=["<|im_start|>"], tokenizer=tok,
                        stream_text=stream_text)  # fmt: skip
    deltas = list(decoding)
    assert (decoding.finish, decoding.text, decoding.tokens) == ("stop", "Hi", script[:3])
    assert "".join(deltas) == ("Hi" if stream_text else "")


def test_the_engine_stops_on_a_special_token_given_as_one_string(bm, monkeypatch):
    tok = bm.tokenizer
    script = tok.encode("Hi", add_special_tokens=False) + [1] + tok.encode("there", add_special_tokens=False)
    monkeypatch.setattr(beacon_llm.engine, "TokenSampler", lambda **kwargs: Scripted(script))
    engine = BeaconEngine(bm)
    ids = tok.encode("Say hi.", add_special_tokens=False)
    done = engine.complete(ids, max_new_tokens=20, stop="<|im_start|>")
    assert (done.finish_reason, done.text) == ("stop", "Hi")
    assert "".join(x for x in engine.stream(ids, max_new_tokens=20, stop="<|im_start|>") if isinstance(x, str)) == "Hi"


def test_a_stop_string_given_as_a_str_is_not_split_into_characters(bm):
    ids = bm.tokenizer.encode("Once upon a time", add_special_tokens=False)
    free = bm.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True)
    stop = free.text[0] + NOT_IN_ANY_TEXT  # its first character is in the text, the string is not
    out = bm.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=[], stop_strings=stop,
                      return_dict_in_generate=True)  # fmt: skip
    assert (out.finish_reason, out.text) == ("length", free.text)
    done = BeaconEngine(bm).complete(ids, max_new_tokens=12, stop=stop)
    assert done.text == BeaconEngine(bm).complete(ids, max_new_tokens=12).text
    assert done.finish_reason != "stop"


@pytest.mark.parametrize(
    "bad", [{"seed": "42"}, {"seed": 2**64}, {"seed": 1.5}, {"stop": [123]}, {"stop": [None]}, {"stop": [""]}]
)
def test_the_engine_refuses_a_bad_seed_or_stop_before_reading(bm, monkeypatch, bad):
    engine = BeaconEngine(bm)
    monkeypatch.setattr(engine, "_read", lambda *a, **k: pytest.fail("read before validating"))
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name}="):
        engine.complete([5, 6, 7], max_new_tokens=2, temperature=0.7, **bad)
    with pytest.raises(ValueError, match="stop strings must be non-empty str"):
        bm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, stop_strings=[""])


class ByteTable:
    """A byte-level tokenizer over a few ids: '"' and the UTF-8 bytes of 晨 (e6 99 a8) and 艾 (e8 89 be), so a
    character spans three tokens and a partial one decodes to U+FFFD."""

    table = {120: b"x", 34: b'"', 10: b"\xe6", 11: b"\x99", 12: b"\xa8", 13: b"\xe8", 14: b"\x89", 15: b"\xbe"}

    def decode(self, ids, skip_special_tokens=False):
        return b"".join(self.table[i] for i in ids).decode("utf-8", errors="replace")

    def encode(self, text, add_special_tokens=False):
        inverse = {v: k for k, v in self.table.items()}
        return [inverse[bytes([b])] for b in text.encode()]


@pytest.mark.parametrize("stops", [["晨艾"], ["晨艾", "x"]])
def test_streaming_sends_no_part_of_a_stop_string_behind_an_incomplete_character(bm, stops):
    script = [34, 10, 11, 12, 13, 14, 15, 34]  # '"', 晨, 艾, '"'
    cache = bm.new_cache()
    logits = bm.forward([5, 6, 7], cache).last_logits
    decoding = Decoding(bm, cache, logits, Scripted(script), 20, eos=set(), stops=stops, tokenizer=ByteTable(),
                        stream_text=True)  # fmt: skip
    deltas = list(decoding)
    assert (decoding.finish, decoding.text) == ("stop", '"')
    assert "".join(deltas) == '"'


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 1e-40}, "temperature=1e-40 must be a number >= 0"),
        ({"temperature": float("inf")}, "temperature=inf must be"),
        ({"temperature": float("nan")}, "temperature=nan must be"),
        ({"repetition_penalty": 1e-40}, "repetition_penalty=1e-40 must be > 0"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty=inf must be"),
    ],
)
def test_scales_that_overflow_the_logits_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        check_sampling_options(**options)


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 1e-5}, {"temperature": 30.0},
                                     {"repetition_penalty": 1e-5}, {"repetition_penalty": 1.2}])  # fmt: skip
def test_small_and_large_finite_scales_are_accepted(options):
    check_sampling_options(**options)


def test_the_smallest_temperature_samples_without_overflow():
    logits = torch.tensor([30.0, 29.0, -30.0])
    sampler = TokenSampler(do_sample=True, temperature=1e-5, generator=torch.Generator().manual_seed(0))
    assert sampler(logits, []) == 0
