"""Training in the fit regime (condensed oldest windows, raw tail) with distillation from the plain model."""

import json

import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.distill import TeacherStore, topk_kl
from beacon_llm.schedule import fit_plan
from beacon_llm.tasks import SampleStream
from beacon_llm.testing import tiny_beacon_model, tiny_tokenizer
from beacon_llm.training import FitTrainConfig, evaluate_fit, tail_loss, train_fit

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
