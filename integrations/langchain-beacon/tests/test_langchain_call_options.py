"""ChatBeacon / BeaconLLM options: the LLM-cache key, stop strings and seeds, an engine given with loading options,
LangChain's own ``stream`` switch, per-prompt timeouts in a batch and async generation info."""

import asyncio
import time

import pytest

pytest.importorskip("langchain_core")

from langchain_beacon import BeaconLLM, ChatBeacon  # noqa: E402
from langchain_core.caches import InMemoryCache  # noqa: E402

from beacon_llm import BeaconEngine  # noqa: E402
from beacon_llm.testing import tiny_beacon_model  # noqa: E402

MESSAGES = [("human", "Tell me about the keeper.")]
NOT_IN_ANY_TEXT = "\u2603"  # not in the tiny tokenizer's vocabulary: never generated


@pytest.fixture(scope="module")
def engine():
    return BeaconEngine(tiny_beacon_model())


@pytest.fixture(scope="module")
def other_engine():
    return BeaconEngine(tiny_beacon_model(seed=4))


# ---------------------------------------------------------------- the LLM-cache key
KEY_CHANGES = [
    {"stop": ["<"]},
    {"seed": 2},
    {"top_p": 0.5},
    {"top_k": 1},
    {"repetition_penalty": 1.5},
    {"temperature": 1.0},
    {"max_tokens": 24},
]


@pytest.mark.parametrize("change", KEY_CHANGES, ids=lambda c: next(iter(c)))
@pytest.mark.parametrize("cls", [ChatBeacon, BeaconLLM])
def test_every_generation_field_is_in_the_cache_key(engine, cls, change):
    base = {"engine": engine, "max_tokens": 25, "temperature": 2.0, "seed": 1}
    params = cls(**base)._identifying_params
    assert params["model_name"] == cls(**base).model_name
    assert cls(**{**base, **change})._identifying_params != params


def test_the_engine_identity_is_in_the_cache_key(engine, other_engine):
    a, b = ChatBeacon(engine=engine), ChatBeacon(engine=other_engine)
    assert a._identifying_params["engine"] == engine.identity != other_engine.identity
    assert ChatBeacon(engine=engine.bm)._identifying_params["engine"] == engine.identity  # a model: the same weights
    assert a._identifying_params != b._identifying_params


