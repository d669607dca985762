"""A condensed prefix is reused only by the model that read it: base weights, beacon weights, dtype and reading
kernels are all part of its key, and a stored prefix must hold the new call's prompt and answer."""

import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig, native_kernels
from beacon_llm.engine import BeaconEngine
from beacon_llm.testing import tiny_beacon_model

DOC = "The quick brown fox jumps over the lazy dog. " * 17


def _base_parameter(bm: beacon_llm.BeaconModel) -> torch.nn.Parameter:
    return next(p for n, p in bm.model.named_parameters() if "beacon_" not in n and n.endswith("q_proj.weight"))


def test_base_weights_are_part_of_the_identity_and_fingerprint():
    bm = tiny_beacon_model()
    identity, fingerprint = bm.identity(), bm._fingerprint()
    assert tiny_beacon_model().identity() == identity  # the same weights: the same key
    with torch.no_grad():
        _base_parameter(bm).mul_(1.5)  # the base model retrained in place; beacon weights and config unchanged
    assert bm.identity() != identity
    assert bm._fingerprint() != fingerprint
    assert bm.weights_digest() == tiny_beacon_model().weights_digest()


def test_a_store_does_not_reuse_a_prefix_read_before_the_base_weights_changed(tmp_path):
    bm = tiny_beacon_model()
    in_memory, on_disk = BeaconEngine(bm), BeaconEngine(bm, cache_dir=tmp_path, max_prefixes=0)
    ids, boundary = in_memory.document_prompt(DOC, "What jumps?")
    for engine in (in_memory, on_disk):
        engine.read(ids, boundary=boundary)
        assert engine.read(ids, boundary=boundary)[1].cache_read_tokens > 0  # reused while nothing changed
    with torch.no_grad():
        _base_parameter(bm).mul_(1.5)  # the base model trained on in place
    fresh, _ = BeaconEngine(bm).read(ids, boundary=boundary)
    for engine in (in_memory, BeaconEngine(bm, cache_dir=tmp_path)):
        cache, usage = engine.read(ids, boundary=boundary)
        assert usage.cache_read_tokens == 0
        assert torch.equal(cache.last_logits, fresh.last_logits)


def test_a_saved_cache_is_refused_by_a_model_with_other_base_weights(tmp_path):
    bm, other = tiny_beacon_model(), tiny_beacon_model()
    with torch.no_grad():
        _base_parameter(other).add_(0.01)
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(list(range(4, 60)), cache)
    path = str(tmp_path / "c.safetensors")
    beacon_llm.save_cache(cache, path)
    beacon_llm.load_cache(path, bm)
    with pytest.raises(ValueError, match="another model"):
        beacon_llm.load_cache(path, other)


@pytest.mark.parametrize(
    ("implementation", "dtype", "native", "expected"),
    [
        ("sdpa", torch.float32, False, "sdpa"),
        ("sdpa", torch.float32, True, "sdpa"),  # the native kernels are bf16 only
        ("sdpa", torch.bfloat16, False, "sdpa"),
        ("sdpa", torch.bfloat16, True, "sdpa+native"),
        ("eager", torch.bfloat16, True, "eager"),
    ],
)
def test_reading_kernels_name_the_kernels_a_read_runs(monkeypatch, implementation, dtype, native, expected):
    bm = tiny_beacon_model(hidden_size=128)  # head_dim 32: a shape the native read attention takes
    bm.model.to(dtype)
    bm.model.config._attn_implementation = implementation
    monkeypatch.setattr(native_kernels, "preferred", lambda: object() if native else None)
    assert bm.reading_kernels() == expected
    identity = bm.identity()
    monkeypatch.setattr(native_kernels, "preferred", lambda: None if native else object())
    assert (bm.identity() == identity) == (expected == "eager" or dtype == torch.float32)


def test_an_adapt_prefix_whose_ratio_cannot_hold_a_longer_answer_is_read_again():
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16"))
    engine = BeaconEngine(bm)
    ids, boundary = engine.document_prompt(DOC, "What jumps?")
    engine.complete(ids, boundary=boundary, max_new_tokens=20)  # stores the document read at ratio 2
    assert {c.state.fixed_ratio for _, c in engine.stored_prefixes()} == {2}
    long = engine.complete(ids, boundary=boundary, max_new_tokens=300)  # ratio 2 cannot hold 300 more tokens
    fresh = BeaconEngine(bm).complete(ids, boundary=boundary, max_new_tokens=300)
    assert long.usage.cache_read_tokens == 0
    assert long.text == fresh.text


def test_an_adapt_prefix_that_holds_the_call_is_reused():
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16"))
    engine = BeaconEngine(bm)
    ids, boundary = engine.document_prompt(DOC, "What jumps?")
    engine.complete(ids, boundary=boundary, max_new_tokens=20)
    assert engine.complete(ids, boundary=boundary, max_new_tokens=20).usage.cache_read_tokens > 0
