"""The native bf16 kernels (``beacon_llm.native_kernels``). The product: every output within one bf16 rounding of the
exact product, row blocks read as one matrix, the same bits at any thread count and from concurrent threads. The
attention: within one bf16 rounding (plus float32's error) of the float64 attention, for any heads, group sizes, head
sizes, key counts and memory strides it takes, and torch's SDPA where it does not. Inputs refused with the reason, and
the reasons the kernels are not used."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from beacon_llm import native_kernels

REASON = native_kernels.unavailable()
needs_native = pytest.mark.skipif(REASON is not None, reason=f"native bf16 kernels: {REASON}")


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _exact(x, blocks):
    """float64 x @ cat(W).T + cat(b): (..., N)."""
    w = torch.cat([b[0] for b in blocks]).double()
    bias = torch.cat([b[1].double() if b[1] is not None else torch.zeros(len(b[0]), dtype=torch.float64)
                      for b in blocks])  # fmt: skip
    return x.double() @ w.T + bias


def _within_one_rounding(got, exact):
    return bool(((got.double() - exact).abs() <= exact.abs().clamp_min(1e-30) * 2.0**-7).all())


@needs_native
@pytest.mark.parametrize(
    "rows,k,bias",
    [
        ((1,), 1, False),
        ((3,), 31, True),  # fewer rows than a block, columns below one vector
        ((4,), 32, False),  # one block, one vector
        ((5,), 33, True),  # a leftover row and column
        ((13, 6), 75, True),  # two row blocks, the second with a bias
        ((576, 192, 192), 576, False),  # q, k, v of the embedded model
        ((1536, 1536), 576, False),  # gate, up
        ((576,), 1536, False),  # down
        ((960,), 576, True),  # a Qwen-2 style fused q/k/v with biases
    ],
)
def test_products_are_within_one_bf16_rounding_of_the_exact_product(rows, k, bias):
    blocks = [(_bf16(r, k, seed=i), _bf16(r, seed=10 + i) if bias and i == len(rows) - 1 else None)
              for i, r in enumerate(rows)]  # fmt: skip
    x = _bf16(1, 1, k, seed=99)
    got = native_kernels.kernels().linear(blocks)(x)
    assert got.shape == (1, 1, sum(rows)) and got.dtype == torch.bfloat16
    exact = _exact(x, blocks)
    assert _within_one_rounding(got, exact)
    rounded = exact.to(torch.float32).bfloat16()  # the exact product rounded once
    assert (got != rounded).float().mean() < 0.01  # most outputs are that rounding exactly


@needs_native
def test_several_input_rows_and_thread_counts_give_the_same_bits():
    blocks = [(_bf16(300, 96, seed=1), None), (_bf16(45, 96, seed=2), _bf16(45, seed=3))]
    product = native_kernels.kernels().linear(blocks)
    x = _bf16(3, 2, 96, seed=4)  # six input rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = product(x)
        torch.set_num_threads(2)
        two = product(x)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (3, 2, 345)
    assert torch.equal(one, two)
    assert all(torch.equal(one[i, j], product(x[i, j].clone())) for i in range(3) for j in range(2))
    with ThreadPoolExecutor(4) as pool:  # callers on several threads at once (LangChain batches, async queries)
        assert all(torch.equal(out, one) for out in pool.map(lambda _: product(x), range(16)))


@needs_native
def test_the_product_keeps_its_weights_after_the_module_lets_them_go():
    linear = torch.nn.Linear(64, 40, bias=False).to(torch.bfloat16)
    product = native_kernels.kernels().linear([(linear.weight, None)])
    x = _bf16(1, 64, seed=5)
    before = product(x)
    linear.weight.data = torch.zeros(40, 64, dtype=torch.bfloat16)  # the old storage is still held by the product
    del linear
    assert torch.equal(product(x), before)


@needs_native
def test_bad_inputs_are_refused_with_the_reason():
    kernel = native_kernels.kernels()
    product = kernel.linear([(_bf16(8, 16), None)])
    with pytest.raises(ValueError, match="bf16 CPU input with 16 features"):
        product(torch.zeros(1, 16))  # float32
    with pytest.raises(ValueError, match="16 features, got \\(1, 17\\)"):
        product(_bf16(1, 17))
    with pytest.raises(ValueError, match="2-D bf16 CPU weights with 16 columns"):
        kernel.linear([(_bf16(8, 16), None), (_bf16(8, 15), None)])
    with pytest.raises(ValueError, match="float32"):
        kernel.linear([(torch.zeros(8, 16), None)])


@needs_native
@pytest.mark.parametrize(
    "n_kv,g,d,m,capacity",
    [
        (1, 1, 32, 1, 1),  # one key
        (3, 3, 64, 5, 5),  # fewer keys than one vector of exponentials
        (3, 3, 64, 580, 1024),  # the embedded model after 512 tokens: two parts, inside a larger memory buffer
        (2, 4, 128, 1100, 1100),  # three parts, the last one short
        (1, 16, 256, 70, 80),  # the largest group and head size
        (3, 1, 64, 8100, 8192),  # one query per head (no grouping), 16 parts
        (1, 7, 64, 600, 600),  # seven queries per head: blocks of four and three
        (2, 3, 128, 700, 700),  # head size 128: blocks of two and one
        (2, 3, 32, 300, 300),  # head size 32: blocks of two and one
        (1, 5, 96, 200, 256),  # head size 96: the kernel's general value sum
    ],
)
def test_attention_is_within_one_bf16_rounding_of_the_exact_attention(n_kv, g, d, m, capacity):
    gen = torch.Generator().manual_seed(m)
    q = torch.randn(1, n_kv, g, d, generator=gen).bfloat16()
    arena = torch.randn(2, 1, n_kv, capacity, d, generator=gen).bfloat16()  # keys, values; rows past m unused
    keys, values = arena[0, ..., :m, :], arena[1, ..., :m, :]  # (1, KVH, M, D) views with the buffer's head stride
    scale = d**-0.5
    kernel = native_kernels.kernels()
    assert kernel.attention_fits(q, keys, values)
    got = kernel.attention(q, keys, values, scale)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert native_kernels.attention_close(got, q, keys, values, scale)
    # torch's SDPA rounds the probabilities to bf16 before the value sum, so it strays further from the exact value
    exact = torch.softmax(q.double() @ keys.double().transpose(-1, -2) * scale, -1) @ values.double()
    stock = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale)
    assert (got.double() - exact).abs().max() <= (stock.double() - exact).abs().max() + 1e-6


@needs_native
def test_attention_with_peaked_scores_stays_finite_and_exact():
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 3, 3, 64, generator=gen) * 8).bfloat16()
    keys = (torch.randn(1, 3, 900, 64, generator=gen) * 8).bfloat16()  # scores of several hundred
    values = torch.randn(1, 3, 900, 64, generator=gen).bfloat16()
    got = native_kernels.kernels().attention(q, keys, values, 0.125)
    assert torch.isfinite(got.float()).all()
    assert native_kernels.attention_close(got, q, keys, values, 0.125)


@needs_native
def test_attention_split_into_more_parts_than_keys_ignores_the_empty_ones():
    """Called with more key parts than the keys fill (empty parts), on scratch full of NaN: the result is still the
    attention (an empty part weighs nothing and its sums are written, not left as they were)."""
    import ctypes

    kernel = native_kernels.kernels()
    q, keys, values = _bf16(1, 2, 3, 64, seed=1), _bf16(1, 2, 5, 64, seed=2), _bf16(1, 2, 5, 64, seed=3)
    parts = 4  # 5 keys in parts of 2: the fourth part is empty
    work = torch.full((2 * 3 * 5 + 2 * parts * 3 * 66,), float("nan"))
    out = torch.empty_like(q)
    kernel._attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(1), 2, 3, 64, 5, parts,
                      ctypes.c_float(0.125), out.data_ptr(), work.data_ptr(), 1)  # fmt: skip
    assert torch.isfinite(out.float()).all()
    assert native_kernels.attention_close(out, q, keys, values, 0.125)


@needs_native
def test_attention_refuses_what_it_does_not_take():
    kernel = native_kernels.kernels()
    q, kv = _bf16(1, 3, 3, 64), _bf16(1, 3, 10, 64)
    cases = [
        (q.float(), kv, kv),  # float32
        (_bf16(1, 3, 3, 48), _bf16(1, 3, 10, 48), _bf16(1, 3, 10, 48)),  # head size not a multiple of 32
        (_bf16(1, 1, 17, 64), _bf16(1, 1, 10, 64), _bf16(1, 1, 10, 64)),  # more than 16 queries per head
        (q, _bf16(1, 3, 64, 10).transpose(-1, -2), kv),  # rows not contiguous
        (q, kv, _bf16(1, 3, 11, 64)),  # keys and values of different lengths
        (q.transpose(1, 2), kv, kv),  # query not contiguous
    ]
    for query, keys, values in cases:
        assert not kernel.attention_fits(query, keys, values)
        with pytest.raises(ValueError, match="use scaled_dot_product_attention"):
            kernel.attention(query, keys, values, 0.125)


def test_where_the_kernels_build_they_pass_their_self_check():
    """The kernel tests skip where the kernels are not used; a self-check that fails (a broken kernel) must not
    pass for that: here it is a failure."""
    reason = native_kernels.unavailable() or ""
    assert "self-check" not in reason, reason


def test_the_reasons_it_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv(native_kernels.SETTING_ENV, "0")
    assert native_kernels.unavailable() == f"{native_kernels.SETTING_ENV}=0"
    assert native_kernels.kernels() is None
    monkeypatch.delenv(native_kernels.SETTING_ENV)
    monkeypatch.setattr(native_kernels.platform, "machine", lambda: "aarch64")
    assert "x86-64" in native_kernels.unavailable()
    monkeypatch.undo()
    monkeypatch.setattr(native_kernels._compat, "avx512_bf16_cpu", lambda: False)
    assert native_kernels.unavailable() == "this CPU has no AVX512-BF16"


@pytest.mark.parametrize(
    "value,amx,used",
    [
        (None, False, True),
        (None, True, False),  # with AMX the stock kernels are the ones measured fast
        ("auto", True, False),
        ("1", True, True),  # asked for: used with AMX too
        (" On ", True, True),
        ("0", False, False),
        ("off", True, False),
    ],
)
def test_the_setting_decides_where_they_are_preferred(monkeypatch, value, amx, used):
    sentinel = object()
    monkeypatch.setattr(native_kernels, "kernels", lambda: None if native_kernels.env_choice() == "off" else sentinel)
    monkeypatch.setattr(native_kernels._compat, "avx512_bf16_cpu", lambda: True)
    monkeypatch.setattr(native_kernels._compat, "amx_cpu", lambda: amx)
    if value is None:
        monkeypatch.delenv(native_kernels.SETTING_ENV, raising=False)
    else:
        monkeypatch.setenv(native_kernels.SETTING_ENV, value)
    assert (native_kernels.preferred() is sentinel) is used


def test_a_setting_it_does_not_know_is_refused_with_the_ones_it_takes(monkeypatch):
    monkeypatch.setenv(native_kernels.SETTING_ENV, "fast")
    with pytest.raises(ValueError, match=r"BEACON_LLM_NATIVE_KERNELS='fast'.*use 0 .* 1 "):
        native_kernels.unavailable()
    monkeypatch.setattr(native_kernels._compat, "avx512_bf16_cpu", lambda: False)  # where they never run, too
    with pytest.raises(ValueError, match="fast"):
        native_kernels.preferred()


@needs_native
def test_without_a_compiler_it_says_so_and_builds_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path))  # a fresh kernel folder: nothing built yet
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    assert "no C compiler found" in native_kernels.unavailable()
    assert native_kernels.kernels() is None
    assert not any((tmp_path / "kernels").rglob("*.so"))


@needs_native
def test_a_build_is_reused_and_written_whole(monkeypatch, tmp_path):
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path))
    kernel = native_kernels.kernels()
    assert kernel is not None and kernel.path.is_relative_to(tmp_path / "kernels")
    assert [p.name for p in kernel.path.parent.iterdir()] == [kernel.path.name]  # no temporary file left
    native_kernels._load_or_reason.cache_clear()  # a new process: the built library is found, not rebuilt
    mtime = kernel.path.stat().st_mtime_ns
    assert native_kernels.kernels().path == kernel.path and kernel.path.stat().st_mtime_ns == mtime


def _read_case(n_heads, n_kv, t, m, d, seed):
    """query (1, H, T, D) as the layer makes it (a transposed (1, T, H, D) view), keys (1, KVH, M, D) as the first
    window makes them (a transposed (1, M, KVH, D) view), values a view into a longer buffer."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, n_heads, d, generator=gen).bfloat16().transpose(1, 2)
    keys = torch.randn(1, m, n_kv, d, generator=gen).bfloat16().transpose(1, 2)
    values = torch.randn(1, n_kv, m + 3, d, generator=gen).bfloat16()[:, :, 3:]  # other strides than the keys
    return q, keys, values


