"""Cache files cannot be half-written by concurrent writers, and an incomplete one is a clear ValueError."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import beacon_llm
from beacon_llm.testing import tiny_base_model, tiny_beacon_model


@pytest.fixture(scope="module")
def read_cache():
    bm = tiny_beacon_model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(list(range(4, 60)), cache)
    return bm, cache


def test_concurrent_writers_of_one_path_all_succeed(read_cache, tmp_path):
    bm, cache = read_cache
    path = str(tmp_path / "book.safetensors")
    errors = []

    def write():
        try:
            for _ in range(10):
                beacon_llm.save_cache(cache, path)
        except Exception as exc:  # noqa: BLE001 - the test collects any failure
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded, _ = beacon_llm.load_cache(path, bm)
    assert loaded.n_seen == cache.n_seen
    assert [p.name for p in tmp_path.iterdir()] == ["book.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("drop", [("state", "n_seen"), ("state",), ("num_layers",), ("generator",)])
def test_a_cache_file_with_missing_metadata_is_a_value_error(read_cache, tmp_path, drop):
    bm, cache = read_cache
    path = str(tmp_path / "c.safetensors")
    beacon_llm.save_cache(cache, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["beacon_cache"])
    target = meta
    for key in drop[:-1]:
        target = target[key]
    del target[drop[-1]]
    save_file(load_file(path), path, metadata={"beacon_cache": json.dumps(meta)})
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        beacon_llm.load_cache(path, bm)


def test_a_cache_from_other_beacon_weights_or_config_is_refused(read_cache, tmp_path):
    bm, cache = read_cache
    path = str(tmp_path / "book.safetensors")
    beacon_llm.save_cache(cache, path)
    other = tiny_beacon_model(seed=0, perturb=0.31)  # same shapes and dtype, other beacon weights
    with pytest.raises(ValueError, match="another model, beacon weights or beacon config"):
        beacon_llm.load_cache(path, other)
    with pytest.raises(ValueError, match="different model"), torch.no_grad():
        other.forward([5, 6, 7], cache.fork())  # in memory too
    same = tiny_beacon_model()
    restored, _ = beacon_llm.load_cache(path, same)  # the same weights from another object: accepted
    with torch.no_grad():
        assert torch.equal(
            same.forward([5, 6, 7], restored).token_logprobs, bm.forward([5, 6, 7], cache.fork()).token_logprobs
        )


def test_weights_digest_follows_in_place_training_steps():
    bm = tiny_beacon_model()
    before = bm.weights_digest()
    assert bm.weights_digest() == before == tiny_beacon_model().weights_digest()
    with torch.no_grad():
        next(p for n, p in bm.model.named_parameters() if "beacon_" in n).add_(1e-3)
    assert bm.weights_digest() != before
    cfg = tiny_beacon_model().config
    assert tiny_beacon_model(
        beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-8")
    ).weights_digest() != (tiny_beacon_model(cfg).weights_digest())


def test_concurrent_adapter_writers_all_succeed_and_readers_never_see_half_a_file(tmp_path):
    bm = tiny_beacon_model()
    folder = str(tmp_path / "adapter")
    beacon_llm.save_adapter(bm, folder)
    errors, read_errors = [], []
    done = threading.Event()

    def write():
        try:
            for _ in range(10):
                beacon_llm.save_adapter(bm, folder)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    def read():
        while not done.is_set():
            try:
                load_file(str(tmp_path / "adapter" / "beacon_model.safetensors"))
                json.loads((tmp_path / "adapter" / "beacon_config.json").read_text())
            except Exception as exc:  # a half-written file
                read_errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert not errors and not read_errors, (errors[:1], read_errors[:1])
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert names == ["beacon_config.json", "beacon_model.safetensors"]  # no temporary file left
    again = beacon_llm.load_adapter(tiny_base_model(), folder, bm.tokenizer)
    with torch.no_grad():
        assert torch.equal(again.forward([5, 6, 7]).token_logprobs, bm.forward([5, 6, 7]).token_logprobs)
