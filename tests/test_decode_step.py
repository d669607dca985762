"""The decode step (``beacon_llm.decode``) and the memory buffer it writes into (``beacon_llm.kv_arena``): appends in
place, forks that never see each other's tokens, a failed step that leaves the cache as it was, the fused bf16
kernels (oneDNN packed, native) against the plain ones, weights changed after the kernels were made, and
``dtype="auto"``."""

import copy
import pickle

import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig, _compat, native_kernels
from beacon_llm.decode import DecodeLinears, decode_products
from beacon_llm.kv_arena import KVArena, grown_capacity
from beacon_llm.serialization import resolve_dtype
from beacon_llm.testing import NATIVE_HEAD_SHAPES, tiny_beacon_model

FIT = BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-8")


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed))


def _model(**kw):
    return tiny_beacon_model(FIT, max_position_embeddings=kw.pop("positions", 128), **kw)


def _greedy(bm, cache, n):
    out = bm.generate(None, cache=cache, max_new_tokens=n, eos_token_id=[], return_dict_in_generate=True)
    return out.new_tokens


# ---------------------------------------------------------------------- capacity (pure)
@pytest.mark.parametrize(
    "needed,limit,expected",
    [
        (1, None, 256),
        (171, None, 256),  # 171 + 85 = 256
        (172, None, 512),
        (1000, None, 1536),
        (1000, 1200, 1200),  # capped at the positions
        (1300, 1200, 1300),  # never below what is needed
        (8192, 8192, 8192),
    ],
)
def test_grown_capacity(needed, limit, expected):
    assert grown_capacity(needed, limit) == expected


def test_grown_capacity_refuses_nothing_needed():
    with pytest.raises(ValueError, match="needed=0"):
        grown_capacity(0, None)


@pytest.mark.parametrize(
    "claims,expected",
    [
        ([(0, 4)], [True]),
        ([(0, 4), (4, 6)], [True, True]),
        ([(0, 4), (0, 2)], [True, False]),  # a second cache at 0: the first one already wrote past it
        ([(0, 4), (2, 6)], [True, False]),
        ([(0, 300)], [False]),  # beyond the capacity
    ],
)
def test_arena_claims(claims, expected):
    arena = KVArena.allocate(torch.zeros(1, 2, 1, 8), num_layers=2, needed=8)
    assert arena.capacity == 256
    assert [arena.claim(s, e) for s, e in claims] == expected


def test_arena_pickles_with_a_fresh_lock():
    arena = KVArena.allocate(torch.zeros(1, 2, 1, 8), num_layers=1, needed=3)
    arena.claim(0, 3)
    again = pickle.loads(pickle.dumps(arena))
    assert again.claimed == 3 and again.claim(3, 4)


# ---------------------------------------------------------------------- appends in place, copy on write
def test_decoding_appends_in_place_into_one_buffer():
    bm = _model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(40), cache, planned_length=80, return_token_logprobs=False)
        first = cache.mem_k[0]
        _greedy(bm, cache, 6)
    grown = cache.mem_k[0]
    assert grown.shape[2] == 40 + 5  # the last token stays pending
    assert grown.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # no copy of the memory
    assert torch.equal(grown[:, :, :40], first)


def test_forks_decode_independently_and_equal_one_cache_each():
    bm = _model()
    ctx = _ids(50, seed=2)
    with torch.no_grad():
        base = bm.new_cache()
        bm.forward(ctx, base, planned_length=90, return_token_logprobs=False)
        before = [k.clone() for k in base.mem_k]
        fork = base.fork()
        a = _greedy(bm, base, 8)  # extends the shared buffer in place
        b = _greedy(bm, fork, 8)  # must copy: the buffer was claimed past its end
        alone = bm.new_cache()
        bm.forward(ctx, alone, planned_length=90, return_token_logprobs=False)
        c = _greedy(bm, alone, 8)
        # interleaved steps on two forks of one cache
        x, y = alone.fork(), alone.fork()
        xs, ys = [], []
        for _ in range(4):
            xs += _greedy(bm, x, 2)
            ys += _greedy(bm, y, 2)
    assert a == b == c
    assert xs == ys
    assert all(torch.equal(k[:, :, :50], old) for k, old in zip(fork.mem_k, before))
    assert fork.mem_k[0].untyped_storage().data_ptr() != base.mem_k[0].untyped_storage().data_ptr()


