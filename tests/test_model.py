"""Model behaviour against references: the plain transformers model, itself fed differently, the spec's formulas."""

import threading

import numpy as np
import pytest
import torch

from beacon_llm import BeaconConfig, BeaconModel
from beacon_llm.testing import tiny_base_model, tiny_beacon_model

V2 = dict(era="v2", pos="append", attn="step-expansion")
CONFIGS = {
    "v2-stepexp": BeaconConfig(window=16, ratios=(4,), **V2),
    "v2-stride8": BeaconConfig(window=16, stride=8, ratios=(2,), **V2),
    "v2-adapt-r0": BeaconConfig(window=16, ratios=(0, 2, 4), ratio_mix="adapt-16", **V2),
    "v2-segmentation-noprev": BeaconConfig(
        window=16, ratios=(2,), era="v2", pos="append", attn="segmentation", attend_previous=False
    ),
    "v3-interleave-adapt": BeaconConfig(window=16, ratios=(2, 4, 8), ratio_mix="adapt-16"),
    "v3-interleave-steprandom": BeaconConfig(window=16, ratios=(2, 4, 8), ratio_mix="step-random"),
    "v3-append-stepexp-sink": BeaconConfig(window=16, ratios=(4,), pos="append", attn="step-expansion", sink_size=2),
    "v3-append-segmentation": BeaconConfig(window=16, ratios=(4,), pos="append", attn="segmentation"),
    "v3-interleave-stepexp": BeaconConfig(window=16, ratios=(4,), attn="step-expansion", attend_prev=False),
}


def _ids(n, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g)


def test_disabled_and_detached_are_the_plain_model_bit_for_bit():
    ids = _ids(40)
    plain = tiny_base_model()(ids[None]).logits[0]
    bm = tiny_beacon_model()
    with torch.no_grad():
        with bm.disabled():
            off = bm.forward(ids, return_logits=True).logits
        on = bm.forward(ids, return_logits=True).logits
        assert torch.equal(off, plain.float())
        assert not torch.allclose(on, plain, atol=1e-3)  # beacons do change the output
        assert torch.equal(bm.model(ids[None]).logits[0], plain)  # the wrapped model is still the plain model
        base = bm.detach()
        assert not any("beacon" in n for n, _ in base.named_parameters())
        assert torch.equal(base(ids[None]).logits[0], plain)


@pytest.mark.parametrize("cfg", [CONFIGS["v2-stepexp"], BeaconConfig(window=16, ratios=(4,), pos="append")])
def test_input_shorter_than_a_window_equals_plain_model(cfg):
    ids = _ids(15, seed=3)
    plain = torch.log_softmax(tiny_base_model()(ids[None]).logits[0].float(), -1)
    bm = tiny_beacon_model(cfg)
    with torch.no_grad():
        out = bm.forward(ids, return_logits=True)
    torch.testing.assert_close(torch.log_softmax(out.logits, -1), plain, atol=1e-5, rtol=0)
    expected = plain[:-1].gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(out.token_logprobs, expected, atol=1e-5, rtol=0)
    assert out.cache.memory_size() == {"sink": 0, "beacon": 0, "raw": 15, "total": 15}


