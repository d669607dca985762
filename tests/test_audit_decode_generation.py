"""Audit of the decode loop (``beacon_llm.generation``): a sampler that fails after its token was fed, an answer
that cannot fit when continuing a cache, a cache of another model, and streamed text with a tokenizer that cleans
up spaces."""

import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.generation import Decoding, TokenSampler
from beacon_llm.testing import tiny_beacon_model, tiny_tokenizer

FIT = BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-16")
ADAPT = BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16")
SEQ4 = BeaconConfig(window=16, ratios=(4,), ratio_mix="sequence")


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _FailingSampler(TokenSampler):
    """Greedy, raising on its ``fail_at``-th call (NaN probabilities, an interrupt)."""

    def __init__(self, fail_at):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, logits, history):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return super().__call__(logits, history)


@pytest.mark.parametrize("config", [FIT, ADAPT], ids=["fit", "adapt"])
def test_a_sampler_failing_after_a_fed_token_leaves_it_fed_once(config):
    bm = tiny_beacon_model(config)
    prompt = _ids(20)
    with torch.no_grad():
        cache = bm.new_cache()
        logits = bm.forward(prompt, cache, return_token_logprobs=False, planned_length=60).last_logits
        decoding = Decoding(bm, cache, logits, _FailingSampler(4), 10)
        with pytest.raises(RuntimeError, match="probability tensor"):
            decoding.run()
        assert len(decoding.tokens) == 3  # all three fed: nothing is pending, the context ends with them
        assert cache.state.pending == [] and cache.n_seen == len(prompt) + 3
        after = bm.forward([5], cache, return_token_logprobs=False).last_logits
        fresh = bm.forward(prompt + decoding.tokens + [5], planned_length=60, return_token_logprobs=False).last_logits
    torch.testing.assert_close(after, fresh, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [FIT, SEQ4], ids=["fit", "sequence"])
@pytest.mark.parametrize("pending", [True, False], ids=["pending", "logits"])
def test_continuing_refuses_an_answer_beyond_the_capacity_before_any_token(config, pending):
    bm = tiny_beacon_model(config, max_position_embeddings=48)
    with torch.no_grad():
        cache = bm.new_cache()
        if pending:
            bm.generate(_ids(20), cache=cache, max_new_tokens=3, eos_token_id=[])
        else:
            bm.forward(_ids(20), cache)
        before = (cache.n_seen, list(cache.state.pending), cache.last_logits)
        with pytest.raises(ValueError, match="max_new_tokens=1000 does not fit after the"):
            bm.generate(None, cache=cache, max_new_tokens=1000, eos_token_id=[])
        assert (cache.n_seen, cache.state.pending, cache.last_logits) == before  # nothing was read or chosen
        out = bm.generate(None, cache=cache, max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True)
    assert len(out.new_tokens) == 4


def test_continuing_a_cache_of_another_model_is_refused_and_leaves_it_as_it_was():
    owner, other = tiny_beacon_model(seed=0), tiny_beacon_model(seed=5)
    with torch.no_grad():
        cache = owner.new_cache()
        owner.forward(_ids(26), cache)
        logits = cache.last_logits
        with pytest.raises(ValueError, match="built by a different model"):
            other.generate(None, cache=cache, max_new_tokens=5)
    assert cache.state.pending == [] and cache.last_logits is logits


def test_streamed_deltas_join_the_text_with_a_tokenizer_that_cleans_up_spaces():
    bm = tiny_beacon_model()
    tok = tiny_tokenizer()
    tok.clean_up_tokenization_spaces = True  # as Llama 3's tokenizer
    for answer, stops, expected in [
        ("it is done . Next", (), "it is done . Next"),
        ("x = 'sam' and y", (), "x = 'sam' and y"),
        ("a , b ; c", (";",), "a , b "),
    ]:
        script = iter(tok.encode(answer, add_special_tokens=False))
        with torch.no_grad():
            cache = bm.new_cache()
            logits = bm.forward(_ids(8), cache, return_token_logprobs=False).last_logits
            decoding = Decoding(bm, cache, logits, lambda logits, history: next(script), len(answer), stops=stops,
                                tokenizer=tok, stream_text=True)  # fmt: skip
            deltas = list(decoding)
        assert "".join(deltas) == decoding.text == expected


class _Adapter(torch.nn.Module):
    """A projection wrapped as PEFT's LoRA does: the base layer plus a low-rank update."""

    def __init__(self, base):
        super().__init__()
        self.base_layer, self.in_features, self.out_features = base, base.in_features, base.out_features
        gen = torch.Generator().manual_seed(3)
        self.a = torch.nn.Parameter(torch.randn(4, base.in_features, generator=gen) / 2)
        self.b = torch.nn.Parameter(torch.randn(base.out_features, 4, generator=gen) / 2)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + x @ self.a.T @ self.b.T


def _wrap_q(bm):
    for layer in bm.model.model.layers:
        layer.self_attn.q_proj = _Adapter(layer.self_attn.q_proj)


def _hook_down(bm):
    bm.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: out * 2)


def _replace_forward(bm):
    up = bm.model.model.layers[1].mlp.up_proj
    up.forward = lambda x: torch.nn.functional.linear(x, up.weight) * 0.5


@pytest.mark.parametrize("change", [_wrap_q, _hook_down, _replace_forward], ids=["adapter", "hook", "forward"])
def test_the_decode_step_follows_projections_replaced_or_hooked_after_its_kernels_were_made(change):
    bm = tiny_beacon_model(FIT)
    prompt = _ids(26)

    def step_and_full():
        with torch.no_grad():
            cache = bm.new_cache()
            bm.forward(prompt, cache)
            step = bm.forward([40], cache, return_token_logprobs=False).last_logits  # the decode step
            full = bm.forward(prompt + [40], return_token_logprobs=False).last_logits  # the modules
        return step, full

    step, full = step_and_full()  # makes the step's kernels
    torch.testing.assert_close(step, full, atol=1e-4, rtol=0)
    change(bm)
    step, full = step_and_full()
    torch.testing.assert_close(step, full, atol=1e-4, rtol=0)
