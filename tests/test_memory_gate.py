"""Memory gates (``BeaconConfig.memory_gate``): a learned gate per layer and query head on the attention that the
memory's beacons draw. Off by default; gate 1 reads as the ungated model, gate 0 hides the beacons."""

import copy

import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig, BeaconModel
from beacon_llm.attention import GATE_FLOOR, with_gate_dimension
from beacon_llm.layers import attach_memory_gates
from beacon_llm.schedule import fit_plan
from beacon_llm.tasks import SampleStream
from beacon_llm.testing import tiny_base_model, tiny_beacon_model, tiny_tokenizer
from beacon_llm.training import FitTrainConfig, tail_loss, train_fit

POSITIONS = 128
TEXT = "the keeper of the lighthouse wrote every ship in a red book and slept at dawn. " * 40


def _config(gate, overlap=4, mix="fit-8", ratios=(2, 4)) -> BeaconConfig:
    return BeaconConfig(window=16, ratios=ratios, ratio_mix=mix, fit_overlap=overlap, memory_gate=gate)


def _model(gate, **kwargs):
    bm = tiny_beacon_model(_config(gate, **kwargs), max_position_embeddings=POSITIONS)
    if gate is not None:  # the helper perturbs every beacon parameter: the gates start where the config says
        _set_gates(bm, gate)
    return bm


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed))


def _gates(bm):
    return [layer.self_attn.beacon_gate for layer in bm.model.model.layers]


def _set_gates(bm, value):
    with torch.no_grad():
        for g in _gates(bm):
            g.fill_(value)


def _read(bm, ids):
    """Token log-probs of ``ids`` read in one call, with an answer reserve that condenses the oldest windows."""
    with torch.no_grad():
        return bm.forward(ids, bm.new_cache(), planned_length=len(ids) + 8).token_logprobs


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "gate,kwargs,message",
    [
        (-0.5, {}, r"beacon_memory_gate=-0.5 must be a finite number >= 0"),
        (float("inf"), {}, r"beacon_memory_gate=inf must be a finite number"),
        (float("nan"), {}, r"beacon_memory_gate=nan must be a finite number"),
        (True, {}, r"beacon_memory_gate=True must be a finite number"),
        ("1", {}, r"beacon_memory_gate='1' must be a finite number"),
        (1.0, {"ratios": (0, 2), "ratio_mix": "step-random"}, r"ratio 0 in beacon_ratio=\[0, 2\]"),
    ],
)
def test_bad_gate_settings_are_refused_with_the_value(gate, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BeaconConfig(**{"window": 16, "ratios": (2, 4), "ratio_mix": "fit-8", **kwargs, "memory_gate": gate})


def test_gate_round_trips_and_is_written_only_when_used():
    assert "beacon_memory_gate" not in _config(None).to_dict()  # official configs keep their keys
    cfg = _config(0)
    assert cfg.memory_gate == 0.0 and cfg.to_dict()["beacon_memory_gate"] == 0.0
    assert BeaconConfig.from_dict(cfg.to_dict()) == cfg
    assert BeaconConfig(window=16, ratios=(0, 2), ratio_mix="fit-8", memory_gate=1).memory_gate == 1.0


# ---------------------------------------------------------------------- the gate dimension (pure)
@pytest.mark.parametrize(
    "gate,span,causal",
    [
        ([1.0, 0.5, 2.0], (1, 3), False),
        ([0.0, 2.0, 0.3], (0, 5), True),
        ([0.25, 1.0, 1.0], (2, 2), True),
        ([-1.0, 3.0, 0.0], (0, 1), False),  # below 0 reads as 0
    ],
)
def test_gate_dimension_adds_log_gate_to_the_logits_of_the_span(gate, span, causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 4 if h == 3 else 6, 8, generator=gen) for h in (3, 1, 1))  # 3 query heads, 1 KV head
    g, scaling = torch.tensor(gate), 8**-0.5
    q2, k2, v2 = with_gate_dimension(q, k, v, g, span, scaling)
    assert q2.shape == (1, 3, 4, 9) and k2.shape == v2.shape == (1, 1, 6, 9)
    visible = torch.ones(4, 6, dtype=torch.bool).tril(2) if causal else None
    out = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, attn_mask=visible, scale=scaling,
                                                           enable_gqa=True)  # fmt: skip
    bias = torch.zeros(3, 1, 6)
    bias[:, :, span[0] : span[1]] = torch.log(g.clamp(min=0) + GATE_FLOOR)[:, None, None]
    logits = scaling * q @ k.transpose(-1, -2) + bias  # (1, 3, 4, 6): the reference, written out
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    expected = torch.softmax(logits, -1) @ v
    assert torch.allclose(out[..., :8], expected, atol=1e-5)
    assert torch.equal(out[..., 8], torch.zeros_like(out[..., 8]))


def test_gate_dimension_rejects_a_span_outside_the_keys():
    x = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"gate span \(2, 9\) is not within the 3 keys"):
        with_gate_dimension(x, x, x, torch.ones(2), (2, 9), 0.5)