CACHED_PAIRS = [
    ("stop", {"max_tokens": 25}, {"max_tokens": 25, "stop": ["<"]}),
    ("seed", {"max_tokens": 25, "temperature": 2.0, "seed": 1}, {"max_tokens": 25, "temperature": 2.0, "seed": 2}),
    ("top_k", {"max_tokens": 25, "temperature": 2.0, "seed": 1}, {"max_tokens": 25, "temperature": 2.0, "seed": 1,
                                                                   "top_k": 1}),
    ("another engine", {"max_tokens": 25}, {"max_tokens": 25, "engine": "other"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "first", "second"), CACHED_PAIRS, ids=[p[0] for p in CACHED_PAIRS])
def test_a_shared_llm_cache_never_returns_another_configurations_answer(engine, other_engine, name, first, second):
    def build(options, cache=None):
        options = {"engine": engine, **options}
        if options["engine"] == "other":
            options["engine"] = other_engine
        return ChatBeacon(**options, cache=cache)

    uncached = build(second).invoke(MESSAGES).content
    assert build(first).invoke(MESSAGES).content != uncached  # otherwise this test could not fail
    shared = InMemoryCache()
    build(first, shared).invoke(MESSAGES)
    assert build(second, shared).invoke(MESSAGES).content == uncached


# ---------------------------------------------------------------- stop strings and seeds
def test_a_stop_given_as_one_string_is_one_stop_string(engine):
    chat, llm = ChatBeacon(engine=engine, max_tokens=25), BeaconLLM(engine=engine, max_tokens=25)
    full, text = chat.invoke(MESSAGES).content, llm.invoke("Once upon")
    stop, llm_stop = full[0] + NOT_IN_ANY_TEXT, text[0] + NOT_IN_ANY_TEXT  # its first character is in the answer
    assert chat.invoke(MESSAGES, stop=stop).content == full
    assert ChatBeacon(engine=engine, max_tokens=25, stop=stop).invoke(MESSAGES).content == full
    assert llm.invoke("Once upon", stop=llm_stop) == text
    assert BeaconLLM(engine=engine, max_tokens=25, stop=llm_stop).stop == [llm_stop]
    cut = full[2:4]
    assert chat.invoke(MESSAGES, stop=cut).content == full[: full.find(cut)]
    assert chat._get_ls_params(stop=cut)["ls_stop"] == [cut]


BAD_SEEDS_AND_STOPS = [
    {"seed": "42"},
    {"seed": 1.5},
    {"seed": True},
    {"seed": 2**64},
    {"seed": -(2**63) - 1},
    {"stop": [123]},
    {"stop": [None]},
    {"stop": [""]},
    {"stop": ""},
]


@pytest.mark.parametrize("bad", BAD_SEEDS_AND_STOPS, ids=lambda b: "-".join(f"{k}={v!r}" for k, v in b.items()))
@pytest.mark.parametrize("cls", [ChatBeacon, BeaconLLM])
def test_bad_seeds_and_stops_raise_at_construction_and_per_call_before_reading(engine, monkeypatch, cls, bad):
    name, value = next(iter(bad.items()))
    message = "stop strings must be non-empty str" if name == "stop" else f"seed={value!r} must be an int"
    with pytest.raises(ValueError, match=message):
        cls(engine=engine, **bad)
    model = cls(engine=engine, max_tokens=3, temperature=0.7)
    monkeypatch.setattr(engine, "encode", lambda *a, **k: pytest.fail("tokenised before validating"))
    monkeypatch.setattr(engine, "encode_chat", lambda *a, **k: pytest.fail("tokenised before validating"))
    with pytest.raises(ValueError, match=message):
        model.invoke("hi", **bad)
    with pytest.raises(ValueError, match=message):
        asyncio.run(model.ainvoke("hi", **bad))


# ---------------------------------------------------------------- an engine with loading options
LOADING = [
    ("model", "HuggingFaceTB/SmolLM2-1.7B"),
    ("adapter", "/adapters/a"),
    ("beacon_overrides", {"beacon_ratio": [8]}),
    ("device", "meta"),
    ("dtype", "bfloat16"),
    ("cache_dir", "/tmp/unused"),
]


# cache_dir next to a BeaconModel is where the engine made around it persists (the next test)
@pytest.mark.parametrize(
    ("kind", "name", "value"),
    [
        (kind, *option)
        for kind in ("engine", "model")
        for option in LOADING
        if (kind, option[0]) != ("model", "cache_dir")
    ],
)
@pytest.mark.parametrize("cls", [ChatBeacon, BeaconLLM])
def test_loading_options_next_to_an_engine_are_refused(engine, cls, kind, name, value):
    given = engine if kind == "engine" else engine.bm
    with pytest.raises(ValueError, match=f"{name} cannot be set together with engine="):
        cls(engine=given, **{name: value})


def test_cache_dir_next_to_a_model_is_where_its_engine_persists(engine, tmp_path):
    chat = ChatBeacon(engine=engine.bm, cache_dir=str(tmp_path), max_tokens=2)
    chat.invoke([("system", "The keeper counted ships. " * 4), ("human", "Who?")])
    assert chat.get_engine().cache_dir == tmp_path and list(tmp_path.glob("*.safetensors"))


# ---------------------------------------------------------------- LangChain's own call keys
def test_langchains_stream_switch_is_not_a_generation_option(engine):
    chat = ChatBeacon(engine=engine, max_tokens=10)
    plain = chat.invoke(MESSAGES).content
    assert chat.invoke(MESSAGES, stream=True).content == plain
    assert chat.invoke(MESSAGES, stream=False).content == plain
    assert asyncio.run(chat.ainvoke(MESSAGES, stream=True)).content == plain


# ---------------------------------------------------------------- batches
def test_async_generate_reports_finish_reason_and_usage_as_sync_does(engine):
    llm = BeaconLLM(engine=engine, max_tokens=8)
    prompts = ["Once upon a time", "The keeper"]
    sync = llm.generate(prompts).generations
    both = asyncio.run(llm.agenerate(prompts)).generations
    assert [g[0].generation_info for g in both] == [g[0].generation_info for g in sync]
    assert [g[0].text for g in both] == [g[0].text for g in sync]
    assert all(g[0].generation_info["finish_reason"] == "length" for g in both)


@pytest.mark.parametrize("run", ["generate", "agenerate"])
def test_each_prompt_of_a_batch_starts_its_own_timeout_clock(engine, monkeypatch, run):
    calls = []
    stream = engine.stream

    def timed_stream(*args, **kwargs):
        calls.append({"started": kwargs["started"], "entered": time.monotonic()})
        yield from stream(*args, **kwargs)
        calls[-1]["ended"] = time.monotonic()

    monkeypatch.setattr(engine, "stream", timed_stream)
    llm = BeaconLLM(engine=engine, max_tokens=20, timeout=60)
    prompts = [f"Story {i}: the sea was grey." for i in range(3)]
    if run == "generate":
        llm.generate(prompts)
    else:
        asyncio.run(llm.agenerate(prompts))
    assert len(calls) == 3
    for before, after in zip(calls, calls[1:]):
        assert before["ended"] <= after["started"] <= after["entered"]
