"""``fit_overlap``: the last condensed tokens of a ``fit-N`` read are read once more, raw, after the beacons.

Reading with an overlap of K equals reading the stream with those K tokens repeated right after the condensed windows
(the same plan, no overlap); the stream length, saved caches, split reads and the position budget account for it."""

import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig
from beacon_llm.generation import generate
from beacon_llm.schedule import FitPlan, config_capacity, fit_capacity, fit_plan
from beacon_llm.testing import tiny_beacon_model

POSITIONS = 128


def _config(overlap: int, ratios=(2, 4)) -> BeaconConfig:
    return BeaconConfig(window=16, ratios=ratios, ratio_mix="fit-8", fit_overlap=overlap)


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed))


def _model(overlap: int):
    return tiny_beacon_model(_config(overlap), max_position_embeddings=POSITIONS)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"fit_overlap": -1, "ratio_mix": "fit-8"}, r"beacon_fit_overlap=-1 must be within \[0, beacon_window=16\]"),
        ({"fit_overlap": 17, "ratio_mix": "fit-8"}, r"beacon_fit_overlap=17 must be within"),
        ({"fit_overlap": 4, "ratio_mix": "adapt-8"}, r"only applies to a fit-N beacon_ratio_mix \(got 'adapt-8'\)"),
        ({"fit_overlap": 2.5, "ratio_mix": "fit-8"}, r"beacon_fit_overlap=2.5 must be an int"),
    ],
)
def test_bad_overlap_is_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BeaconConfig(window=16, ratios=(2, 4), **kwargs)


def test_overlap_round_trips_and_is_written_only_when_used():
    assert "beacon_fit_overlap" not in _config(0).to_dict()  # official configs keep their keys
    cfg = _config(8)
    assert cfg.to_dict()["beacon_fit_overlap"] == 8
    assert BeaconConfig.from_dict(cfg.to_dict()) == cfg
    # switching the mode away from fit-N drops the saved overlap; asking for one there is an error
    assert BeaconConfig.from_dict(cfg.to_dict(), beacon_ratio_mix="adapt-8").fit_overlap == 0
    with pytest.raises(ValueError, match="only applies to a fit-N"):
        BeaconConfig.from_dict(cfg.to_dict(), beacon_ratio_mix="adapt-8", beacon_fit_overlap=8)


# ---------------------------------------------------------------------- the plan (pure)
@pytest.mark.parametrize(
    "planned,overlap,expected_windows",
    [
        (128, 8, 0),  # fits: read raw, nothing to overlap
        (129, 8, 1),  # 1 + 8 positions to free, 12 per condensed window
        (132, 8, 1),
        (133, 8, 2),  # 13 to free
        (300, 8, 15),  # 180 to free
        (300, 16, 16),  # 188 to free
    ],
)
def test_fit_plan_counts_the_overlap(planned, overlap, expected_windows):
    plan = fit_plan(_config(overlap, ratios=(4,)), planned, POSITIONS)
    assert plan.condensed_windows == expected_windows
    assert plan.entries(planned) <= POSITIONS
    assert plan.condensed_entries == plan.condensed_windows * 4  # the beacons (no sink here)
    if plan.condensed_windows:
        assert plan.overlap == overlap
        assert plan.entries(plan.raw_from) == plan.condensed_windows * 4 + overlap  # beacons + overlap
        assert plan.entries(plan.raw_from - 1) == plan.condensed_windows * 4  # not yet read again
        fewer = FitPlan(planned, 4, plan.condensed_windows - 1, 16, 0, overlap)
        assert fewer.entries(planned) > POSITIONS


@pytest.mark.parametrize("ratio,sink,overlap", [(2, 0, 1), (4, 0, 8), (4, 1, 16), (8, 3, 5), (16, 0, 16)])
def test_fit_capacity_with_overlap_is_exact(ratio, sink, overlap):
    cfg = BeaconConfig(window=16, ratios=(ratio,), ratio_mix="fit-0", sink_size=sink, fit_overlap=overlap)
    cap = fit_capacity(ratio, POSITIONS, 16, sink, overlap)
    assert cap == config_capacity(cfg, POSITIONS) < fit_capacity(ratio, POSITIONS, 16, sink)
    for n in range(POSITIONS + 1, cap + 1):  # every length up to the capacity is planned within the positions
        assert fit_plan(cfg, n, POSITIONS).entries(n) <= POSITIONS
    with pytest.raises(ValueError, match=rf"capacity of {cap} tokens"):
        fit_plan(cfg, cap + 1, POSITIONS)


def test_plan_with_overlap_round_trips_through_its_dict():
    plan = FitPlan(300, 4, 15, 16, 0, 8)
    assert FitPlan(**plan.to_dict()) == plan
    assert "overlap" not in FitPlan(300, 4, 15, 16).to_dict()  # records written before the option read the same


# ---------------------------------------------------------------------- reading
def _read(bm, stream, plan):
    cache = bm.new_cache()
    cache.set_fit_plan(plan)
    with torch.no_grad():
        out = bm.forward(stream, cache, return_hidden=True)
    return out, cache