def _read_mask(kind, t, m, seed):
    """(T, M) bool, True = visible."""
    if kind == "none":
        return None
    if kind == "causal":  # the last T keys are the queries' own: bottom-right causal after M - T memory entries
        return torch.ones(t, m, dtype=torch.bool).tril(m - t)
    mask = torch.rand(t, m, generator=torch.Generator().manual_seed(seed)) < 0.5
    if kind == "random":
        mask[:, -1] = True
    return mask  # "blind": some rows see no key


@needs_native
@pytest.mark.parametrize(
    "n_heads,n_kv,t,m,d,kind",
    [
        (9, 3, 528, 1100, 64, "causal"),  # the embedded model: a beacon window after a memory, several key blocks
        (9, 3, 37, 100, 64, "random"),  # a key block and a half, rows past the last tile
        (9, 3, 37, 100, 64, "none"),
        (6, 2, 5, 1, 32, "none"),  # one key
        (4, 4, 70, 300, 128, "random"),  # no grouping, head size 128 (two value chunks of 64)
        (8, 2, 33, 65, 96, "causal"),  # head size 96: a value chunk of 64 and one of 32
        (2, 1, 3, 7, 256, "random"),  # the largest head size
        (3, 1, 1, 70, 64, "none"),  # one query token
    ],
)
def test_read_attention_is_within_one_bf16_rounding_of_the_exact_attention(n_heads, n_kv, t, m, d, kind):
    q, keys, values = _read_case(n_heads, n_kv, t, m, d, seed=m)
    mask = _read_mask(kind, t, m, seed=t)
    kernel = native_kernels.kernels()
    given = None if mask is None else mask[None, None]  # (1, 1, T, M)
    assert kernel.read_attention_fits(q, keys, values, given)
    got = kernel.read_attention(q, keys, values, given, d**-0.5)  # (1, T, H, D)
    assert got.shape == (1, t, n_heads, d) and got.dtype == torch.bfloat16
    seen = torch.ones(t, m, dtype=torch.bool) if mask is None else mask
    assert native_kernels.attention_close(got.transpose(1, 2), q, keys, values, d**-0.5, mask=seen)
    # as close to the exact attention as torch's SDPA, which also rounds the exponentials to bf16
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), keys.double(), values.double(), attn_mask=given, enable_gqa=True
    )
    stock = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=given, enable_gqa=True)
    assert (got.transpose(1, 2).double() - exact).abs().max() <= 1.5 * (stock.double() - exact).abs().max() + 1e-6


