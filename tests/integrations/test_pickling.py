"""Objects users hold can be pickled and deep-copied (multiprocessing, Ray, joblib): locks are rebuilt, a lazily
loaded engine is reloaded on first use, and an explicit engine travels with the object and still answers."""

import copy
import pickle

import pytest

from beacon_llm import BeaconEngine
from beacon_llm.testing import tiny_beacon_model


def test_langchain_objects_pickle_and_deepcopy():
    pytest.importorskip("langchain_core")
    from langchain_beacon import BeaconLLM, ChatBeacon

    for cls in (ChatBeacon, BeaconLLM):
        lazy = cls(max_tokens=5)  # no weights loaded yet
        again = pickle.loads(pickle.dumps(lazy))
        assert again.max_tokens == 5 and again._engine is None
        copy.deepcopy(lazy)
    chat = ChatBeacon(engine=BeaconEngine(tiny_beacon_model()), max_tokens=4)
    expected = chat.invoke("Hello there").content
    clone = pickle.loads(pickle.dumps(chat))
    assert clone.invoke("Hello there").content == expected
    assert copy.deepcopy(chat).invoke("Hello there").content == expected


def test_llamaindex_llm_pickles_and_deepcopies():
    pytest.importorskip("llama_index.core")
    from llama_index.llms.beacon import BeaconLLM

    lazy = BeaconLLM(max_new_tokens=5)
    assert pickle.loads(pickle.dumps(lazy)).max_new_tokens == 5
    copy.deepcopy(lazy)
    llm = BeaconLLM(engine=BeaconEngine(tiny_beacon_model()), max_new_tokens=4)
    expected = llm.complete("Hello there").text
    assert pickle.loads(pickle.dumps(llm)).complete("Hello there").text == expected
    assert copy.deepcopy(llm).complete("Hello there").text == expected
