"""The read's native attention (``native_kernels.NativeKernels.read_attention`` in ``BeaconModel``): chosen for
bf16 inference reads with the ``sdpa`` implementation on CPUs where the native kernels are preferred, for shapes it
takes; never for training, float32, other implementations or memory gates. A condensed read (beacon windows, then
raw windows after the memory) and a read that fits give logits within bf16 rounding of the stock kernels'."""

import pytest
import torch

from beacon_llm import BeaconConfig, native_kernels
from beacon_llm.testing import NATIVE_HEAD_SHAPES, tiny_beacon_model

REASON = native_kernels.unavailable()
needs_native = pytest.mark.skipif(REASON is not None, reason=f"native bf16 kernels: {REASON}")

SHAPES = NATIVE_HEAD_SHAPES
CONDENSING = BeaconConfig(window=32, ratios=(4,), ratio_mix="fit-8")


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed))


class _Calls:
    """Counts the native read attention's calls (the kernel object is shared, so count on the class)."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = native_kernels.NativeKernels.read_attention

        def counted(kernel, *args, **kwargs):
            self.n += 1
            return original(kernel, *args, **kwargs)

        monkeypatch.setattr(native_kernels.NativeKernels, "read_attention", counted)


def _read(bm, ids, planned):
    """Every raw token's next-token argmax and log-probability, and the last logits, of one read."""
    with torch.no_grad():
        out = bm.forward(ids, bm.new_cache(), planned_length=planned)
    return out.token_logprobs, out.argmax_next, out.last_logits.float()


def _stock(monkeypatch):
    monkeypatch.setattr(native_kernels, "preferred", lambda: None)


@needs_native
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("length", [300, 100])  # condensed windows then raw ones after the memory; a read that fits
def test_a_bf16_read_with_the_native_attention_stays_within_bf16_rounding_of_the_stock_read(
    model_type, length, monkeypatch
):
    bm = tiny_beacon_model(CONDENSING, model_type=model_type, max_position_embeddings=128, **SHAPES[model_type])
    bm.model.to(torch.bfloat16)
    monkeypatch.setattr(native_kernels, "preferred", native_kernels.kernels)
    calls = _Calls(monkeypatch)
    ids = _ids(length, seed=length)
    native = _read(bm, ids, planned=length + 8)
    n_layers = len(bm.model.model.layers)
    assert calls.n >= n_layers * (2 if length > 128 else 1)  # every layer of the window steps and of the raw read
    calls.n = 0
    _stock(monkeypatch)
    stock = _read(bm, ids, planned=length + 8)
    assert calls.n == 0
    # bf16 rounding differences carried through the layers: log-probabilities within one bf16 step of their size on
    # average, most argmaxes equal (a wrong mask, head, position or key would move them by far more)
    assert (native[0] - stock[0]).abs().mean() <= 2.0**-7 * stock[0].abs().mean()
    assert (native[1] == stock[1]).float().mean() >= 0.9
    scale = stock[2].abs().max()
    assert (native[2] - stock[2]).abs().max() <= 8 * 2.0**-7 * scale


@needs_native
def test_the_read_attention_is_chosen_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(native_kernels, "preferred", native_kernels.kernels)
    bm = tiny_beacon_model(CONDENSING, max_position_embeddings=128, **SHAPES["llama"])
    like32 = torch.empty(1)
    like16 = like32.bfloat16()
    with torch.no_grad():
        assert bm._native_read(like32) is None  # float32: the stock kernel
        assert bm._native_read(like16) is native_kernels.kernels()
        monkeypatch.setattr(bm.model.config, "_attn_implementation", "eager")
        assert bm._native_read(like16) is None  # another implementation is kept as chosen
        monkeypatch.undo()
        monkeypatch.setattr(native_kernels, "preferred", lambda: None)
        assert bm._native_read(like16) is None  # a CPU where the stock kernels are preferred
        monkeypatch.setattr(native_kernels, "preferred", native_kernels.kernels)
    assert bm._native_read(like16) is None  # a gradient: the kernel has no backward
    small = tiny_beacon_model(CONDENSING, max_position_embeddings=128)  # head size 8
    gated = tiny_beacon_model(BeaconConfig(window=32, ratios=(4,), ratio_mix="fit-8", memory_gate=1.0),
                              max_position_embeddings=128, **SHAPES["llama"])  # fmt: skip
    with torch.no_grad():
        assert small._native_read(like16) is None
        assert gated._native_read(like16) is None


@needs_native
def test_training_reads_keep_the_stock_attention_and_their_graph(monkeypatch):
    monkeypatch.setattr(native_kernels, "preferred", native_kernels.kernels)
    bm = tiny_beacon_model(CONDENSING, max_position_embeddings=128, **SHAPES["llama"])
    bm.model.to(torch.bfloat16)
    bm.model.train()
    calls = _Calls(monkeypatch)
    out = bm.forward(_ids(200), bm.new_cache(), labels=_ids(200), planned_length=208)
    out.loss.backward()
    assert calls.n == 0
    assert bm.model.model.beacon_embed_tokens.weight.grad is not None