@needs_native
@pytest.mark.parametrize("t,m,with_mask", [(528, 1100, False), (37, 100, True), (100, 100, False), (1, 70, False)])
def test_read_attention_causal_sees_the_keys_up_to_its_own(t, m, with_mask):
    """``causal``: query t sees the keys up to M - T + t (a raw window after the memory), with or without a mask;
    the attention function takes ``is_causal`` for it."""
    q, keys, values = _read_case(9, 3, t, m, 64, seed=t)
    causal = torch.ones(t, m, dtype=torch.bool).tril(m - t)
    mask = _read_mask("random", t, m, seed=3) if with_mask else None
    seen = causal if mask is None else causal & mask
    given = None if mask is None else mask[None, None]
    kernel = native_kernels.kernels()
    got = kernel.read_attention(q, keys, values, given, 0.125, causal=True)
    rows = seen.any(1)
    assert native_kernels.attention_close(
        got.transpose(1, 2)[:, :, rows], q[:, :, rows], keys, values, 0.125, mask=seen[rows]
    )
    assert torch.equal(got, kernel.read_attention(q, keys, values, seen[None, None], 0.125))
    out, _ = kernel.attention_forward(None, q, keys, values, given, scaling=0.125, is_causal=True)
    assert torch.equal(out, got)
    # what the kernel does not take (float32) goes to SDPA with the causal part as a mask
    out32, _ = kernel.attention_forward(None, q.float(), keys.float(), values.float(), given, scaling=0.125,
                                        is_causal=True)  # fmt: skip
    stock, _ = native_kernels._compat.masked_gqa_sdpa(
        None, q.float(), keys.float(), values.float(), seen[None, None], scaling=0.125
    )
    assert torch.equal(out32, stock)