def test_a_failed_step_leaves_the_cache_as_it_was(monkeypatch):
    bm = _model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(30), cache, planned_length=60, return_token_logprobs=False)
        ref = cache.fork()
        state = (cache.n_seen, cache.memory_length, [k.clone() for k in cache.mem_k])

        def boom(*args, **kwargs):
            raise RuntimeError("interrupted")

        monkeypatch.setattr(beacon_llm.model, "raw_token_step", boom)
        with pytest.raises(RuntimeError, match="interrupted"):
            bm.forward([7], cache)
        monkeypatch.undo()
        assert (cache.n_seen, cache.memory_length) == state[:2]
        assert all(torch.equal(k, old) for k, old in zip(cache.mem_k, state[2]))
        # and it goes on exactly like a cache that never failed
        assert torch.equal(bm.forward([7], cache).last_logits, bm.forward([7], ref).last_logits)


def test_a_saved_cache_continues_like_the_original(tmp_path):
    bm = _model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(40, seed=4), cache, planned_length=80, return_token_logprobs=False)
        _greedy(bm, cache, 3)
        beacon_llm.save_cache(cache, str(tmp_path / "c.safetensors"))
        loaded, _ = beacon_llm.load_cache(str(tmp_path / "c.safetensors"), bm)
        assert _greedy(bm, loaded, 6) == _greedy(bm, cache, 6)


def test_training_reads_keep_their_graph():
    """With gradients the memory goes to new tensors (autograd keeps what it read), never into the shared buffer."""
    bm = _model()
    bm.model.train()
    cache = bm.new_cache()
    out = bm.forward(_ids(60, seed=5), cache, labels=_ids(60, seed=5), planned_length=140)
    assert cache.mem_k[0].requires_grad
    bm.forward([9], cache, labels=[9]).loss  # one raw token after the memory, with a graph
    out.loss.backward()
    assert any(p.grad is not None for n, p in bm.model.named_parameters() if "beacon_" in n)


# ---------------------------------------------------------------------- kernels
needs_bf16 = pytest.mark.skipif(
    not (_compat.native_bf16_cpu() and _compat.packed_linear_available()),
    reason="packed bf16 kernels need a CPU with native bf16 (AVX512-BF16 / AMX) and oneDNN",
)
needs_native = pytest.mark.skipif(
    native_kernels.unavailable() is not None, reason=f"native bf16 kernel: {native_kernels.unavailable()}"
)


def _force_products(monkeypatch, bm, products):
    """Make the inference step's kernels again with ``products`` (the choice :func:`decode_products` would make)."""
    monkeypatch.setattr(beacon_llm.model, "decode_products", lambda model: products)
    bm.__dict__.pop("_decode_inference", None)


def _logits_of_a_decode(bm, n_context=40, n_tokens=12):
    cache = bm.new_cache()
    with torch.no_grad():
        logits = [
            bm.forward(_ids(n_context, seed=6), cache, planned_length=80, return_token_logprobs=False).last_logits
        ]
        for t in _ids(n_tokens, seed=7).tolist():
            logits.append(bm.forward([t], cache, return_token_logprobs=False).last_logits)
    return torch.stack(logits)  # (1 + n_tokens, V)