@pytest.mark.parametrize("overlap", [1, 5, 16])
def test_overlap_equals_the_repeated_stream(overlap):
    """The overlap is the last K condensed tokens read again raw: the same states as a stream that repeats them."""
    ids = _ids(200, seed=1)
    bm = _model(overlap)
    plan = fit_plan(bm.config, 210, POSITIONS)
    s = plan.raw_from
    out, cache = _read(bm, ids, plan)
    plain_cfg = _config(0)
    ref_bm = tiny_beacon_model(plain_cfg, max_position_embeddings=POSITIONS)
    ref_bm.model.load_state_dict(bm.model.state_dict())
    repeated = torch.cat([ids[:s], ids[s - overlap : s], ids[s:]])
    ref, ref_cache = _read(ref_bm, repeated, FitPlan(210, plan.ratio, plan.condensed_windows, 16))
    # the state that predicts the first raw token is the repeated one; every later one matches too
    torch.testing.assert_close(out.hidden[s - 1 :], ref.hidden[s + overlap - 1 :], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.hidden[: s - 1], ref.hidden[: s - 1])  # the condensed part is unchanged
    torch.testing.assert_close(out.token_logprobs[s - 1 :], ref.token_logprobs[s + overlap - 1 :], atol=1e-5, rtol=1e-4)
    assert cache.n_seen == len(ids) and len(out.token_logprobs) == len(ids) - 1  # the stream is the user's
    assert cache.memory_length == ref_cache.memory_length == plan.entries(len(ids))
    assert cache.kv_by_kind()["raw"] == len(ids) - s + overlap


def test_overlap_spanning_calls_and_a_saved_cache(tmp_path):
    """The condensed windows may close in a call holding fewer tokens than the overlap: the earlier ones are
    remembered by the cache, also across save and load."""
    overlap = 12
    bm = _model(overlap)
    ids = _ids(200, seed=2)
    plan = fit_plan(bm.config, 210, POSITIONS)
    s = plan.raw_from
    whole, _ = _read(bm, ids, plan)
    cache = bm.new_cache()
    cache.set_fit_plan(plan)
    with torch.no_grad():
        first = bm.forward(ids[: s - 3], cache)
    assert cache.state.overlap_ids == tuple(ids[s - 3 - overlap : s - 3].tolist())
    beacon_llm.save_cache(cache, str(tmp_path / "c.safetensors"))
    loaded, _ = beacon_llm.load_cache(str(tmp_path / "c.safetensors"), bm)
    assert loaded.state.overlap_ids == cache.state.overlap_ids
    with torch.no_grad():
        rest = bm.forward(ids[s - 3 :], loaded)
    assert loaded.state.overlap_ids == ()  # read again, then forgotten
    torch.testing.assert_close(first.token_logprobs, whole.token_logprobs[: s - 4])
    torch.testing.assert_close(rest.token_logprobs, whole.token_logprobs[s - 3 :], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loaded.last_logits, whole.last_logits, atol=1e-5, rtol=1e-4)


def test_generation_after_an_overlap_continues_from_the_memory():
    """Greedy decoding after an overlapped read equals re-reading the prompt and the answer under the same plan (the
    decode step writes at the positions after the overlap)."""
    overlap = 8
    bm = _model(overlap)
    ids = _ids(180, seed=3)
    cache = bm.new_cache()
    with torch.no_grad():
        out = generate(bm, ids[None], cache=cache, max_new_tokens=6, do_sample=False)
    new = out[0, len(ids) :]
    plan = cache.state.fit_plan
    assert plan.condensed_windows > 0 and plan.overlap == overlap
    assert cache.memory_length == plan.entries(cache.n_seen)
    again, _ = _read(bm, torch.cat([ids, new[:-1]]), plan)
    assert torch.equal(again.argmax_next[len(ids) - 1 :], new)


@pytest.mark.parametrize(
    "ratio,sink,overlap", [(4, 0, 0), (4, 2, 0), (4, 0, 1), (4, 0, 4), (4, 3, 2), (2, 0, 0), (8, 1, 0), (16, 0, 5)]
)
def test_every_read_up_to_the_capacity_stays_within_the_positions_at_every_step(ratio, sink, overlap):
    """The last condensed window is read with its W raw tokens and its beacons after the memory, so the condensed
    windows are bounded by sink + k·W/α + W <= P, not only by the positions left once they are closed. Without the
    overlap absorbing it, the capacity let the last condensed window's positions reach W/α past P (up to P + 3 of
    64 here); every position the model is given now stays below P, measured on the model's own step trace."""
    positions = 64
    cfg = BeaconConfig(window=16, ratios=(ratio,), ratio_mix="fit-0", sink_size=sink, fit_overlap=overlap)
    bm = tiny_beacon_model(cfg, max_position_embeddings=positions)
    cap = config_capacity(cfg, positions)
    per_window = 16 // ratio
    for n in range(positions + 1, cap + 1):  # the arithmetic, every length
        plan = fit_plan(cfg, n, positions)
        assert min(sink, 16) + plan.condensed_windows * per_window + 16 <= positions
        assert plan.entries(n) <= positions
    for n in range(max(positions + 1, cap - 2 * 16), cap + 1):  # the model's own positions near the capacity
        cache = bm.new_cache(trace=True)
        with torch.no_grad():
            bm.forward(_ids(n, seed=n), cache, return_token_logprobs=False, planned_length=n)
        assert max(p for step in cache.trace for p in step.positions) < positions, n
    with pytest.raises(ValueError, match=rf"capacity of {cap} tokens"):
        fit_plan(cfg, cap + 1, positions)
