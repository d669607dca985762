"""``fit-N``: a read that fits the base positions is the plain model bit for bit (through every entry point); a longer
one condenses only its oldest windows, planned once per read, and the official modes are unchanged."""

import math

import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig, BeaconEngine
from beacon_llm.schedule import FitPlan, config_capacity, fit_capacity, fit_plan, planned_read_length
from beacon_llm.testing import plain_reference_tokens, tiny_beacon_model

FIT = BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-8")
POSITIONS = 128


def _ids(n, seed=0):
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed))


def _fit_model(model_type="llama", config=FIT, positions=POSITIONS):
    return tiny_beacon_model(config, model_type=model_type, max_position_embeddings=positions)


# ---------------------------------------------------------------------- the plan (pure)
@pytest.mark.parametrize(
    "planned,ratios,sink,expected",
    [
        (100, (2, 4), 0, (0, 0)),  # fits: nothing condensed
        (128, (2, 4), 0, (0, 0)),  # exactly the positions
        (129, (2, 4), 0, (4, 1)),  # one window at the largest ratio frees 12 positions
        (140, (2, 4), 0, (4, 1)),
        (141, (2, 4), 0, (4, 2)),
        (300, (2, 4), 0, (4, 15)),  # 300 - 128 = 172 positions to free, 12 per window
        (240, (2,), 0, (2, 14)),  # 8 per window
        (129, (2, 4), 1, (4, 1)),  # the sink takes one more position
        (140, (2, 4), 1, (4, 2)),
    ],
)
def test_fit_plan_table(planned, ratios, sink, expected):
    cfg = BeaconConfig(window=16, ratios=ratios, ratio_mix="fit-0", sink_size=sink)
    plan = fit_plan(cfg, planned, POSITIONS)
    assert (plan.ratio, plan.condensed_windows) == expected
    assert plan.entries(planned) <= POSITIONS
    if plan.condensed_windows:  # no more windows than needed
        fewer = FitPlan(planned, plan.ratio, plan.condensed_windows - 1, 16, sink)
        assert fewer.entries(planned) > POSITIONS


@pytest.mark.parametrize("ratio,sink", [(2, 0), (4, 0), (4, 1), (8, 3), (16, 0)])
def test_fit_capacity_is_exact(ratio, sink):
    cfg = BeaconConfig(window=16, ratios=(ratio,), ratio_mix="fit-0", sink_size=sink)
    cap = fit_capacity(ratio, POSITIONS, 16, sink)
    assert cap == config_capacity(cfg, POSITIONS)
    assert fit_plan(cfg, cap, POSITIONS).entries(cap) <= POSITIONS
    with pytest.raises(ValueError, match=rf"planned for {cap + 1} tokens .* capacity of {cap} tokens"):
        fit_plan(cfg, cap + 1, POSITIONS)


@pytest.mark.parametrize(
    "prompt,reserve,document_end,expected",
    [
        (100, 20, 90, 120),  # fits: the prompt and its answer only
        (120, 8, 90, 128),
        (200, 20, 190, 220),  # condensing: at least fit-N (8) after the document, here less than the prompt needs
        (200, 2, 196, 204),  # room for follow-ups: document end + 8
    ],
)
def test_planned_read_length(prompt, reserve, document_end, expected):
    assert planned_read_length(FIT, POSITIONS, prompt, reserve, document_end) == expected


def test_fit_mode_is_validated():
    with pytest.raises(ValueError, match="do not divide the window"):
        BeaconConfig(era="v2", window=12, ratios=(8,), attn="full-coverage", pos="append", ratio_mix="fit-0")
    with pytest.raises(ValueError, match="fit-N|'fit-256'"):
        BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-x")
    assert BeaconConfig.from_dict(FIT.to_dict()) == FIT


# ---------------------------------------------------------------------- bit for bit when it fits
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_a_read_that_fits_is_the_plain_model_bit_for_bit(model_type):
    bm = _fit_model(model_type)
    ids = _ids(110)
    with torch.no_grad():
        out = bm.forward(ids, return_logits=True, planned_length=120)
        plain = bm.model(input_ids=ids[None]).logits[0].float()  # (L, V)
    assert torch.equal(out.logits, plain)
    logp = torch.log_softmax(plain[:-1], -1).gather(1, ids[1:, None]).squeeze(1)
    assert torch.equal(out.token_logprobs, logp)
    assert out.cache.kv_by_kind() == {"sink": 0, "condensed": 0, "raw": 110, "total": 110}