def test_interleave_step_expansion_raw_tokens_never_see_their_window_beacons():
    """The paper's intent for the scheme of fixture d5 (an official bug): raw tokens of the first window are
    predicted exactly as by the plain model, while the beacons still condense the window."""
    ids = _ids(40, seed=5)
    plain = torch.log_softmax(tiny_base_model()(ids[None]).logits[0].float(), -1)
    bm = tiny_beacon_model(CONFIGS["v3-interleave-stepexp"])
    with torch.no_grad():
        out = bm.forward(ids, return_logits=True)
    # float32: log-probs reach ~50 in size, so a relative tolerance of a few ulps
    torch.testing.assert_close(torch.log_softmax(out.logits[:16], -1), plain[:16], atol=1e-5, rtol=5e-6)
    assert not torch.allclose(torch.log_softmax(out.logits[16:], -1), plain[16:], atol=1e-2)
    assert out.cache.memory_size()["beacon"] == 8  # 2 full windows x 16/4
    assert out.cache.kv_by_kind()["condensed"] == 8 + 2  # and the open window's 2 interleaved beacons


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_long_call_equals_several_calls(name):
    """Adaptive mixes choose their ratio from the planned length: with only 64 positions a 150-token read needs more
    compression than its first 7-token call suggests, so the calls are given the planned length (as the engine does)
    and the test would fail if a call chose from its own length (checked below)."""
    cfg = CONFIGS[name]
    ids = _ids(150, seed=1)
    adaptive = cfg.ratio_mix.startswith("adapt")
    bm = tiny_beacon_model(cfg, max_position_embeddings=64) if adaptive else tiny_beacon_model(cfg)
    plan = {"planned_length": 150} if adaptive else {}
    with torch.no_grad():
        whole = bm.forward(ids, bm.new_cache(generator=np.random.default_rng(7)), **plan)
        cache = bm.new_cache(generator=np.random.default_rng(7))
        if adaptive:  # without the planned length the first call would fix a ratio too small for the whole read
            naive = bm.new_cache(generator=np.random.default_rng(7))
            bm.forward(ids[:20], naive)  # a first call that completes a window fixes the ratio
            with pytest.raises(ValueError, match="positions|capacity"):
                bm.forward(ids[20:], naive)
        pieces, prev_last, start = [], None, 0
        for size in (7, 20, 1, 1, 33, 16, 2, 70):
            chunk = ids[start : start + size]
            out = bm.forward(chunk, cache, **plan)
            if prev_last is not None:  # the first token of a chunk is predicted by the previous chunk's last logits
                pieces.append(torch.log_softmax(prev_last, -1)[chunk[0]].reshape(1).cpu())
            pieces.append(out.token_logprobs)
            prev_last = out.last_logits
            start += size
    assert start == 150
    torch.testing.assert_close(torch.cat(pieces), whole.token_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prev_last, whole.last_logits, atol=1e-5, rtol=0)
    assert cache.memory_size() == whole.cache.memory_size()
    assert cache.window_sizes == whole.cache.window_sizes


@pytest.mark.parametrize("pos,raw", [("append", 100), ("interleave", 103)])
def test_64k_tokens_keep_the_cache_at_the_spec_size(pos, raw):
    """docs/design.md §3.1: memory = sink + sum_j W/α_j beacon KVs + the open window (raw, plus pending beacons)."""
    window, ratio, n = 256, 32, 65536 + 100
    cfg = BeaconConfig(window=window, ratios=(ratio,), pos=pos, attn="full-coverage", sink_size=1)
    bm = tiny_beacon_model(cfg, max_position_embeddings=4096)
    with torch.no_grad():
        out = bm.forward(_ids(n, seed=2), return_token_logprobs=False)
    full_windows = n // window
    assert full_windows == 256
    assert out.cache.memory_size() == {
        "sink": 1,
        "beacon": full_windows * window // ratio,
        "raw": raw,
        "total": 1 + 2048 + raw,
    }
    assert out.cache.mem_k[0].shape[2] == 1 + 2048
    assert out.cache.n_seen == n


def test_fork_branches_are_independent_and_equal_to_fresh_reads():
    bm = tiny_beacon_model()
    book, q1, q2 = _ids(90, 1), _ids(5, 2), _ids(7, 3)
    with torch.no_grad():
        base = bm.forward(book).cache
        before = base.memory_size(), base.n_seen
        a = bm.generate(q1, cache=base.fork(), max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True)
        b = bm.generate(q2, cache=base.fork(), max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True)
        assert (base.memory_size(), base.n_seen) == before
        fresh = bm.generate(torch.cat([book, q1]), max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True)
    assert a.new_tokens == fresh.new_tokens
    assert a.cache.n_seen == 90 + 5 + 5 and b.cache.n_seen == 90 + 7 + 5


