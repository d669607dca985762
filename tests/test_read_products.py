"""The read's fused, packed products (``beacon_llm.read_products``): bit for bit the stock layers' read (condensed
windows with beacon rows, the raw tail, a plain read that fits), made again after a weight changes, never with a
gradient, and only where the rule of ``read_products`` allows them."""

import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig, _compat, read_products
from beacon_llm.testing import tiny_beacon_model

pytestmark = pytest.mark.skipif(not _compat.packed_linear_available(), reason="oneDNN's packed kernels are not here")

CONFIGS = {
    "fit": BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-24"),
    "condensed": BeaconConfig(window=16, ratios=(4,)),
    "append": BeaconConfig(window=16, ratios=(2,), pos="append"),
}


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def allowed(monkeypatch):
    """The packed products allowed whatever this CPU (oneDNN computes bf16 without native support too)."""
    monkeypatch.setattr(_compat, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(beacon_llm.decode, "_available_memory", lambda: 10 * 2**30)


def _bf16_model(config, seed=0):
    bm = tiny_beacon_model(config, max_position_embeddings=256, seed=seed)
    bm.model.to(torch.bfloat16)
    return bm


def _read(bm, ids, *, products: bool, monkeypatch):
    monkeypatch.setattr(beacon_llm.model, "read_products", read_products.read_products if products else lambda m: False)
    bm.__dict__.pop("_read", None)
    with torch.no_grad():
        out = bm.forward(ids, return_hidden=True, planned_length=len(ids) + 8)
    return out, bm.__dict__.get("_read") is not None


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n", [12, 100, 300])
def test_the_read_equals_the_stock_layers_bit_for_bit(name, n, allowed, monkeypatch):
    bm = _bf16_model(CONFIGS[name])
    ids = _ids(n)
    stock, made = _read(bm, ids, products=False, monkeypatch=monkeypatch)
    assert not made
    fused, made = _read(bm, ids, products=True, monkeypatch=monkeypatch)
    # fit-N reads what fits its 256 positions in one call of the stock decoder (bit for bit by itself)
    assert made == (name != "fit" or n > 256)
    assert torch.equal(stock.hidden, fused.hidden)
    assert torch.equal(stock.token_logprobs, fused.token_logprobs)
    for a, b in zip(stock.cache.mem_k + stock.cache.mem_v, fused.cache.mem_k + fused.cache.mem_v):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_changed_weight_makes_them_again(allowed):
    bm = _bf16_model(CONFIGS["fit"])
    with torch.no_grad():
        first = bm._read_products()
        assert first is not None and bm._read_products() is first
        bm.model.model.layers[0].mlp.up_proj.weight.mul_(2)
        again = bm._read_products()
    assert again is not first
    with torch.no_grad():
        out = bm.forward(_ids(40), return_hidden=True)
    bm.__dict__.pop("_read")
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(beacon_llm.model, "read_products", lambda model: False)
        stock = bm.forward(_ids(40), return_hidden=True)
    assert torch.equal(out.hidden, stock.hidden)


def test_no_products_with_a_gradient_or_where_the_rule_says_no(allowed, monkeypatch):
    bm = _bf16_model(CONFIGS["fit"])
    assert bm._read_products() is None  # gradients on: training reads the modules
    with torch.no_grad():
        assert bm._read_products() is not None
    fp32 = tiny_beacon_model(CONFIGS["fit"], max_position_embeddings=256)
    assert not read_products.read_products(fp32.model)  # fp32 weights
    monkeypatch.setattr(beacon_llm.decode, "_available_memory", lambda: 1000)
    assert not read_products.read_products(bm.model)  # the packed copy would not fit
    monkeypatch.setattr(beacon_llm.decode, "_available_memory", lambda: 10 * 2**30)
    handle = bm.model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *a: None)
    assert not read_products.read_products(bm.model)  # a hooked projection runs as itself
    handle.remove()
    monkeypatch.setattr(_compat, "native_bf16_cpu", lambda: False)
    assert not read_products.read_products(bm.model)  # emulated bf16


def test_pickling_leaves_them_out(allowed):
    import pickle

    bm = _bf16_model(CONFIGS["fit"])
    with torch.no_grad():
        bm._read_products()
    assert "_read" not in pickle.loads(pickle.dumps(bm)).__dict__