def _hf_greedy(model, ids, max_new):
    out = model.generate(
        ids[None], max_new_tokens=max_new, do_sample=False, eos_token_id=127, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences[0, len(ids) :].tolist(), [x[0].float() for x in out.logits]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_generate_that_fits_equals_transformers_generate_bit_for_bit(model_type):
    bm = _fit_model(model_type)
    ids = _ids(90, seed=1)
    tokens, logits = _hf_greedy(bm.model, ids, 24)
    cache = bm.new_cache()
    ours = bm.generate(ids, cache=cache, max_new_tokens=24, eos_token_id=127, return_dict_in_generate=True)
    assert ours.new_tokens == tokens
    # the same steps, logits compared bit for bit
    cache = bm.new_cache()
    step_logits = [bm.forward(ids, cache, planned_length=114, return_token_logprobs=False).last_logits]
    for t in tokens[:-1]:
        step_logits.append(bm.forward([t], cache, return_token_logprobs=False).last_logits)
    assert all(torch.equal(a, b) for a, b in zip(step_logits, logits))


def _plain_engine_answer(model, ids, boundary, max_new, repetition_penalty=None):
    """The plain model fed the engine's calls (the document, then the question), then greedy decoding."""
    chunks = [ids[:boundary], ids[boundary:]] if boundary and 0 < boundary < len(ids) else [ids]
    return plain_reference_tokens(model, chunks, max_new, repetition_penalty=repetition_penalty, eos_token_ids=(2,))[0]


def test_engine_answer_that_fits_is_the_plain_models_and_follow_ups_read_only_the_question():
    engine = BeaconEngine(_fit_model(positions=512))
    doc = "Toto is a small black dog. " * 10
    ids, boundary = engine.document_prompt(doc, "Who is Toto?")
    assert len(ids) + 12 <= 512
    first = engine.complete(ids, boundary=boundary, max_new_tokens=12, repetition_penalty=1.15)
    expected = _plain_engine_answer(engine.bm.model, ids, boundary, 12, 1.15)
    assert first.token_ids == [t for t in expected if t != 2]
    ids2, boundary2 = engine.document_prompt(doc, "What colour?")
    second = engine.complete(ids2, boundary=boundary2, max_new_tokens=12)
    assert second.usage.cache_read_tokens == boundary2 and second.usage.read_tokens == len(ids2) - boundary2
    assert second.token_ids == [t for t in _plain_engine_answer(engine.bm.model, ids2, boundary2, 12) if t != 2]


def test_engine_refuses_before_reading_when_the_answer_does_not_fit():
    engine = BeaconEngine(_fit_model())
    capacity = engine.capacity
    ids = [5] * (capacity - 3)
    calls = []
    engine.bm.forward = lambda *a, **k: calls.append(a)  # nothing may be read
    message = rf"{capacity - 3} tokens and the answer may take 10 more: {capacity + 7} tokens"
    with pytest.raises(ValueError, match=message):
        engine.complete(ids, max_new_tokens=10)
    assert calls == []


def test_follow_up_beyond_the_plan_is_read_again_not_refused():
    engine = BeaconEngine(_fit_model(positions=512))
    doc = "Toto is a small black dog. " * 13
    ids, boundary = engine.document_prompt(doc, "Who?")
    engine.complete(ids, boundary=boundary, max_new_tokens=4)
    assert len(ids) + 4 <= 512
    long_q = "Why " * 20
    ids2, boundary2 = engine.document_prompt(doc, long_q)
    assert len(ids2) + 20 > 512  # the raw document plus this question no longer fit
    out = engine.complete(ids2, boundary=boundary2, max_new_tokens=20)
    assert out.usage.cache_read_tokens == 0 and out.usage.read_tokens == len(ids2)


# ---------------------------------------------------------------------- longer than the positions
def test_long_read_condenses_only_the_oldest_windows_and_keeps_the_tail_raw():
    bm = _fit_model()
    ids = _ids(300, seed=2)
    cache = bm.new_cache(trace=True)
    with torch.no_grad():
        whole = bm.forward(ids, cache, planned_length=310)
    plan = cache.state.fit_plan
    assert (plan.ratio, plan.condensed_windows) == (4, 16)  # 310 - 128 = 182 positions freed, 12 per window
    assert cache.kv_by_kind() == {"sink": 0, "condensed": 16 * 4, "raw": 300 - 256, "total": 64 + 44}
    assert [t.beacon_size for t in cache.trace][-1] == -1 and cache.window_sizes == [4] * 16
    # the raw tail is read by the plain decoder after the memory: one call equals several calls
    pieces = bm.new_cache()
    with torch.no_grad():
        for a, b in ((0, 37), (37, 250), (250, 263), (263, 300)):
            part = bm.forward(ids[a:b], pieces, planned_length=310).token_logprobs  # (b - a - 1,)
            torch.testing.assert_close(part, whole.token_logprobs[a : b - 1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pieces.last_logits, whole.last_logits, atol=1e-4, rtol=1e-5)


def test_beyond_the_plan_is_refused_with_the_numbers():
    bm = _fit_model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(300), cache, planned_length=305)
        with pytest.raises(ValueError, match=r"planned \(once, at its first read\) for 305 tokens"):
            bm.forward(_ids(20), cache)
    assert cache.n_seen == 300  # nothing half-read


def test_cache_with_a_plan_survives_save_and_load(tmp_path):
    bm = _fit_model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(200), cache, planned_length=220)
    beacon_llm.save_cache(cache, str(tmp_path / "c.safetensors"))
    loaded, _ = beacon_llm.load_cache(str(tmp_path / "c.safetensors"), bm)
    assert loaded.state.fit_plan == cache.state.fit_plan
    assert loaded.kv_by_kind() == cache.kv_by_kind()
    q = _ids(10, seed=3)
    with torch.no_grad():
        a = bm.forward(q, cache).last_logits
        b = bm.forward(q, loaded).last_logits
    assert torch.equal(a, b)