def test_two_threads_two_caches_do_not_interfere():
    bm = tiny_beacon_model()
    inputs = [_ids(120, 11), _ids(97, 12)]
    with torch.no_grad():
        expected = [bm.forward(x).token_logprobs for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = bm.forward(inputs[i]).token_logprobs

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        torch.testing.assert_close(results[i], expected[i], atol=1e-6, rtol=0)


def test_a_cache_used_by_two_calls_at_once_is_refused():
    bm = tiny_beacon_model()
    cache = bm.new_cache()
    cache.acquire()
    with pytest.raises(RuntimeError, match="another call"):
        bm.forward(_ids(5), cache)
    cache.release()


def test_an_error_mid_read_leaves_the_cache_untouched(monkeypatch):
    bm = tiny_beacon_model()
    with torch.no_grad():
        cache = bm.forward(_ids(40)).cache
        before = (cache.memory_size(), cache.n_seen, cache.window_sizes, cache.mem_k[0].clone())
        calls = {"n": 0}
        real = bm._run_step

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(bm, "_run_step", flaky)
        with pytest.raises(KeyboardInterrupt):
            bm.forward(_ids(100), cache)
        assert (cache.memory_size(), cache.n_seen, cache.window_sizes) == before[:3]
        assert torch.equal(cache.mem_k[0], before[3])
        monkeypatch.setattr(bm, "_run_step", real)
        again = bm.forward(_ids(100), cache)
        fresh = bm.forward(torch.cat([_ids(40), _ids(100)]))
    torch.testing.assert_close(again.last_logits, fresh.last_logits, atol=1e-5, rtol=0)


def test_eager_matches_sdpa():
    bm = tiny_beacon_model(CONFIGS["v2-stepexp"])
    ids = _ids(70)
    with torch.no_grad():
        sdpa = bm.forward(ids)
        bm.model.set_attn_implementation("eager")
        eager = bm.forward(ids)
    torch.testing.assert_close(eager.token_logprobs, sdpa.token_logprobs, atol=1e-4, rtol=0)


def test_masked_gqa_sdpa_equals_the_transformers_kernel():
    """The CPU masked-GQA kernel (no per-head key copies) gives transformers' repeat_kv result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from beacon_llm._compat import masked_gqa_sdpa

    bm = tiny_beacon_model(CONFIGS["v2-stepexp"])
    attn = bm.model.model.layers[0].self_attn
    assert attn.num_key_value_groups > 1
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 8, generator=gen) for h, t in ((4, 12), (2, 40), (2, 40)))
    mask = (torch.rand(1, 1, 12, 40, generator=gen) > 0.3) | torch.eye(12, 40, dtype=torch.bool)[None, None]
    ours, _ = masked_gqa_sdpa(attn, q, k, v, mask, scaling=attn.scaling)
    ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert ours.shape == (1, 12, 4, 8)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_families_run_and_loss_is_mean_nll(model_type):
    bm = tiny_beacon_model(model_type=model_type)
    with torch.no_grad():
        out = bm.forward(_ids(50))
    assert out.token_logprobs.shape == (49,)
    torch.testing.assert_close(out.loss, -out.token_logprobs.mean(), atol=1e-5, rtol=0)


def test_training_gradients_reach_beacons_through_every_window():
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,)))
    n_trainable = bm.mark_only_beacon_trainable()
    assert n_trainable == sum(p.numel() for n, p in bm.model.named_parameters() if "beacon_" in n)
    bm.model.train()
    ids = _ids(64)
    labels = ids.clone()
    labels[:10] = -100
    out = bm.forward(ids, labels=labels)
    assert out.n_targets == 63 - 9
    out.loss.backward()
    grads = {n: p.grad for n, p in bm.model.named_parameters() if p.requires_grad}
    # the last layer's beacon queries only shape beacon outputs, which nothing reads (only beacon KVs are kept)
    last_q = f"model.layers.{bm.num_layers - 1}.self_attn.beacon_q_proj.weight"
    assert grads.pop(last_q).abs().sum() == 0
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in bm.model.named_parameters() if not p.requires_grad)
    bm.model.eval()


def test_a_loss_on_the_last_window_reaches_the_first_windows_tokens_through_the_memory():
    """Nothing on the way is detached: the first window's raw tokens reach a loss on the fourth window only through
    the beacons that condensed them (paper v2 §2.2: the memory is trained end to end)."""
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,)))
    bm.mark_only_beacon_trainable()
    bm.model.train()
    inputs = []

    def leaf(module, args, output):  # each step's input embeddings as a leaf with a gradient
        output = output.detach().requires_grad_()
        inputs.append(output)
        return output

    hook = bm.model.get_input_embeddings().register_forward_hook(leaf)
    try:
        ids = _ids(64)
        labels = torch.full_like(ids, -100)
        labels[56:] = ids[56:]  # scored: the last 8 tokens only
        bm.forward(ids, labels=labels).loss.backward()
    finally:
        hook.remove()
        bm.model.eval()
    first = inputs[0]  # (1, 16 raw + 4 beacons, Dm)
    assert first.shape[1] == 20
    per_row = first.grad.abs().sum(-1)[0]  # (20,)
    beacon_rows = [4, 9, 14, 19]  # interleaved: a beacon after every 4 raw tokens
    raw_rows = [i for i in range(20) if i not in beacon_rows]
    assert (per_row[raw_rows] > 0).all()


def test_attach_refuses_non_llama_models_and_double_attach():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type='gpt2'.*not a supported Llama-shaped"):
        BeaconModel.attach(gpt2, BeaconConfig(window=16, ratios=(2,)))
    bm = tiny_beacon_model()
    with pytest.raises(ValueError, match="already carries beacon modules"):
        BeaconModel.attach(bm.model, bm.config)