@needs_bf16
@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_bf16_step_matches_the_stock_bf16_layers(model_type, amx, monkeypatch):
    monkeypatch.setattr(_compat, "amx_cpu", lambda: amx)  # without AMX the step's attention folds the query heads
    bm = tiny_beacon_model(FIT, model_type=model_type, max_position_embeddings=128)
    bm.model.to(torch.bfloat16)
    assert decode_products(bm.model) in ("onednn", "native")
    _force_products(monkeypatch, bm, "onednn")
    packed = _logits_of_a_decode(bm)
    assert bm.__dict__["_decode_inference"].products == "onednn"
    assert bm.__dict__["_decode_inference"].fold_queries == (not amx)
    _force_products(monkeypatch, bm, "linear")
    plain = _logits_of_a_decode(bm)
    assert not bm.__dict__["_decode_inference"].packed
    assert torch.equal(packed, plain)  # fused packed products equal the separate ones, bit for bit


NATIVE_SHAPES = NATIVE_HEAD_SHAPES


def _within_bf16_steps(got, reference, steps):
    """Logits (T, V) within ``steps`` bf16 rounding steps of the reference's largest logit, most argmaxes equal."""
    scale = reference.abs().amax(-1, keepdim=True)  # (T, 1)
    return bool(((got - reference).abs() <= steps * 2.0**-7 * scale).all()) and bool(
        (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    )


@needs_native
@pytest.mark.parametrize("shape", ["default", "native"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_native_bf16_step_stays_within_bf16_rounding_of_the_stock_layers(model_type, shape, monkeypatch):
    overrides = NATIVE_SHAPES[model_type] if shape == "native" else {}
    bm = tiny_beacon_model(FIT, model_type=model_type, max_position_embeddings=128, **overrides)
    bm.model.to(torch.bfloat16)
    _force_products(monkeypatch, bm, "native")
    native = _logits_of_a_decode(bm)
    made = bm.__dict__["_decode_inference"]
    assert made.products == "native"
    assert (made.native_layers is not None) == (shape == "native")  # head size 8: native products only
    _force_products(monkeypatch, bm, "linear")
    plain = _logits_of_a_decode(bm)
    # the native kernels round some outputs differently from the stock ones in the last bf16 bit, which the layers
    # carry on: the logits stay within a few bf16 steps of the stock ones (a wrong product, bias, row block, RoPE,
    # norm, key written to the wrong row or softmax would move them by far more)
    assert _within_bf16_steps(native, plain, 4)


@needs_native
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_the_native_layer_equals_the_python_step_on_the_native_kernels(model_type, monkeypatch):
    """The one-call layer against the same layer run as separate operators with the native product and attention
    kernels: the same products and attention, so only the norm's sum order may differ."""
    bm = tiny_beacon_model(FIT, model_type=model_type, max_position_embeddings=128, **NATIVE_SHAPES[model_type])
    bm.model.to(torch.bfloat16)
    _force_products(monkeypatch, bm, "native")
    layered = _logits_of_a_decode(bm, n_context=40, n_tokens=20)
    assert bm.__dict__["_decode_inference"].native_layers is not None
    bm.__dict__["_decode_inference"].native_layers = None  # the same kernels, the layer as separate operators
    separate = _logits_of_a_decode(bm, n_context=40, n_tokens=20)
    assert bm.__dict__["_decode_inference"].native_attention is not None
    assert _within_bf16_steps(layered, separate, 2)
    assert (layered.argmax(-1) == separate.argmax(-1)).all()


def test_a_layer_that_is_not_stock_keeps_the_separate_operators(monkeypatch):
    if native_kernels.unavailable() is not None:
        pytest.skip(f"native bf16 kernels: {native_kernels.unavailable()}")
    bm = tiny_beacon_model(FIT, max_position_embeddings=128, **NATIVE_SHAPES["llama"])
    bm.model.to(torch.bfloat16)
    with torch.no_grad():
        assert DecodeLinears(bm.model, products="native").native_layers is not None
        norm = bm.model.model.layers[1].post_attention_layernorm
        norm.forward = lambda x: x  # replaced on the instance: not the stock norm
        assert DecodeLinears(bm.model, products="native").native_layers is None
        del norm.forward
        bm.model.model.layers[0].mlp.act_fn = torch.nn.GELU()
        assert DecodeLinears(bm.model, products="native").native_layers is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_the_steps_norm_kernel_equals_the_stock_norm_bit_for_bit(model_type, dtype):
    norm = tiny_beacon_model(model_type=model_type).model.model.layers[0].input_layernorm.to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.3 + 1)
    kernel = _compat.rms_norm_kernel(norm, torch.device("cpu"))
    assert kernel is not norm  # the fused call
    g = torch.Generator().manual_seed(2)
    for scale in (1e-3, 1.0, 40.0):
        x = (torch.randn(64, 1, norm.weight.numel(), generator=g) * scale).to(dtype)
        with torch.no_grad():
            assert all(torch.equal(kernel(row), norm(row)) for row in x)  # (1, Dm) rows, as the step calls it


def test_a_hooked_replaced_or_gpu_norm_runs_as_itself():
    norm = tiny_beacon_model().model.model.layers[0].input_layernorm
    assert _compat.rms_norm_kernel(norm, torch.device("cuda")) is norm
    kernel = _compat.rms_norm_kernel(norm, torch.device("cpu"))
    x = torch.randn(1, 1, norm.weight.numel())
    with torch.no_grad():
        before = kernel(x)
        assert torch.equal(before, norm(x))
        norm.register_forward_hook(lambda mod, args, out: out * 2)  # after the kernel was made: seen at the next call
        assert torch.equal(kernel(x), 2 * before)
    assert _compat.rms_norm_kernel(norm, torch.device("cpu")) is norm
    other = tiny_beacon_model().model.model.layers[0].input_layernorm
    other.forward = lambda x: x  # replaced on the instance
    assert _compat.rms_norm_kernel(other, torch.device("cpu")) is other


@pytest.mark.parametrize(
    "head_dim,position",
    [(8, 0), (16, 5), (64, 70), (64, 30000)],
)
def test_the_steps_rope_equals_the_stock_rotate_half_bit_for_bit(head_dim, position):
    from beacon_llm.attention import rope
    from beacon_llm.decode import _rotate, _rotation

    g = torch.Generator().manual_seed(head_dim + position)
    freqs = position / (10000.0 ** (torch.arange(0, head_dim, 2) / head_dim))
    emb = torch.cat([freqs, freqs])[None, None]  # (1, 1, D): Llama's cos/sin layout
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        x = torch.randn(1, 12, 1, head_dim, generator=g).to(dtype)
        assert torch.equal(_rotate(x, *_rotation(cos, sin)), rope(x, cos, sin))


@pytest.mark.parametrize(
    "products", ["linear", pytest.param("onednn", marks=needs_bf16), pytest.param("native", marks=needs_native)]
)
def test_kernels_follow_weights_changed_after_they_were_made(products, monkeypatch):
    bm = _model()
    if products != "linear":
        bm.model.to(torch.bfloat16)
        _force_products(monkeypatch, bm, products)
    ctx = _ids(30, seed=8)

    def step():
        cache = bm.new_cache()
        with torch.no_grad():
            bm.forward(ctx, cache, planned_length=60, return_token_logprobs=False)
            return bm.forward([11], cache, return_token_logprobs=False).last_logits

    before = step()
    with torch.no_grad():
        made = bm._decode_linears()
    assert made.products == products
    with torch.no_grad():
        bm.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # in place
    assert not made.matches(bm.model)
    changed = step()
    assert not torch.equal(before, changed)
    fresh = copy.deepcopy(bm)  # no kernels carried over: made from the changed weights
    assert "_decode_inference" not in fresh.__dict__
    assert torch.equal(changed, _step_of(fresh, ctx))
    with torch.no_grad():  # a replaced weight, too
        layer = bm.model.model.layers[1].self_attn
        layer.q_proj.weight = torch.nn.Parameter(layer.q_proj.weight.detach() * 0.5)
    assert not bm.__dict__["_decode_inference"].matches(bm.model)
    replaced = step()
    assert not torch.equal(replaced, changed)
    with torch.no_grad():  # and a replaced norm weight (the step's norm kernels hold their weight)
        norm = bm.model.model.layers[0].post_attention_layernorm
        norm.weight = torch.nn.Parameter(norm.weight.detach() * 1.5)
    assert not bm.__dict__["_decode_inference"].matches(bm.model)
    assert not torch.equal(step(), replaced)
    with torch.no_grad():  # and a weight whose storage was swapped under the same parameter (as model.to() does)
        bm._decode_linears()
        down = bm.model.model.layers[1].mlp.down_proj
        down.weight.data = down.weight.data * 2
    assert not bm.__dict__["_decode_inference"].matches(bm.model)


def _step_of(bm, ctx):
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ctx, cache, planned_length=60, return_token_logprobs=False)
        return bm.forward([11], cache, return_token_logprobs=False).last_logits


def test_only_bf16_cpu_models_with_plain_projections_get_fused_products(monkeypatch):
    bm = _model()
    assert decode_products(bm.model) == "linear"  # fp32
    assert not DecodeLinears(bm.model).packed
    bm.model.to(torch.bfloat16)
    monkeypatch.setattr(_compat, "native_bf16_cpu", lambda: False)
    assert decode_products(bm.model) == "linear"  # emulated bf16: no fused products
    monkeypatch.setattr(_compat, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(native_kernels, "kernels", lambda: None)  # no native kernel here: oneDNN where it fits
    if _compat.packed_linear_available():
        monkeypatch.setattr(beacon_llm.decode, "_available_memory", lambda: 10 * 2**30)
        assert decode_products(bm.model) == "onednn"
        monkeypatch.setattr(beacon_llm.decode, "_available_memory", lambda: 1000)  # the copy would not fit
        assert decode_products(bm.model) == "linear"
        monkeypatch.setattr(beacon_llm.decode, "_available_memory", lambda: 10 * 2**30)
    handle = bm.model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    assert decode_products(bm.model) == "linear"  # a hooked projection runs as itself
    handle.remove()


@pytest.mark.parametrize(
    "avx512_bf16,amx,built,expected",
    [
        (True, False, True, "native"),  # AVX512-BF16 without AMX (AMD Zen 4): the native kernel
        (True, True, True, "onednn"),  # AMX: oneDNN's packed product
        (True, False, False, "onednn"),  # the kernel did not build: oneDNN
        (False, True, True, "onednn"),  # AMX alone
    ],
)
def test_the_native_kernel_is_chosen_on_avx512_bf16_without_amx(avx512_bf16, amx, built, expected, monkeypatch):
    if not _compat.packed_linear_available():
        pytest.skip("oneDNN's packed kernels are not in this torch")
    bm = _model()
    bm.model.to(torch.bfloat16)
    monkeypatch.setattr(_compat, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(_compat, "avx512_bf16_cpu", lambda: avx512_bf16)
    monkeypatch.setattr(_compat, "amx_cpu", lambda: amx)
    monkeypatch.setattr(native_kernels, "kernels", lambda: object() if built else None)
    monkeypatch.setattr(beacon_llm.decode, "_available_memory", lambda: 10 * 2**30)
    assert decode_products(bm.model) == expected


def test_decode_linears_refuses_unknown_products():
    with pytest.raises(ValueError, match="products='fast'"):
        DecodeLinears(_model().model, products="fast")


# ---------------------------------------------------------------------- dtype="auto"
@pytest.mark.parametrize(
    "dtype,device,native,expected",
    [
        ("auto", None, True, torch.bfloat16),
        ("auto", "cpu", True, torch.bfloat16),
        ("auto", None, False, torch.float32),
        ("auto", "cuda", True, "auto"),  # a GPU: the checkpoint's own dtype
        ("float32", None, True, torch.float32),
        ("bfloat16", None, False, torch.bfloat16),
        (torch.float16, None, True, torch.float16),
        (None, None, True, None),
    ],
)
def test_resolve_dtype(dtype, device, native, expected, monkeypatch):
    monkeypatch.setattr(_compat, "native_bf16_cpu", lambda: native)
    assert resolve_dtype(dtype, device) == expected


def test_resolve_dtype_refuses_unknown_names():
    with pytest.raises(ValueError, match="'bf16' is not one of"):
        resolve_dtype("bf16")


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_load_defaults_to_auto(native, expected, monkeypatch, tmp_path):
    monkeypatch.setattr(_compat, "native_bf16_cpu", lambda: native)
    bm = tiny_beacon_model()
    base = tmp_path / "base"
    copy.deepcopy(bm).detach().save_pretrained(base)
    beacon_llm.save_adapter(bm, str(tmp_path / "adapter"))
    for dtype in (None, "auto"):
        loaded = beacon_llm.load(str(base), adapter=str(tmp_path / "adapter"), dtype=dtype, shared=False)
        assert loaded.dtype == expected
    assert beacon_llm.load(str(base), adapter=str(tmp_path / "adapter"), dtype="float32", shared=False).dtype == (
        torch.float32
    )


@needs_bf16
def test_packed_bf16_decoding_equals_transformers_bf16_generate_bit_for_bit(monkeypatch):
    bm = tiny_beacon_model(FIT, max_position_embeddings=128)
    bm.model.to(torch.bfloat16)
    _force_products(monkeypatch, bm, "onednn")
    ids = _ids(90, seed=9)
    hf = bm.model.generate(ids[None], max_new_tokens=16, do_sample=False, eos_token_id=127, output_logits=True,
                           return_dict_in_generate=True)  # fmt: skip
    tokens = hf.sequences[0, len(ids) :].tolist()
    cache = bm.new_cache()
    with torch.no_grad():
        ours = [bm.forward(ids, cache, planned_length=106, return_token_logprobs=False).last_logits]
        for t in tokens[:-1]:
            ours.append(bm.forward([t], cache, return_token_logprobs=False).last_logits)
    assert bm.__dict__["_decode_inference"].products == "onednn"
    assert all(torch.equal(a, b[0].float()) for a, b in zip(ours, hf.logits))


def test_each_decoded_token_checks_the_kernels_against_the_weights_once(monkeypatch):
    """The decode step and the last logits share one check of every weight per token (the check walks every
    projection, so doing it twice per token costs a measurable share of a small model's token)."""
    bm = _model()
    cache = bm.new_cache()
    bm(_ids(20)[None], cache=cache)
    with torch.no_grad():
        bm._decode_linears()  # the inference kernels, made once: later steps only check them
    checks, steps = [], []
    real_matches, real_forward = DecodeLinears.matches, type(bm)._forward
    monkeypatch.setattr(DecodeLinears, "matches", lambda self, model: checks.append(1) or real_matches(self, model))
    monkeypatch.setattr(type(bm), "_forward", lambda self, *a, **kw: steps.append(1) or real_forward(self, *a, **kw))
    assert len(_greedy(bm, cache, 6)) == 6
    assert len(steps) == 5  # the first token comes from the read's last logits, the last one stays pending
    assert len(checks) == len(steps)


def test_a_scored_read_leaves_only_its_last_logits_row_in_the_cache():
    """A read that scores its tokens computes logits in chunks of rows; the cache's last logits were a view of the
    whole last chunk (rows x vocabulary), which the cache and every fork kept alive."""
    bm = _model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(60), cache)  # scored (token log-probs)
    last = cache.last_logits
    assert last.untyped_storage().nbytes() == last.numel() * last.element_size()
