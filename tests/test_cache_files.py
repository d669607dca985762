"""Cache files cannot be half-written by concurrent writers, and an incomplete one is a clear ValueError."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import beacon_llm
from beacon_llm.testing import tiny_beacon_model


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
