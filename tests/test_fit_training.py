"""Training in the fit regime (condensed oldest windows, raw tail) with distillation from the plain model."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.distill import TailReferenceStore, TeacherStore, distance_gain, distance_weights, topk_kl
from beacon_llm.layers import is_beacon_parameter
from beacon_llm.schedule import condensing_plan, fit_plan
from beacon_llm.tasks import IGNORE, SampleStream, make_condensed_recall, make_condensed_spans
from beacon_llm.testing import tiny_beacon_model, tiny_tokenizer
from beacon_llm.training import FitTrainConfig, draw_recall_sample, evaluate_fit, recall_loss, tail_loss, train_fit

TEXT = "the keeper of the lighthouse wrote every ship in a red book and slept at dawn. " * 40
CFG = BeaconConfig(window=16, ratios=(4, 8), ratio_mix="fit-0")


@pytest.mark.parametrize("k", [40, 8, 1])
def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise(k):
    logits = 3 * torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    top = torch.log_softmax(logits, -1).topk(k, -1)
    assert torch.allclose(topk_kl(logits, top.indices, top.values), torch.zeros(5), atol=1e-5)
    assert (topk_kl(logits.flip(-1), top.indices, top.values) > 0.01).all()
    if k == 40:  # all tokens: the full KL
        full = torch.nn.functional.kl_div(torch.log_softmax(logits.flip(-1), -1), torch.log_softmax(logits, -1),
                                          log_target=True, reduction="none").sum(-1)  # fmt: skip
        assert torch.allclose(topk_kl(logits.flip(-1), top.indices, top.values), full, atol=1e-4)


def test_teacher_store_computes_once_and_reloads_the_same(tmp_path):
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    store = TeacherStore(bm.model, tmp_path / "teacher", k=8)
    ids = list(range(4, 84))
    a = store.get(ids, 50)
    assert len(list((tmp_path / "teacher").glob("*.safetensors"))) == 1
    b = store.get(ids, 50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (30, 8)
    with torch.no_grad():
        plain = torch.log_softmax(bm.model(input_ids=torch.tensor([ids])).logits[0, 49:-1], -1)
    assert torch.equal(plain.argmax(-1), a[0][:, 0])
    with pytest.raises(ValueError, match="start=0"):
        store.compute(ids, 0)


def test_tail_loss_reaches_the_beacons_and_matches_the_teacher_when_nothing_is_condensed(tmp_path):
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    store = TeacherStore(bm.model, tmp_path / "t", k=16)
    ids = list(range(4, 100))
    plan = fit_plan(CFG, len(ids), 64, ratio=4)  # condense the first windows as if there were 64 positions
    assert plan.condensed_windows > 0
    bm.mark_only_beacon_trainable()
    bm.model.train()
    loss, parts = tail_loss(bm, ids, plan, store.get(ids, plan.raw_from), 1.0, 0.5)
    loss.backward()
    grads = [p.grad for n, p in bm.model.named_parameters() if "beacon_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the tail reads the beacons
    assert parts["kl"] > 0 and parts["tokens"] == len(ids) - plan.raw_from


def test_train_fit_lowers_the_held_out_kl_and_resumes(tmp_path):
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    tok = tiny_tokenizer()
    store = TeacherStore(bm.model, tmp_path / "teacher", k=16)
    held = [tok(TEXT[i : i + 200])["input_ids"][:128] for i in (7, 300)]
    before = evaluate_fit(bm, held, 64, 4, store)
    cfg = FitTrainConfig(output_dir=str(tmp_path / "run"), steps=6, seq_len=128, positions=64, ratios=(4,),
                         grad_accum=2, lr=3e-3, warmup_steps=0, save_every=3)  # fmt: skip
    state = train_fit(bm, SampleStream([TEXT], tok, 128, seed=1), cfg, store)
    after = evaluate_fit(bm, held, 64, 4, store)
    assert state.step == 6 and state.tokens == 6 * 2 * 128
    assert after["kl"] < before["kl"]
    assert (tmp_path / "run" / "final" / "beacon_config.json").is_file()
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 6
    again = tiny_beacon_model(CFG, max_position_embeddings=256)
    cfg.steps = 6
    state2 = train_fit(again, SampleStream([TEXT], tok, 128, seed=1), cfg, store)  # resumes at the last checkpoint
    assert state2.step == 6 and len(state2.history) == 6


def test_grad_sync_sees_every_step_before_the_update_and_can_end_training(tmp_path):
    """The data-parallel hook: called once per step with the trainable parameters and their summed gradients (what
    it leaves there is what the optimiser applies: zeroed gradients leave the beacons as they were), and True from it
    ends training after that step, with a checkpoint and the final adapter."""
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    tok = tiny_tokenizer()
    store = TeacherStore(bm.model, tmp_path / "teacher", k=16)
    trainable = {n for n, _ in bm.model.named_parameters() if is_beacon_parameter(n)}
    before = {n: p.detach().clone() for n, p in bm.model.named_parameters() if n in trainable}
    calls: list[int] = []

    def freeze_and_stop(params):
        assert {id(p) for p in params} == {id(p) for n, p in bm.model.named_parameters() if n in trainable}
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        calls.append(1)
        return len(calls) == 3

    cfg = FitTrainConfig(output_dir=str(tmp_path / "run"), steps=10, seq_len=128, positions=64, ratios=(4,),
                         grad_accum=1, lr=3e-3, warmup_steps=0, save_every=100)  # fmt: skip
    state = train_fit(bm, SampleStream([TEXT], tok, 128, seed=1), cfg, store, grad_sync=freeze_and_stop)
    assert len(calls) == 3 and state.step == 3
    run = tmp_path / "run"
    assert (run / "checkpoint-3").is_dir() and (run / "final" / "beacon_config.json").is_file()
    for n, p in bm.model.named_parameters():
        if n in trainable:
            assert torch.equal(p.detach(), before[n]), n


# ---------------------------------------------------------------- distance-weighted KL (distant_weight)
@pytest.mark.parametrize(
    "gain, mix, expected",
    [
        ([1.0, 1.0, 1.0, 1.0], 0.8, [1.0, 1.0, 1.0, 1.0]),  # equal gains: uniform at any mix
        ([0.0, 0.0, 2.0, 2.0], 1.0, [0.0, 0.0, 2.0, 2.0]),  # mix 1: g / mean(g)
        ([0.0, 0.0, 2.0, 2.0], 0.0, [1.0, 1.0, 1.0, 1.0]),  # mix 0: the plain mean
        ([0.0, 0.0, 2.0, 2.0], 0.5, [0.5, 0.5, 1.5, 1.5]),  # (1 - mix) + mix * g / mean(g)
        ([0.0, 0.0, 0.0, 4.0], 0.8, [0.2, 0.2, 0.2, 3.4]),
        ([0.0, 0.0, 0.0], 0.8, [1.0, 1.0, 1.0]),  # no gain anywhere: uniform, not NaN
    ],
)
def test_distance_weights_table(gain, mix, expected):
    w = distance_weights(torch.tensor(gain), mix)
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)
    assert abs(float(w.mean()) - 1.0) < 1e-6  # the loss keeps its scale


@pytest.mark.parametrize("mix", [-0.1, 1.5, float("nan")])
def test_distance_weights_rejects_a_mix_outside_0_1(mix):
    with pytest.raises(ValueError, match="mix="):
        distance_weights(torch.ones(3), mix)


@pytest.mark.parametrize(
    "fields, message",
    [({"distant_weight": -0.1}, "distant_weight=-0.1"), ({"distant_weight": 1.2}, "distant_weight=1.2"),
     ({"distant_weight": float("nan")}, "distant_weight=nan"),
     ({"distant_weight": 0.5, "kl_weight": 0.0, "ce_weight": 1.0}, "needs kl_weight")],
)  # fmt: skip
def test_fit_config_validates_distant_weight(fields, message):
    with pytest.raises(ValueError, match=message):
        FitTrainConfig(output_dir="x", seq_len=128, positions=64, **fields)


def test_distance_gain_is_topk_kl_of_the_tail_only_model_and_is_stored_once(tmp_path):
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    teacher = TeacherStore(bm.model, tmp_path / "teacher", k=8)
    ref = TailReferenceStore(bm.model, tmp_path / "ref", context=1)
    ids = list(range(4, 100))
    idx, logp = teacher.get(ids, 60)
    a = ref.get(ids, 60, idx)
    assert torch.equal(a, ref.get(ids, 60, idx)) and len(list((tmp_path / "ref").glob("*.safetensors"))) == 1
    with torch.no_grad():  # the one token before the tail + the tail, as the "tail only" baseline reads it
        logits = bm.model(input_ids=torch.tensor([ids[59:]])).logits[0, :-1]
    gain = distance_gain(logp, a)
    assert torch.allclose(gain, topk_kl(logits, idx, logp).clamp(min=0), atol=1e-6) and gain.shape == (36,)
    assert float(gain.mean()) > 0  # the tiny model's far context matters to it
    wide = TailReferenceStore(bm.model, tmp_path / "ref", context=8).get(ids, 60, idx)  # another key
    assert len(list((tmp_path / "ref").glob("*.safetensors"))) == 2 and not torch.equal(wide, a)
    with pytest.raises(ValueError, match="indices cover"):
        ref.compute(ids, 61, idx)


def test_tail_loss_weights_sum_w_kl_over_t(tmp_path):
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    teacher = TeacherStore(bm.model, tmp_path / "t", k=16)
    ids = list(range(4, 100))
    plan = fit_plan(CFG, len(ids), 64, ratio=4)
    targets = teacher.get(ids, plan.raw_from)
    t = len(ids) - plan.raw_from
    with torch.no_grad():
        plain, parts = tail_loss(bm, ids, plan, targets, 1.0, 0.0)
        ones, _ = tail_loss(bm, ids, plan, targets, 1.0, 0.0, kl_token_weights=torch.ones(t))
        w = torch.zeros(t)
        w[3] = float(t)  # all the weight on one token: its KL
        one, parts_w = tail_loss(bm, ids, plan, targets, 1.0, 0.0, kl_token_weights=w)
        late, _ = tail_loss(bm, ids, plan, targets, 1.0, 0.0, score_from=3, kl_token_weights=w)
    assert float(plain) == parts["kl"] and torch.allclose(ones, plain, atol=1e-6)
    assert parts_w["kl"] == parts["kl"] and float(one) == parts_w["kl_weighted"] != parts["kl"]
    assert torch.allclose(late, one * t / (t - 3), atol=1e-5)  # weights sliced with the scored tokens: w[3] / (T - 3)


class _Unused:
    def get(self, *args):
        raise AssertionError("distant_weight=0 must not read the reference")


def test_distant_weight_0_trains_exactly_as_before_and_above_0_needs_a_reference(tmp_path):
    tok = tiny_tokenizer()
    histories = []
    for name, reference in (("a", None), ("b", _Unused())):
        bm = tiny_beacon_model(CFG, max_position_embeddings=256)
        store = TeacherStore(bm.model, tmp_path / "teacher", k=16)
        cfg = FitTrainConfig(output_dir=str(tmp_path / name), steps=2, seq_len=128, positions=64, ratios=(4,),
                             grad_accum=2, lr=3e-3, save_every=2, distant_weight=0.0)  # fmt: skip
        state = train_fit(bm, SampleStream([TEXT], tok, 128, seed=1), cfg, store, reference)
        histories.append([{k: v for k, v in h.items() if k != "tok_per_s"} for h in state.history])
    assert histories[0] == histories[1]
    assert all(h["loss"] == h["kl"] for h in histories[0])  # the plain mean KL, unweighted
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    store = TeacherStore(bm.model, tmp_path / "teacher", k=16)
    cfg = FitTrainConfig(output_dir=str(tmp_path / "c"), steps=2, seq_len=128, positions=64, ratios=(4,),
                         grad_accum=2, lr=3e-3, save_every=2, distant_weight=0.8)  # fmt: skip
    with pytest.raises(ValueError, match="tail-only reference"):
        train_fit(bm, SampleStream([TEXT], tok, 128, seed=1), cfg, store)
    ref = TailReferenceStore(bm.model, tmp_path / "ref")
    state = train_fit(bm, SampleStream([TEXT], tok, 128, seed=1), cfg, store, ref)
    assert state.step == 2 and state.history[0]["loss"] != state.history[0]["kl"]  # weighted, kl stays the mean
    assert len(list((tmp_path / "ref").glob("*.safetensors"))) == 4  # one per sample


# ---------------------------------------------------------------- facts carried by the condensed windows (recall_*)
@pytest.mark.parametrize(
    "kind, windows, keep_raw, raw_head",
    [("passkey", 4, 0, 0), ("needle", 4, 8, 0), ("passkey", 1, 8, 4), ("needle", 6, 16, 16)],
)
def test_condensed_recall_plants_the_fact_inside_the_condensed_part_and_labels_only_the_value(
    kind, windows, keep_raw, raw_head
):
    tok = tiny_tokenizer()
    filler = tok(TEXT)["input_ids"]
    sample, used = make_condensed_recall(kind, filler, tok, window=32, windows=windows, tail=20, keep_raw=keep_raw,
                                         raw_head=raw_head, rng=np.random.default_rng(3))  # fmt: skip
    text = tok.decode(sample.input_ids)
    value = tok.decode([t for t in sample.labels if t != IGNORE])
    fact = " The pass key is" if kind == "passkey" else " The special magic number of"
    at = len(tok(text[: text.index(fact)])["input_ids"])  # the tiny tokenizer is one token per character
    fact_len = text.index(".", text.index(fact)) + 1 - text.index(fact)
    assert used >= windows and used * 32 >= raw_head + fact_len + keep_raw  # more windows only when the fact needs them
    assert raw_head <= at and at + fact_len <= used * 32 - keep_raw  # inside the condensed part, outside the overlap
    assert value.strip().isdigit() and text.endswith(value + ".") and value.strip() in text[: used * 32]
    assert sample.labels.count(IGNORE) == len(sample.labels) - len(value)


@pytest.mark.parametrize(
    "windows, keep_raw, raw_head, pairs, cue, span, used",
    [(1, 0, 0, 2, 4, 8, 1),    # 24 of 32 tokens asked for
     (1, 8, 4, 2, 4, 8, 2),    # 4 + 24 + 8 > 32: one more window
     (3, 16, 0, 3, 2, 6, 3),   # room to spare: the windows asked for
     (2, 8, 8, 5, 4, 8, 3)],   # 8 + 60 + 8 > 64
)  # fmt: skip
def test_condensed_spans_ask_for_text_only_the_beacons_hold_and_label_only_the_spans(
    windows, keep_raw, raw_head, pairs, cue, span, used
):
    filler = list(range(1000, 1400))  # every token distinct: a copied piece names where it came from
    for seed in range(5):
        sample, got = make_condensed_spans(filler, window=32, windows=windows, tail=10, keep_raw=keep_raw,
                                           raw_head=raw_head, pairs=pairs, cue=cue, span=span,
                                           rng=np.random.default_rng(seed))  # fmt: skip
        assert got == used and sample.kind == "span"
        body = used * 32 + 10
        ids, labels = sample.input_ids, sample.labels
        assert ids[:body] == filler[ids[0] - 1000 : ids[0] - 1000 + body]  # a slice of the text, then the pairs
        assert labels[:body] == [IGNORE] * body and len(ids) == body + pairs * (cue + span)
        starts = []
        for k in range(pairs):
            piece = ids[body + k * (cue + span) : body + (k + 1) * (cue + span)]
            at = ids.index(piece[0])
            assert ids[at : at + cue + span] == piece  # cue and span as the condensed text has them
            assert raw_head <= at and at + cue + span <= used * 32 - keep_raw  # outside sink and overlap
            assert labels[body + k * (cue + span) :][: cue + span] == [IGNORE] * cue + piece[cue:]
            starts.append(at)
        starts.sort()
        assert all(b - a >= cue + span for a, b in zip(starts, starts[1:]))  # no two pairs overlap


@pytest.mark.parametrize(
    "kwargs, message",
    [({"pairs": 0}, "pairs=0"), ({"span": 0}, "span=0"), ({"windows": 20}, "filler text has 400 tokens")],
)
def test_condensed_spans_reject_impossible_requests(kwargs, message):
    args = {"window": 32, "windows": 1, "tail": 0, "keep_raw": 0, "rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ValueError, match=message):
        make_condensed_spans(list(range(1000, 1400)), **args)


def test_span_training_draws_span_samples_and_lowers_their_loss(tmp_path):
    """``recall_tasks=("span",)`` draws span samples (labels after the condensed windows) and trains on them."""
    bm, stream, cfg = _recall_run(tmp_path, steps=6, save_every=6, recall_windows=2, recall_tail=8,
                                  recall_tasks=("span",), span_pairs=2, span_cue=3, span_tokens=5)  # fmt: skip
    held = [draw_recall_sample(replace(cfg, seed=99), bm, stream, i) for i in range(3)]
    for sample, plan in held:
        at = [i for i, label in enumerate(sample.labels) if label != IGNORE]
        assert sample.kind == "span" and len(at) == 10 and at[0] >= plan.raw_from
        assert plan.condensed_windows * CFG.window >= 2 * 8 + CFG.fit_overlap

    def span_nll() -> float:
        with torch.no_grad():
            return sum(recall_loss(bm, s, p)[1]["nll"] for s, p in held) / len(held)

    before = span_nll()
    state = train_fit(bm, stream, cfg, teacher=None)
    assert all(0.0 <= h["recall_token_acc"] <= 1.0 and h["recall_samples"] == 2 for h in state.history)
    assert span_nll() < before


@pytest.mark.parametrize(
    "length, windows, ratio",
    [(32, 2, 4), (100, 0, 4), (100, 1, 0)],  # nothing raw left / no window / no ratio
)
def test_condensing_plan_rejects_plans_without_condensed_or_raw_tokens(length, windows, ratio):
    with pytest.raises(ValueError, match=f"windows={windows}"):
        condensing_plan(CFG, length, windows, ratio)


def test_condensing_plan_condenses_exactly_the_windows_asked_for():
    plan = condensing_plan(CFG, 150, 3, 4)
    assert (plan.condensed_windows, plan.raw_from, plan.ratio, plan.overlap) == (3, 3 * CFG.window, 4, CFG.fit_overlap)


@pytest.mark.parametrize(
    "fields, message",
    [({"recall_rate": 1.5}, "recall_rate=1.5"), ({"recall_rate": float("nan")}, "recall_rate=nan"),
     ({"recall_rate": 0.5, "recall_windows": 0}, "recall_windows=0"),
     ({"recall_rate": 0.5, "recall_tail": -1}, "recall_tail=-1"),
     ({"recall_rate": 0.5, "recall_weight": 0.0}, "recall_weight=0.0"),
     ({"recall_rate": 0.5, "recall_tasks": ("kv",)}, "recall_tasks="),
     ({"recall_rate": 0.5, "recall_tasks": ("span",), "span_pairs": 0}, "span_pairs=0"),
     ({"recall_rate": 0.5, "span_tokens": 0}, "span_tokens=0"),
     ({"recall_rate": 0.5, "kl_weight": 0.0}, "not both 0")],
)  # fmt: skip
def test_fit_config_validates_recall(fields, message):
    with pytest.raises(ValueError, match=message):
        FitTrainConfig(output_dir="x", seq_len=128, positions=64, **fields)


def _recall_run(tmp_path, **fields):
    """A tiny model, its text stream and a recall-only training config (``fields`` override it)."""
    bm = tiny_beacon_model(CFG, max_position_embeddings=512)
    stream = SampleStream([TEXT], tiny_tokenizer(), 128, seed=1)
    cfg = FitTrainConfig(**{"output_dir": str(tmp_path / "run"), "seq_len": 128, "positions": 64, "ratios": (4,),
                            "grad_accum": 2, "lr": 3e-3, "warmup_steps": 0, "kl_weight": 0.0, "recall_rate": 1.0,
                            **fields})  # fmt: skip
    return bm, stream, cfg


def test_recall_training_draws_by_sample_index_lowers_the_value_loss_and_needs_no_teacher(tmp_path):
    bm, stream, cfg = _recall_run(tmp_path, steps=8, save_every=4, recall_windows=3, recall_tail=16)
    first = [draw_recall_sample(cfg, bm, stream, i) for i in range(4)]
    again = [draw_recall_sample(cfg, bm, stream, i) for i in range(4)]
    assert [s.input_ids for s, _ in first] == [s.input_ids for s, _ in again]  # a resumed run draws the same
    assert draw_recall_sample(replace(cfg, recall_rate=0.0, kl_weight=1.0), bm, stream, 0) == (None, None)
    held = [draw_recall_sample(replace(cfg, seed=99), bm, stream, i) for i in range(4)]

    def value_nll() -> float:
        with torch.no_grad():
            return sum(recall_loss(bm, s, p)[1]["nll"] for s, p in held) / len(held)

    before = value_nll()
    state = train_fit(bm, stream, cfg, teacher=None)
    assert state.step == 8 and all("recall_nll" in h and h["recall_samples"] == 2 for h in state.history)
    assert value_nll() < before


def test_recall_loss_needs_the_value_after_the_condensed_windows():
    bm = tiny_beacon_model(CFG, max_position_embeddings=512)
    tok = tiny_tokenizer()
    sample, used = make_condensed_recall("passkey", tok(TEXT)["input_ids"], tok, window=CFG.window, windows=3, tail=8,
                                         keep_raw=CFG.fit_overlap, rng=np.random.default_rng(0))  # fmt: skip
    _, parts = recall_loss(bm, sample, condensing_plan(CFG, len(sample.input_ids), used, 4))
    assert parts["tokens"] == 6 and parts["exact"] in (0.0, 1.0) and parts["nll"] > 0  # " " + five digits
    plan = condensing_plan(CFG, len(sample.input_ids), used, 4)
    n = len(sample.input_ids)
    early = [IGNORE] * n
    early[10] = sample.input_ids[10]  # a labelled token inside the condensed windows
    for labels in (early, [IGNORE] * n):
        with pytest.raises(ValueError, match="after its condensed windows"):
            recall_loss(bm, replace(sample, labels=labels), plan)


# ---------------------------------------------------------------- fit training input and resume
SHORT = "a short text of fifty characters, well under 64.."  # 49 tokens with the tiny tokenizer


class _CountedStream(SampleStream):
    """A SampleStream that counts its draws and fails past ``limit`` (so a training loop that would redraw forever
    fails instead of hanging); ``only_short``: every draw is the first text, whatever ``token_texts`` holds."""

    def __init__(self, texts, limit=2000, only_short=False):
        super().__init__(texts, tiny_tokenizer(), 128, seed=1)
        self.draws, self.limit, self.only_short = 0, limit, only_short

    def __next__(self):
        self.draws += 1
        assert self.draws <= self.limit, f"{self.draws} draws: the training loop redraws without end"
        sample = super().__next__()
        if self.only_short:
            ids = self.token_texts[0]
            return replace(sample, input_ids=list(ids), labels=list(ids))
        return sample


@pytest.mark.parametrize(
    "lengths, positions, share",
    [
        ([10, 80, 90, 20], 64, 0.5),
        ([65], 64, 1.0),
        ([64, 200, 30], 64, 1 / 3),
        ([64, 30], 64, "the longest training text has 64 tokens"),  # a text of exactly positions tokens is short
        ([5], 4096, "positions=4096 tokens, but the longest training text has 5 tokens"),
    ],
)
def test_long_text_share(lengths, positions, share):
    from types import SimpleNamespace

    from beacon_llm.training import _long_text_share

    stream = SimpleNamespace(token_texts=[[7] * n for n in lengths])
    if isinstance(share, str):
        with pytest.raises(ValueError, match=share):
            _long_text_share(stream, positions)
    else:
        assert _long_text_share(stream, positions) == pytest.approx(share)


def test_train_fit_refuses_a_corpus_without_a_text_longer_than_positions_before_training(tmp_path):
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    stream = _CountedStream([SHORT])
    cfg = FitTrainConfig(output_dir=str(tmp_path / "run"), steps=2, seq_len=128, positions=64, ratios=(4,),
                         grad_accum=1, kl_weight=0.0, ce_weight=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="positions=64 tokens, but the longest training text has 49 tokens"):
        train_fit(bm, stream, cfg, teacher=None)
    assert stream.draws == 0 and not (tmp_path / "run").exists()
    assert all(p.requires_grad for p in bm.model.parameters())  # not yet frozen for training


def test_train_fit_redraws_short_texts_a_bounded_number_of_times(tmp_path):
    """A stream that keeps giving short texts although it holds a long one ends training with an error: half the
    texts are long, so 100 short draws in a row (odds 2**-100 for a fair stream) are the cap."""
    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    stream = _CountedStream([SHORT, TEXT], limit=1000, only_short=True)
    cfg = FitTrainConfig(output_dir=str(tmp_path / "run"), steps=2, seq_len=128, positions=64, ratios=(4,),
                         grad_accum=1, kl_weight=0.0, ce_weight=1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="100 texts in a row had no more than positions=64 tokens"):
        train_fit(bm, stream, cfg, teacher=None)
    assert stream.draws == 100


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-weights", "training"])
def test_a_stopped_and_resumed_recall_run_draws_the_same_ratios_and_losses(tmp_path, monkeypatch, frozen):
    """With recall samples among the text ones, a run stopped after step 3 and resumed draws the same compression
    ratios as a straight run. Frozen weights (zeroed gradients): every step's loss depends on the draws alone and
    all match. Training: the optimiser moments are saved and restored, so every loss matches too."""
    import beacon_llm.schedule as schedule

    ratios: list[int] = []
    plain = schedule.fit_plan

    def spy(config, length, positions, ratio=None, **kw):
        ratios.append(ratio)
        return plain(config, length, positions, ratio=ratio, **kw)

    monkeypatch.setattr(schedule, "fit_plan", spy)

    def run(out, stop_at=None):
        calls: list[int] = []

        def sync(params):
            if frozen:
                for p in params:
                    if p.grad is not None:
                        p.grad.zero_()
            calls.append(1)
            return len(calls) == stop_at

        cfg = FitTrainConfig(output_dir=str(out), steps=6, seq_len=128, positions=64, ratios=(4, 8), grad_accum=2,
                             lr=3e-3, warmup_steps=0, save_every=100, kl_weight=0.0, ce_weight=1.0, recall_rate=0.5,
                             recall_windows=2, recall_tail=16)  # fmt: skip
        bm = tiny_beacon_model(CFG, max_position_embeddings=256)
        state = train_fit(bm, SampleStream([TEXT], tiny_tokenizer(), 128, seed=1), cfg, teacher=None, grad_sync=sync)
        return [h["loss"] for h in state.history]

    straight = run(tmp_path / "straight")
    straight_ratios = list(ratios)
    ratios.clear()
    run(tmp_path / "resumed", stop_at=3)
    resumed = run(tmp_path / "resumed")
    assert 0 < straight_ratios.count(4) < len(straight_ratios) < 12  # both ratios drawn, recall samples among them
    assert ratios == straight_ratios
    assert resumed == straight


def test_teacher_store_keys_targets_by_the_teachers_base_weights(tmp_path):
    """Two teachers of one config with other weights keep their own targets; a base weight changed in place gets
    new ones; the beacon parameters (which the plain forward never reads) do not count."""
    from beacon_llm.testing import tiny_base_model

    folder = tmp_path / "teacher"
    ids = list(range(4, 68))
    a, b = tiny_base_model(seed=0), tiny_base_model(seed=1)
    got_a = TeacherStore(a, folder, k=8).get(ids, 32)
    got_b = TeacherStore(b, folder, k=8).get(ids, 32)
    assert torch.equal(got_b[1], TeacherStore(b, folder, k=8).compute(ids, 32)[1])
    assert not torch.equal(got_a[1], got_b[1])
    assert len(list(folder.glob("*.safetensors"))) == 2
    with torch.no_grad():
        b.lm_head.weight.mul_(2.0)
    assert torch.equal(TeacherStore(b, folder, k=8).get(ids, 32)[1], TeacherStore(b, folder, k=8).compute(ids, 32)[1])
    assert len(list(folder.glob("*.safetensors"))) == 3

    bm = tiny_beacon_model(CFG, max_position_embeddings=256)
    store = TeacherStore(bm.model, tmp_path / "own", k=8)
    store.get(ids, 32)
    with torch.no_grad():
        next(p for n, p in bm.model.named_parameters() if is_beacon_parameter(n)).add_(1.0)
    store.get(ids, 32)
    assert len(list((tmp_path / "own").glob("*.safetensors"))) == 1


def test_a_fit_checkpoint_keeps_the_optimiser_moments_and_refuses_another_models(tmp_path, caplog):
    """Each ``checkpoint-<step>`` holds the AdamW moments of every trained parameter; a checkpoint without them (an
    older one) resumes with a warning; moments of another shape (another model) are refused, naming the file."""
    from safetensors.torch import load_file, save_file

    from beacon_llm.training import OPTIM_NAME

    def cfg(out, steps):
        return FitTrainConfig(output_dir=str(out), steps=steps, seq_len=128, positions=64, ratios=(4,), grad_accum=1,
                              save_every=1, kl_weight=0.0, ce_weight=1.0)  # fmt: skip

    def fit(out, steps):
        bm = tiny_beacon_model(CFG, max_position_embeddings=256)
        return train_fit(bm, SampleStream([TEXT], tiny_tokenizer(), 128, seed=1), cfg(out, steps), teacher=None), bm

    _, bm = fit(tmp_path / "run", 1)
    moments = load_file(str(tmp_path / "run" / "checkpoint-1" / OPTIM_NAME))
    trained = [n for n, p in bm.model.named_parameters() if p.requires_grad]
    expected = [f"{n}::{k}" for n in trained for k in ("exp_avg", "exp_avg_sq", "step")]
    assert trained and sorted(moments) == sorted(expected)
    (tmp_path / "run" / "checkpoint-1" / OPTIM_NAME).unlink()
    with caplog.at_level("WARNING", logger="beacon_llm.training"):
        state, _ = fit(tmp_path / "run", 2)
    assert state.step == 2 and "the optimiser moments restart" in caplog.text
    name = next(k for k in moments if k.endswith("::exp_avg"))
    moments[name] = torch.zeros(3, 3)
    save_file(moments, str(tmp_path / "run" / "checkpoint-2" / OPTIM_NAME))
    with pytest.raises(ValueError, match=rf"checkpoint-2/{OPTIM_NAME}: the optimiser moments .* do not fit"):
        fit(tmp_path / "run", 3)