def test_fit_uses_fewer_condensed_windows_than_adapt_at_the_same_length():
    """adapt-N condenses every window; fit-N only as many as the positions need (their KV use is reported)."""
    ids = _ids(250, seed=4)
    adapt = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-8"), max_position_embeddings=128)
    fit = _fit_model()
    with torch.no_grad():
        a = adapt.forward(ids, planned_length=258).cache
        f = fit.forward(ids, planned_length=258).cache
    assert a.kv_by_kind()["raw"] < 16 and f.kv_by_kind()["raw"] > 50
    assert f.get_seq_length() <= POSITIONS and a.get_seq_length() <= POSITIONS
    assert math.isfinite(float(f.last_logits.sum()))


def test_a_condensed_prefix_is_not_reused_for_a_prompt_that_fits_raw():
    """A first question with a long answer condenses the document; a second with a short answer fits raw, and gets
    the plain model's answer, not one read through the condensed prefix."""
    engine = BeaconEngine(_fit_model(positions=512))
    doc = "Toto is a small black dog. " * 12
    ids, boundary = engine.document_prompt(doc, "Who?")
    first = engine.complete(ids, boundary=boundary, max_new_tokens=512 - len(ids) + 40)
    assert first.usage.cache_read_tokens == 0
    second = engine.complete(ids, boundary=boundary, max_new_tokens=8)
    assert second.usage.cache_read_tokens == 0  # read again, raw
    assert second.token_ids == [t for t in _plain_engine_answer(engine.bm.model, ids, boundary, 8) if t != 2]
    third = engine.complete(ids, boundary=boundary, max_new_tokens=8)
    assert third.usage.cache_read_tokens == boundary  # the raw prefix is stored beside the condensed one


def test_a_follow_up_beyond_a_cache_plan_is_refused_before_reading():
    bm = _fit_model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.generate(_ids(60), cache=cache, max_new_tokens=4)
        seen = cache.n_seen
        with pytest.raises(ValueError, match="planned"):
            bm.generate(_ids(10), cache=cache, max_new_tokens=100)
    assert cache.n_seen == seen  # nothing was read