@needs_native
def test_read_attention_rows_that_see_no_key_read_zeros():
    q, keys, values = _read_case(4, 2, 20, 150, 64, seed=5)
    mask = _read_mask("blind", 20, 150, seed=1)
    mask[3] = False
    mask[7, :70] = False  # sees only the last key blocks
    got = native_kernels.kernels().read_attention(q, keys, values, mask[None, None], 0.125).transpose(1, 2)
    assert torch.equal(got[:, :, 3], torch.zeros_like(got[:, :, 3]))
    rows = mask.any(1)
    assert native_kernels.attention_close(got[:, :, rows], q[:, :, rows], keys, values, 0.125, mask=mask[rows])


@needs_native
def test_read_attention_with_scores_rising_over_the_keys_rescales_its_sums():
    """Each key block holds larger scores than the last (the online softmax's maximum changes at every block) and
    the scores reach several hundred: the result stays finite and exact."""
    q, keys, values = _read_case(3, 1, 9, 640, 64, seed=2)
    keys = (keys.float() * torch.linspace(0.1, 12, 640)[None, None, :, None]).bfloat16()
    q = (q.float() * 4).bfloat16()
    got = native_kernels.kernels().read_attention(q, keys, values, None, 0.125).transpose(1, 2)
    assert torch.isfinite(got.float()).all()
    assert native_kernels.attention_close(got, q, keys, values, 0.125, mask=torch.ones(9, 640, dtype=torch.bool))