# ---------------------------------------------------------------------- the model
@pytest.mark.parametrize("kwargs", [{}, {"overlap": 0}, {"overlap": 0, "mix": "adapt-8", "ratios": (2, 4)}])
def test_gates_at_one_read_as_the_ungated_model(kwargs):
    ids = _ids(150)
    plain = _model(None, **kwargs)
    gated = BeaconModel(copy.deepcopy(plain.model), _config(1.0, **kwargs))  # the same weights, gates added
    attach_memory_gates(gated.model, 1.0)
    a, b = _read(gated, ids), _read(plain, ids)
    assert torch.allclose(a, b, atol=1e-5)


def test_gates_at_zero_hide_the_beacons_from_the_text_after_them():
    bm = _model(0.0)
    ids = _ids(150)
    cache = bm.new_cache()
    with torch.no_grad():
        before = bm.forward(ids, cache, planned_length=158).token_logprobs
    plan = cache.state.fit_plan
    assert plan.condensed_windows > 0
    with torch.no_grad():  # other beacon keys and values: the raw text after the beacons must not notice
        for layer in bm.model.model.layers:
            layer.self_attn.beacon_k_proj.weight.mul_(-3.0)
            layer.self_attn.beacon_v_proj.weight.mul_(2.0)
    after = _read(bm, ids)
    tail = slice(plan.raw_from, None)
    assert torch.allclose(before[tail], after[tail], atol=1e-5)
    _set_gates(bm, 1.0)  # the same change with open gates moves the tail
    opened = _read(bm, ids)
    _set_gates(bm, 0.0)
    assert not torch.allclose(_read(bm, ids)[tail], opened[tail], atol=1e-3)


def test_closed_gates_get_a_finite_gradient_and_stay_non_negative_in_training(tmp_path):
    bm = _model(0.0, overlap=0, mix="fit-0", ratios=(4, 8))
    ids = list(range(4, 100))
    plan = fit_plan(bm.config, len(ids), 64, ratio=4)
    bm.mark_only_beacon_trainable()
    bm.model.train()
    loss, _ = tail_loss(bm, ids, plan, None, 0.0, 1.0)
    loss.backward()
    grads = torch.stack([g.grad for g in _gates(bm)])  # (layers, heads)
    assert torch.isfinite(grads).all() and grads.abs().max() > 0

    fresh = _model(0.0, overlap=0, mix="fit-0", ratios=(4, 8))
    frozen = {n: p.detach().clone() for n, p in fresh.model.named_parameters() if "beacon_gate" not in n}
    stream = SampleStream([TEXT], tiny_tokenizer(), 96, seed=0)
    cfg = FitTrainConfig(str(tmp_path / "run"), steps=3, seq_len=96, positions=64, ratios=(4,), grad_accum=1,
                         kl_weight=0.0, ce_weight=1.0, gate_lr=0.5, gates_only=True, save_every=3)  # fmt: skip
    train_fit(fresh, stream, cfg, teacher=None)
    gates = torch.stack([g.detach() for g in _gates(fresh)])
    assert (gates >= 0).all() and gates.max() > 0  # opened where the loss asked, never below 0
    assert all(torch.equal(p, frozen[n]) for n, p in fresh.model.named_parameters() if n in frozen)
    again = beacon_llm.load_adapter(tiny_base_model(max_position_embeddings=POSITIONS), str(tmp_path / "run" / "final"))
    assert again.config.memory_gate == 0.0
    assert torch.equal(torch.stack([g.detach() for g in _gates(again)]), gates)


def test_gates_train_only_on_a_model_that_has_them(tmp_path):
    bm = _model(None, overlap=0, mix="fit-0", ratios=(4, 8))
    stream = SampleStream([TEXT], tiny_tokenizer(), 96, seed=0)
    cfg = FitTrainConfig(str(tmp_path), steps=1, seq_len=96, positions=64, kl_weight=0.0, ce_weight=1.0,
                         gates_only=True)  # fmt: skip
    with pytest.raises(ValueError, match="which this model has none of"):
        train_fit(bm, stream, cfg, teacher=None)
    with pytest.raises(ValueError, match="gate_lr=0 must be > 0"):
        FitTrainConfig(str(tmp_path), gate_lr=0)


def test_gates_added_to_an_adapter_read_as_before_and_decode_the_same():
    bm = _model(None)
    ids = _ids(150)
    before = _read(bm, ids)
    tokens = bm.generate(ids[None], max_new_tokens=6, do_sample=False)
    bm.add_memory_gates(1.0)
    assert bm.config.memory_gate == 1.0 and len(_gates(bm)) == bm.num_layers
    assert torch.allclose(_read(bm, ids), before, atol=1e-5)
    assert torch.equal(bm.generate(ids[None], max_new_tokens=6, do_sample=False), tokens)
    with pytest.raises(ValueError, match="already carries memory gates"):
        bm.add_memory_gates(1.0)
    bm.detach()
    assert not any("beacon_" in n for n, _ in bm.model.named_parameters())
