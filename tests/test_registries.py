"""The process-wide model and engine registries: loads outside a global lock, one load per key, a bound with LRU
eviction, and explicit unloading. A fake ``from_pretrained`` (tiny models, hooks per model name) replaces real
weights; every wait has a timeout so a regression fails instead of hanging."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import beacon_llm
from beacon_llm import loading
from beacon_llm.loading import _ENGINES
from beacon_llm.registry import Registry
from beacon_llm.testing import tiny_beacon_model

WAIT = 5.0  # seconds a test waits for another thread before it gives up (and fails)


class FakeLoader:
    """Stands for ``from_pretrained``: records the model folders' names, runs ``hooks[name]`` (which may block or
    raise) and returns a fresh tiny beacon model."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hooks: dict[str, Callable[[], Any]] = {}
        self.started: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, path: str, **kwargs: Any) -> beacon_llm.BeaconModel:
        name = os.path.basename(path)
        with self._lock:
            self.calls.append(name)
            self.started.setdefault(name, threading.Event()).set()
        hook = self.hooks.get(name)
        if hook is not None:
            hook()
        return tiny_beacon_model()

    def wait_started(self, name: str) -> bool:
        with self._lock:
            event = self.started.setdefault(name, threading.Event())
        return event.wait(WAIT)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLoader:
    monkeypatch.delenv("BEACON_LLM_MAX_MODELS", raising=False)
    monkeypatch.delenv("BEACON_LLM_MAX_ENGINES", raising=False)
    beacon_llm.unload()
    loader = FakeLoader()
    monkeypatch.setattr(loading, "from_pretrained", loader)
    yield loader
    beacon_llm.unload()


@pytest.fixture
def folder(tmp_path: Path) -> Callable[[str], str]:
    """A model folder named ``name`` (load() only checks that it exists)."""

    def make(name: str) -> str:
        (tmp_path / name).mkdir(exist_ok=True)
        return str(tmp_path / name)

    return make


def run_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run each call in its own thread; their results, or the exceptions they raised."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # handed to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT)
    assert not any(t.is_alive() for t in threads), "a caller is still blocked"
    return results


def wait_for_waiters(registry: Registry, n: int) -> None:
    """Block (at most WAIT) until ``n`` callers wait for a load in flight."""
    deadline = time.monotonic() + WAIT
    while registry.waiting() < n and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("via", ["load", "get_engine"])
def test_loads_of_different_models_run_at_the_same_time(fake, folder, via):
    get = beacon_llm.load if via == "load" else beacon_llm.get_engine
    b_started = threading.Event()
    seen: dict[str, bool] = {}

    def slow_a() -> None:  # a lock held while loading "a" would keep "b" from starting: this would time out
        seen["b started while a was loading"] = b_started.wait(WAIT)

    fake.hooks["a"] = slow_a
    fake.hooks["b"] = b_started.set
    a, b = folder("a"), folder("b")
    results: list[Any] = []
    thread_a = threading.Thread(target=lambda: results.append(get(a)), daemon=True)
    thread_a.start()
    assert fake.wait_started("a")
    assert not isinstance(run_threads([lambda: get(b)])[0], BaseException)
    thread_a.join(3 * WAIT)
    assert not thread_a.is_alive() and len(results) == 1
    assert seen == {"b started while a was loading": True}
    assert sorted(fake.calls) == ["a", "b"]


def test_concurrent_callers_for_one_model_share_one_load_or_its_error(fake, folder):
    n = 6
    a = folder("a")
    fake.hooks["a"] = lambda: wait_for_waiters(loading._LOADED, n - 1)  # returns once the others wait for it
    models = run_threads([lambda: beacon_llm.load(a)] * n)
    assert fake.calls == ["a"]
    assert isinstance(models[0], beacon_llm.BeaconModel) and all(m is models[0] for m in models)

    assert beacon_llm.unload() == 1
    error = OSError("the disk is on fire")

    def failing() -> None:
        wait_for_waiters(loading._LOADED, n - 1)
        raise error

    fake.hooks["a"] = failing
    errors = run_threads([lambda: beacon_llm.load(a)] * n)
    assert fake.calls == ["a", "a"]  # one load for all six, which all see its error
    assert all(e is error for e in errors)
    assert len(loading._LOADED) == 0  # a failed load is not kept...

    del fake.hooks["a"]
    bm = beacon_llm.load(a)  # ...so the next call tries again
    assert fake.calls == ["a", "a", "a"] and beacon_llm.load(a) is bm


def test_model_registry_is_bounded_and_drops_the_least_recently_used(fake, folder, monkeypatch):
    monkeypatch.setenv("BEACON_LLM_MAX_MODELS", "2")
    a, b, c = folder("a"), folder("b"), folder("c")
    bm_a, bm_b = beacon_llm.load(a), beacon_llm.load(b)
    assert beacon_llm.load(a) is bm_a  # "a" is now the most recently used
    bm_c = beacon_llm.load(c)  # evicts "b"
    assert [key[0] for key in loading._LOADED.keys()] == [a, c]
    assert beacon_llm.load(a) is bm_a and beacon_llm.load(c) is bm_c and fake.calls == ["a", "b", "c"]
    assert beacon_llm.load(b) is not bm_b and fake.calls == ["a", "b", "c", "b"]  # evicts "a"
    assert [key[0] for key in loading._LOADED.keys()] == [c, b]
    assert len(loading._LOADED) == 2
    assert bm_b.tokenizer is not None and bm_b.capacity > 0  # an evicted model a caller holds still works


