"""The read's native row kernels (``NativeKernels.rms_norm`` / ``silu_mul`` / ``rope``, used by
``beacon_llm.read_layers``): each against the stock bf16 operators (RoPE and the residual sum bit for bit, the norm
and SiLU within one bf16 rounding), chosen only for bf16 reads without gradient where the native kernels are
preferred, with non-stock modules running as themselves; a read with them within bf16 rounding of the stock one."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from beacon_llm import BeaconConfig, native_kernels, read_layers
from beacon_llm.attention import rope
from beacon_llm.testing import NATIVE_HEAD_SHAPES, tiny_beacon_model

REASON = native_kernels.unavailable()
needs_native = pytest.mark.skipif(REASON is not None, reason=f"native bf16 kernels: {REASON}")
CONDENSING = BeaconConfig(window=32, ratios=(4,), ratio_mix="fit-8")


def _kernels():
    return native_kernels.kernels()


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Each element equal, or one bf16 step apart at its magnitude (both roundings of nearly the same value)."""
    return native_kernels.within_one_bf16_step(got, want)


@needs_native
@pytest.mark.parametrize("rows,n", [(1, 576), (7, 40), (33, 128)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_the_norm_is_the_stock_rms_norm_within_one_rounding(rows, n, with_residual):
    g = torch.Generator().manual_seed(rows * n)
    norm = LlamaRMSNorm(n, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
    norm.to(torch.bfloat16)
    x = (3 * torch.randn(1, rows, n, generator=g)).bfloat16()
    residual = torch.randn(1, rows, n, generator=g).bfloat16() if with_residual else None
    with torch.no_grad():
        total, normed = _kernels().rms_norm(x, norm.weight, 1e-5, residual)
        want_total = x if residual is None else x + residual
        want = norm(want_total)
    assert torch.equal(total, want_total)
    assert _within_one_rounding(normed, want)
    assert (normed != want).float().mean() < 0.01  # a rounding boundary now and then, not a different formula


@needs_native
@pytest.mark.parametrize("shape", [(1, 5, 40), (1, 33, 1536)])
def test_silu_times_up_is_the_stock_mlp_activation_within_one_rounding(shape):
    g = torch.Generator().manual_seed(shape[1])
    gate = (4 * torch.randn(*shape, generator=g)).bfloat16()
    gate.view(-1)[:4] = torch.tensor([0.0, -100.0, 100.0, -0.0]).bfloat16()
    up = torch.randn(*shape, generator=g).bfloat16()
    got = _kernels().silu_mul(gate, up)
    want = torch.nn.functional.silu(gate) * up
    assert _within_one_rounding(got, want)
    assert (got != want).float().mean() < 0.01


@needs_native
def test_silu_keeps_a_nan():
    gate = torch.tensor([[float("nan"), 1.0]]).bfloat16()
    got = _kernels().silu_mul(gate, torch.ones_like(gate))
    assert torch.isnan(got[0, 0]) and got[0, 1] == torch.nn.functional.silu(gate[:, 1:]).item()


@needs_native
@pytest.mark.parametrize("d", [32, 64, 128])
def test_rope_is_the_stock_rope_bit_for_bit(d):
    g = torch.Generator().manual_seed(d)
    t_len, heads, kv = 37, 6, 2
    qkv = torch.randn(1, t_len, (heads + 2 * kv) * d, generator=g).bfloat16()  # one product's output, then split
    q = qkv[..., : heads * d].view(1, t_len, heads, d).transpose(1, 2)  # (1, H, T, D): strided rows
    k = torch.randn(1, kv, t_len, d, generator=g).bfloat16()  # (1, KVH, T, D) contiguous: the open window's keys
    cos, sin = (torch.randn(1, t_len, d, generator=g).bfloat16() for _ in range(2))
    for x in (q, k):
        got = _kernels().rope(x, cos, sin)
        assert got.shape == x.shape
        assert torch.equal(got, rope(x, cos, sin))


@needs_native
def test_the_row_kernels_refuse_what_they_do_not_compute():
    kernel = _kernels()
    w = torch.ones(8).bfloat16()
    with pytest.raises(ValueError, match="bf16 CPU tensors"):
        kernel.rms_norm(torch.ones(2, 8), w, 1e-5)  # float32
    with pytest.raises(ValueError, match="weight"):
        kernel.rms_norm(torch.ones(2, 8).bfloat16(), torch.ones(4).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="same shape"):
        kernel.silu_mul(torch.ones(2, 8).bfloat16(), torch.ones(2, 4).bfloat16())
    with pytest.raises(ValueError, match="no gradient"):
        kernel.silu_mul(torch.ones(2, 8).bfloat16().requires_grad_(), torch.ones(2, 8).bfloat16())
    with pytest.raises(ValueError, match="RoPE takes"):
        kernel.rope(torch.ones(1, 2, 3, 8).bfloat16(), torch.ones(1, 4, 8).bfloat16(), torch.ones(1, 4, 8).bfloat16())


def test_read_layers_only_for_bf16_reads_without_gradient_where_the_kernels_are_preferred(monkeypatch):
    bm = tiny_beacon_model(CONDENSING, max_position_embeddings=128, **NATIVE_HEAD_SHAPES["llama"])
    monkeypatch.setattr(native_kernels, "preferred", lambda: object())
    like = torch.empty(1, 4, 128)
    with torch.no_grad():
        assert read_layers.read_layers(bm.model, like) is None  # float32
        assert len(read_layers.read_layers(bm.model, like.bfloat16())) == len(bm.model.model.layers)
    assert read_layers.read_layers(bm.model, like.bfloat16()) is None  # gradients on: training
    monkeypatch.setattr(native_kernels, "preferred", lambda: None)
    with torch.no_grad():
        assert read_layers.read_layers(bm.model, like.bfloat16()) is None


class _Counted:
    def __init__(self, monkeypatch, name):
        self.n = 0
        original = getattr(native_kernels.NativeKernels, name)

        def counted(kernel, *args, **kwargs):
            self.n += 1
            return original(kernel, *args, **kwargs)

        monkeypatch.setattr(native_kernels.NativeKernels, name, counted)


def _read(bm, ids):
    with torch.no_grad():
        out = bm.forward(ids, bm.new_cache(), planned_length=len(ids) + 8)
    return out.token_logprobs, out.argmax_next, out.last_logits.float()


@needs_native
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("length", [300, 100])  # condensed windows then raw ones after the memory; a read that fits
def test_a_read_with_the_row_kernels_stays_within_bf16_rounding_of_the_modules(model_type, length, monkeypatch):
    bm = tiny_beacon_model(
        CONDENSING, model_type=model_type, max_position_embeddings=128, **NATIVE_HEAD_SHAPES[model_type]
    )
    bm.model.to(torch.bfloat16)
    monkeypatch.setattr(native_kernels, "preferred", native_kernels.kernels)
    ids = torch.randint(4, 100, (length,), generator=torch.Generator().manual_seed(length))
    norms, silu = _Counted(monkeypatch, "rms_norm"), _Counted(monkeypatch, "silu_mul")
    rows = _read(bm, ids)
    n_layers = len(bm.model.model.layers)
    assert norms.n >= 2 * n_layers and silu.n >= n_layers
    monkeypatch.setattr(read_layers, "read_layers", lambda model, like: None)
    monkeypatch.setattr("beacon_llm.model.read_layers", lambda model, like: None)
    norms.n = 0
    modules = _read(bm, ids)  # the same native attention, the layers' own modules around it
    assert norms.n == 0
    assert (rows[0] - modules[0]).abs().mean() <= 2.0**-7 * modules[0].abs().mean()
    assert (rows[1] == modules[1]).float().mean() >= 0.9
    assert (rows[2] - modules[2]).abs().max() <= 8 * 2.0**-7 * modules[2].abs().max()


@needs_native
def test_a_hooked_norm_or_mlp_runs_as_itself(monkeypatch):
    bm = tiny_beacon_model(CONDENSING, max_position_embeddings=128, **NATIVE_HEAD_SHAPES["llama"])
    bm.model.to(torch.bfloat16)
    monkeypatch.setattr(native_kernels, "preferred", native_kernels.kernels)
    seen = []
    layer = bm.model.model.layers[1]
    handles = [
        layer.post_attention_layernorm.register_forward_hook(lambda *a: seen.append("norm")),
        layer.mlp.register_forward_hook(lambda *a: seen.append("mlp")),
    ]
    _read(bm, torch.randint(4, 100, (300,), generator=torch.Generator().manual_seed(0)))
    for h in handles:
        h.remove()
    assert "norm" in seen and "mlp" in seen