@needs_native
def test_read_attention_gives_the_same_bits_at_any_thread_count_and_from_concurrent_callers():
    q, keys, values = _read_case(9, 3, 100, 700, 64, seed=9)
    mask = _read_mask("causal", 100, 700, seed=0)[None, None]
    kernel = native_kernels.kernels()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.read_attention(q, keys, values, mask, 0.125)
        torch.set_num_threads(2)
        two = kernel.read_attention(q, keys, values, mask, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    with ThreadPoolExecutor(4) as pool:
        assert all(
            torch.equal(out, one)
            for out in pool.map(lambda _: kernel.read_attention(q, keys, values, mask, 0.125), range(8))
        )


@needs_native
def test_read_attention_refuses_what_it_does_not_take_and_the_attention_function_hands_it_to_sdpa():
    kernel = native_kernels.kernels()
    q, kv = _bf16(1, 6, 5, 64), _bf16(1, 3, 10, 64)
    mask = torch.ones(1, 1, 5, 10, dtype=torch.bool)
    cases = [
        (q.float(), kv.float(), kv.float(), mask),  # float32
        (_bf16(1, 6, 5, 65), _bf16(1, 3, 10, 65), _bf16(1, 3, 10, 65), mask),  # a gate dimension (D + 1)
        (_bf16(1, 4, 5, 64), kv, kv, mask),  # query heads not a multiple of the key/value heads
        (q, kv, _bf16(1, 3, 11, 64), None),  # keys and values of different lengths
        (q, _bf16(1, 3, 64, 10).transpose(-1, -2), kv, mask),  # rows not contiguous
        (q, kv, kv, torch.zeros(1, 1, 5, 10)),  # an additive mask
        (q, kv, kv, mask[..., :9]),  # a mask of the wrong size
    ]
    for query, keys, values, m in cases:
        assert not kernel.read_attention_fits(query, keys, values, m)
        with pytest.raises(ValueError, match="use scaled_dot_product_attention"):
            kernel.read_attention(query, keys, values, m, 0.125)
        if keys.shape[2] == values.shape[2] and query.shape[1] % keys.shape[1] == 0 and m.shape[-1] == keys.shape[2]:
            out, _ = kernel.attention_forward(None, query, keys, values, m, scaling=0.125)
            stock, _ = native_kernels._compat.masked_gqa_sdpa(None, query, keys, values, m, scaling=0.125)
            assert torch.equal(out, stock)
    out, _ = kernel.attention_forward(None, q, kv, kv, mask, scaling=0.125)  # what it takes: (B, T, H, D)
    assert torch.equal(out, kernel.read_attention(q, kv, kv, mask, 0.125))


@needs_native
def test_nan_inputs_reach_the_output_as_with_torch():
    """A NaN in a query row or a visible key makes the rows that read it NaN (as torch's SDPA does), instead of
    being dropped as a tiny exponential or read as a row that sees nothing; the decode attention likewise."""
    kernel = native_kernels.kernels()
    q, keys, values = _read_case(4, 2, 9, 150, 64, seed=4)
    q, keys = q.clone(), keys.clone()
    q[0, 1, 3, 5] = float("nan")  # query head 1, token 3
    keys[0, 0, 100, 7] = float("nan")  # key 100 of key/value head 0 (query heads 0 and 1)
    mask = torch.ones(9, 150, dtype=torch.bool)
    mask[:4, 100] = False  # tokens 0-3 do not see the NaN key
    got = kernel.read_attention(q, keys, values, mask[None, None], 0.125).float()  # (1, T, H, D)
    nan_rows = got.isnan().any(-1)[0]  # (T, H)
    expected = torch.zeros(9, 4, dtype=torch.bool)
    expected[4:, :2] = True  # tokens that see key 100, in the two query heads that read its key/value head
    expected[3, 1] = True  # the NaN query row
    assert torch.equal(nan_rows, expected)
    dq, dk, dv = _bf16(1, 2, 3, 64, seed=1), _bf16(1, 2, 40, 64, seed=2).clone(), _bf16(1, 2, 40, 64, seed=3)
    dk[0, 1, 17, 0] = float("nan")
    decoded = kernel.attention(dq, dk, dv, 0.125).float()
    assert decoded[0, 1].isnan().all() and not decoded[0, 0].isnan().any()


@needs_native
def test_what_the_read_attention_does_not_take_goes_to_sdpa_with_the_causal_part():
    kernel = native_kernels.kernels()
    q, keys, values = _read_case(4, 2, 10, 4, 64, seed=6)  # more queries than keys: not a window after a memory
    assert not kernel.read_attention_fits(q, keys, values, None, causal=True)
    with pytest.raises(ValueError, match="at least T keys when causal"):
        kernel.read_attention(q, keys, values, None, 0.125, causal=True)
    causal = torch.ones(10, 4, dtype=torch.bool).tril(4 - 10)
    out, _ = kernel.attention_forward(None, q, keys, values, None, scaling=0.125, is_causal=True)
    stock, _ = native_kernels._compat.masked_gqa_sdpa(None, q, keys, values, causal[None, None], scaling=0.125)
    assert torch.equal(out, stock)
    q, keys, values = _read_case(4, 2, 5, 30, 64, seed=7)
    additive = torch.randn(1, 1, 5, 30).bfloat16()
    out, _ = kernel.attention_forward(None, q, keys, values, additive, scaling=0.125, is_causal=True)
    causal = torch.ones(5, 30, dtype=torch.bool).tril(30 - 5)
    stock, _ = native_kernels._compat.masked_gqa_sdpa(
        None, q, keys, values, additive.masked_fill(~causal, float("-inf")), scaling=0.125
    )
    assert torch.equal(out, stock)


@needs_native
def test_a_query_that_needs_a_gradient_goes_to_sdpa():
    kernel = native_kernels.kernels()
    q, keys, values = _read_case(4, 2, 5, 30, 64, seed=8)
    q = q.detach().requires_grad_()
    assert not kernel.read_attention_fits(q, keys, values, None)
    out, _ = kernel.attention_forward(None, q, keys, values, None, scaling=0.125)
    out.float().sum().backward()
    assert q.grad is not None
    with torch.no_grad():
        assert kernel.read_attention_fits(q, keys, values, None)  # no gradient to carry: the kernel