def test_disabled_is_per_thread_not_process_wide():
    """Inside disabled() in one thread, another thread's forward on the same model still reads with beacons."""
    import threading

    bm = tiny_beacon_model()
    ids = _ids(60, seed=9)
    with torch.no_grad():
        expected = bm.forward(ids).last_logits
        with bm.disabled():
            plain = bm.forward(ids).last_logits
            seen = {}
            worker = threading.Thread(target=lambda: seen.update(out=bm.forward(ids).last_logits))
            worker.start()
            worker.join()
    assert not torch.allclose(plain, expected, atol=1e-3)
    assert torch.equal(seen["out"], expected)
    assert bm._enabled


def test_the_raw_part_after_condensed_windows_is_read_a_window_at_a_time():
    """Progress (and so cancellation) comes every window step, also in the raw part after the condensed windows."""
    bm = _fit_model()
    ids = _ids(300, seed=2)
    steps = []
    with torch.no_grad():
        bm.forward(ids, bm.new_cache(), planned_length=310, progress=lambda n, cache: steps.append(n))
    window = bm.config.window
    assert sum(steps) == 300 and max(steps) <= window
    assert len(steps) >= 300 // window  # 16 condensed windows, then the 44 raw tokens in window-sized reads


@pytest.mark.parametrize("overlap", [0, 5])
def test_a_conversation_grown_past_its_plans_room_goes_on_from_before_the_last_condensed_window(overlap):
    """A read grown past the follow-up room its plan kept needs a plan that condenses more windows. Every window the
    old plan condensed but the last is condensed alike by the new one (same ratio, same tokens), so the read goes on
    from the state before the old plan's last condensed window, kept while reading, instead of from the start: the
    same tokens, logits and memory as a fresh read of the grown prompt, for the cost of the windows after it."""
    cfg = BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-8", fit_overlap=overlap)
    bm = tiny_beacon_model(cfg, max_position_embeddings=POSITIONS)
    engine = BeaconEngine(bm)
    doc = _ids(300, seed=3).tolist()
    first = engine.complete(doc + [7, 8, 9], boundary=len(doc), max_new_tokens=3)
    old_plan = next(c for n, c in engine.stored_prefixes() if n == len(doc)).state.fit_plan
    assert old_plan.condensed_windows >= 3 and first.usage.cache_read_tokens == 0
    grown = doc + _ids(40, seed=4).tolist()  # past the room kept after the document
    assert old_plan.entries(len(grown) + 6) > POSITIONS
    got = engine.complete(grown, boundary=len(doc), max_new_tokens=6)
    assert got.usage.cache_read_tokens == (old_plan.condensed_windows - 1) * 16
    fresh_engine = BeaconEngine(bm, max_prefixes=0)
    assert got.token_ids == fresh_engine.complete(grown, boundary=len(doc), max_new_tokens=6).token_ids
    went_on, _ = engine.read(grown, boundary=len(doc), answer_reserve=6)
    fresh, _ = fresh_engine.read(grown, boundary=len(doc), answer_reserve=6)
    assert went_on.state.fit_plan == fresh.state.fit_plan != old_plan
    assert torch.equal(went_on.last_logits, fresh.last_logits)
    assert all(torch.equal(a, b) for a, b in zip(went_on.mem_k, fresh.mem_k))


def test_a_cache_goes_on_under_another_plan_only_where_it_was_read_alike():
    """``can_replan``: whole windows, condensed by both plans at one ratio, the overlap not yet read."""
    from beacon_llm.schedule import FitPlan

    cfg = BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-8", fit_overlap=2)
    bm = tiny_beacon_model(cfg, max_position_embeddings=POSITIONS)

    def cache_after(n, plan):
        cache = bm.new_cache()
        cache.set_fit_plan(plan)
        with torch.no_grad():
            bm.forward(_ids(n), cache, return_token_logprobs=False)
        return cache

    old = FitPlan(300, 4, 5, 16, 0, 2)
    assert cache_after(64, old).can_replan(FitPlan(320, 4, 7, 16, 0, 2))  # 4 windows, condensed by both
    assert cache_after(64, old).can_replan(FitPlan(250, 4, 5, 16, 0, 2))
    assert not cache_after(64, old).can_replan(FitPlan(200, 4, 4, 16, 0, 2))  # the new plan reads window 4 raw
    assert not cache_after(60, old).can_replan(FitPlan(320, 4, 7, 16, 0, 2))  # inside a window
    assert not cache_after(80, old).can_replan(FitPlan(320, 4, 7, 16, 0, 2))  # the overlap was read
    assert not cache_after(64, old).can_replan(FitPlan(320, 2, 7, 16, 0, 2))  # another ratio
    assert not cache_after(64, old).can_replan(FitPlan(320, 4, 7, 16, 0, 3))  # another overlap
    with pytest.raises(ValueError, match="not as .* reads them; read the text again"):
        cache_after(80, old).replan(FitPlan(320, 4, 7, 16, 0, 2))