def test_evicting_a_model_drops_the_registered_engines_over_it(fake, folder, monkeypatch):
    monkeypatch.setenv("BEACON_LLM_MAX_MODELS", "1")
    a, b = folder("a"), folder("b")
    engine_a = beacon_llm.get_engine(a)
    assert beacon_llm.get_engine(a) is engine_a
    engine_b = beacon_llm.get_engine(b)  # the model registry evicts a's model, so a's engine goes too
    assert _ENGINES.values() == [engine_b] and len(loading._LOADED) == 1
    assert engine_a.encode("abc") == engine_b.encode("abc")  # still usable by whoever holds it
    assert beacon_llm.get_engine(a) is not engine_a and fake.calls == ["a", "b", "a"]


def test_get_engine_reuses_an_engine_per_arguments_within_its_bound(fake, folder, monkeypatch, tmp_path):
    monkeypatch.setenv("BEACON_LLM_MAX_ENGINES", "2")
    a = folder("a")
    engine = beacon_llm.get_engine(a)
    assert beacon_llm.get_engine(a) is engine
    other = beacon_llm.get_engine(a, cache_dir=str(tmp_path / "c1"))
    assert other is not engine and other.bm is engine.bm and other.cache_dir == tmp_path / "c1"
    third = beacon_llm.get_engine(a, cache_dir=str(tmp_path / "c2"))  # evicts the least recently used: `engine`
    assert len(_ENGINES) == 2 and _ENGINES.values() == [other, third]
    again = beacon_llm.get_engine(a)
    assert again is not engine and again.bm is engine.bm  # a new engine over the model still registered
    assert fake.calls == ["a"]


def test_unload_drops_models_and_their_engines_and_frees_memory(fake, folder, monkeypatch, tmp_path):
    monkeypatch.setenv("BEACON_LLM_MAX_MODELS", "4")
    freed: list[str] = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: freed.append("gc") or collect(*args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append("cuda"))
    a, b = folder("a"), folder("b")
    bm_a = beacon_llm.load(a)
    engine_a = beacon_llm.get_engine(a)  # another model key: the engine loads with its inference overrides
    engine_a2 = beacon_llm.get_engine(a, cache_dir=str(tmp_path / "c"))
    bm_b = beacon_llm.load(b)
    engine_b = beacon_llm.get_engine(b)
    assert fake.calls == ["a", "a", "b", "b"]

    same_folder = os.path.join(folder("x"), "..", "a")  # spelled differently
    assert beacon_llm.unload(same_folder) == 4  # two models of "a", two engines over them
    assert freed == ["gc", "cuda"]
    assert loading._LOADED.values() == [bm_b, engine_b.bm] and _ENGINES.values() == [engine_b]
    assert engine_a.encode("abc") == engine_a2.encode("abc")  # callers' objects keep working
    assert beacon_llm.load(a) is not bm_a and fake.calls[-1] == "a"  # loads again

    assert beacon_llm.unload(engine_b.bm) == 2  # a model instance: it and the engine over it
    assert beacon_llm.unload("no/such-model") == 0
    assert beacon_llm.unload() == 2  # everything left: bm_b and the new "a"
    assert len(loading._LOADED) == 0 and len(_ENGINES) == 0
    assert beacon_llm.unload() == 0
    assert "unload" in beacon_llm.__all__


def test_registry_details(monkeypatch):
    evicted: list[list[str]] = []
    reg: Registry[str, str] = Registry("things", max_size=1, on_evict=evicted.append)
    assert reg.get("x", lambda: "X") == "X" and reg.get("x", lambda: "other") == "X"
    assert reg.get("y", lambda: "Y") == "Y" and reg.keys() == ["y"] and evicted == [["X"]]
    assert Registry("none", max_size=0).get("x", lambda: "X") == "X"  # 0 keeps nothing

    with pytest.raises(RuntimeError, match="recursive"):  # a load asking for itself fails instead of hanging
        reg.get("z", lambda: reg.get("z", lambda: "Z"))
    assert "z" not in reg and reg.get("z", lambda: "Z") == "Z"

    release = threading.Event()
    results = []
    thread = threading.Thread(target=lambda: results.append(reg.get("w", lambda: release.wait(WAIT) and "W")))
    thread.start()
    deadline = time.monotonic() + WAIT
    while not reg._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reg.discard() == ["Z"]  # also marks the load in flight as not to be kept
    release.set()
    thread.join(WAIT)
    assert results == ["W"] and len(reg) == 0

    env = Registry("models", env="BEACON_TEST_MAX", default=3)
    assert env.max_size == 3
    monkeypatch.setenv("BEACON_TEST_MAX", "many")
    with pytest.raises(ValueError, match="BEACON_TEST_MAX='many'"):
        env.get("x", lambda: "X")
    with pytest.raises(ValueError, match="max_size"):
        Registry("bad", max_size=-1)


def test_an_engine_whose_model_was_evicted_while_it_was_built_is_not_kept(fake, folder, monkeypatch):
    """The model registry drops the engines over a model it evicts, but an engine still being built is not
    registered yet: it used to be kept, with its model, beyond ``$BEACON_LLM_MAX_MODELS`` (always, with 0)."""
    monkeypatch.setenv("BEACON_LLM_MAX_MODELS", "0")
    engine = beacon_llm.get_engine(folder("a"))
    assert engine.encode("abc")  # the caller's engine works
    assert len(loading._LOADED) == 0 and len(_ENGINES) == 0