def test_a_long_conversation_goes_on_from_before_the_last_condensed_window_after_its_turns_filled_the_store():
    """The state before the last condensed window travels with every fork of the stream (every turn's stored
    prefix), so a conversation that outgrows its room turns later, after the store dropped everything but its
    latest turn, still goes on from there, with a fresh read's answer. (A turn within the room reuses the stored
    plan, which condenses no more than a fresh read's would; its answer may differ from a fresh read's.)"""
    cfg = BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-16")
    bm = tiny_beacon_model(cfg, max_position_embeddings=POSITIONS)
    engine = BeaconEngine(bm, max_prefixes=1)
    prompt = _ids(300, seed=3).tolist()
    first_plan = None
    for turn in range(6):
        boundary = len(prompt)
        prompt = prompt + _ids(5, seed=10 + turn).tolist()  # the turn's question
        got = engine.complete(prompt, boundary=boundary, max_new_tokens=3)
        (stored,) = [c for _, c in engine.stored_prefixes()]
        first_plan = first_plan or stored.state.fit_plan
        if stored.state.fit_plan != first_plan:  # this turn outgrew the room: it went on from the kept state
            assert got.usage.cache_read_tokens == (first_plan.condensed_windows - 1) * 16 and turn >= 2
            fresh = BeaconEngine(bm, max_prefixes=0).complete(prompt, boundary=boundary, max_new_tokens=3)
            assert got.token_ids == fresh.token_ids
            break
        assert turn == 0 or got.usage.cache_read_tokens >= 300  # the stored book and earlier turns
        prompt = prompt + got.token_ids
    else:
        pytest.fail("the conversation never outgrew its room")


def test_after_going_on_under_a_larger_plan_later_questions_reuse_the_document_read_under_it(caplog):
    """Once a long question went on under a larger plan, the document is stored under both plans: the outgrown one
    (which could go back before its last condensed window) and the one that fits. Later long questions start from
    the one that lets them read least (the whole document), not again from before the old plan's last window."""
    cfg = BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-8")
    engine = BeaconEngine(tiny_beacon_model(cfg, max_position_embeddings=POSITIONS))
    doc = _ids(300, seed=3).tolist()
    engine.complete(doc + [7, 8, 9], boundary=len(doc), max_new_tokens=3)
    reads = []
    for i in range(3):
        with caplog.at_level("WARNING", logger="beacon_llm.engine"):
            got = engine.complete(doc + _ids(40, seed=4 + i).tolist(), boundary=len(doc), max_new_tokens=6)
        reads.append(got.usage.cache_read_tokens)
    assert reads[0] < len(doc) and reads[1:] == [len(doc), len(doc)]
    assert caplog.text.count("outgrew") == 1


def test_the_kept_state_follows_its_stream_into_a_grown_buffer_instead_of_keeping_the_old_one():
    """The state kept before the last condensed window shares its stream's memory buffer; when the stream outgrows
    that buffer and moves to a larger one, the kept state moves with it (its entries are the first ones copied), so
    no second buffer stays alive for it."""
    cfg = BeaconConfig(window=16, ratios=(2,), ratio_mix="fit-8")
    engine = BeaconEngine(tiny_beacon_model(cfg, max_position_embeddings=1024), max_prefixes=2)
    doc = _ids(1300, seed=1).tolist()
    engine.complete(doc + [7, 8, 9], boundary=len(doc), max_new_tokens=3)
    (stored,) = [c for n, c in engine.stored_prefixes() if n == len(doc)]
    base = stored.replan_base
    assert base is not None and 0 < base.memory_length < stored.memory_length
    assert base._arena is stored._arena  # one buffer for both
    assert all(torch.equal(b, s[:, :, : base.memory_length]) for b, s in zip(base.mem_k, stored.mem_k))
