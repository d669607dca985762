"""Training on a tiny model: loss goes down, only beacons change, resume is bit-identical, data is seeded."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig
from beacon_llm.tasks import IGNORE, SampleStream, make_task, read_corpus
from beacon_llm.testing import tiny_base_model, tiny_beacon_model
from beacon_llm.training import FitTrainConfig, TrainConfig, train, train_fit

TEXT = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry, who was a farmer. " * 40
CFG = BeaconConfig(window=16, ratios=(2, 4, 8), ratio_mix="step-random")


def _run(out, steps, stop_after=None, task_rate=0.3, lr=3e-3):
    bm = tiny_beacon_model(CFG)
    stream = SampleStream([TEXT], bm.tokenizer, 64, task_rate=task_rate, seed=1)
    tcfg = TrainConfig(
        output_dir=str(out), steps=steps, seq_len=64, grad_accum=2, lr=lr, save_every=2, gradient_checkpointing=True
    )
    state = train(bm, stream, tcfg, progress=False, stop_after=stop_after)
    return bm, state


def test_a_few_steps_lower_the_loss_on_a_fixed_batch_and_change_only_beacons(tmp_path):
    bm = tiny_beacon_model(CFG)
    before = {n: p.detach().clone() for n, p in bm.model.named_parameters()}
    ids = bm.tokenizer(TEXT[:80])["input_ids"]

    def loss():
        with torch.no_grad():
            return bm.forward(ids, bm.new_cache(generator=np.random.default_rng(0))).loss.item()

    start = loss()

    class Fixed:  # the same sample again and again
        rng = np.random.default_rng(0)

        def __next__(self):
            from beacon_llm.tasks import Sample

            return Sample(ids, ids, "text")

    train(
        bm,
        Fixed(),
        TrainConfig(output_dir=str(tmp_path), steps=8, seq_len=80, grad_accum=1, lr=1e-2, save_every=100),
        progress=False,
    )
    assert loss() < start - 0.05
    for name, p in bm.model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == ("beacon_" in name and not name.startswith("model.layers.1.self_attn.beacon_q")), name
        assert not p.requires_grad or "beacon_" in name


def test_resume_continues_bit_identically(tmp_path):
    straight, s1 = _run(tmp_path / "a", steps=4)
    _run(tmp_path / "b", steps=4, stop_after=2)
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "final").exists()
    resumed, s2 = _run(tmp_path / "b", steps=4)
    assert [h["loss"] for h in s1.history] == [h["loss"] for h in s2.history]
    ref = dict(straight.model.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in resumed.model.named_parameters())
    # the final adapter round-trips onto a fresh base
    again = beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "b" / "final"))
    assert all(torch.equal(p, ref[n]) for n, p in again.model.named_parameters())


def test_generated_tasks_score_only_the_answer():
    bm = tiny_beacon_model()
    rng = np.random.default_rng(3)
    for kind in ("passkey", "needle", "kv"):
        sample = make_task(kind, TEXT * 3, bm.tokenizer, 600, rng)
        scored = [t for t in sample.labels if t != IGNORE]
        assert 0 < len(scored) < 20 and abs(len(sample.input_ids) - 600) < 120
        answer = bm.tokenizer.decode(scored[:-1])
        assert answer in bm.tokenizer.decode(sample.input_ids[: sample.labels.index(scored[0])])
    a = [next(SampleStream([TEXT], bm.tokenizer, 64, task_rate=0.5, seed=9)).input_ids for _ in range(2)]
    assert a[0] == a[1]  # seeded


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus([tmp_path / "none.txt"])
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="x.jsonl:1: JSONL records need to be objects with a 'text' field"):
        read_corpus([bad])
    blank = tmp_path / "blank.jsonl"
    blank.write_text('\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="blank.jsonl: no training text in it"):
        read_corpus([blank])
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffOnce upon a time.".encode())
    assert read_corpus([bom]) == ["Once upon a time."]
    for value in ("null", "42", '["a", "b"]'):
        (tmp_path / "typed.jsonl").write_text(f'{{"text": "fine"}}\n{{"text": {value}}}\n')
        with pytest.raises(ValueError, match=r"typed.jsonl:2: the 'text' field is .* not a string"):
            read_corpus([tmp_path / "typed.jsonl"])
    (tmp_path / "UPPER.JSONL").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_corpus([tmp_path / "UPPER.JSONL"]) == ["one", "two"]
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(output_dir=str(tmp_path), steps=0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"task_rate": 2.0}, r"task_rate=2.0 must be within \[0, 1\]"),
        ({"task_rate": -0.1}, r"task_rate=-0.1 must be within \[0, 1\]"),
        ({"task_rate": NAN}, r"task_rate=nan must be within \[0, 1\]"),
        ({"lr": NAN}, "lr=nan must be a finite number > 0"),
        ({"lr": INF}, "lr=inf must be a finite number > 0"),
        ({"lr": 0.0}, "lr=0.0 must be a finite number > 0"),
        ({"max_grad_norm": NAN}, "max_grad_norm=nan must be a finite number >= 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0 must be a finite number >= 0"),
        ({"weight_decay": NAN}, "weight_decay=nan must be a finite number >= 0"),
        ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
    ],
)
def test_train_config_refuses_out_of_range_and_nan_values(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir=str(tmp_path), **fields)


@pytest.mark.parametrize("fields", [{}, {"task_rate": 0.0}, {"task_rate": 1.0}, {"max_grad_norm": 0.0}])
def test_train_config_accepts_the_bounds(tmp_path, fields):
    TrainConfig(output_dir=str(tmp_path), **fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lr": NAN}, "lr=nan must be a finite number > 0"),
        ({"lr": -1e-4}, "lr=-0.0001 must be a finite number > 0"),
        ({"max_grad_norm": NAN}, "max_grad_norm=nan must be a finite number >= 0"),
        ({"warmup_steps": -2}, "warmup_steps=-2 must be >= 0"),
        ({"kl_weight": NAN}, "kl_weight=nan and ce_weight=0.0 must be finite and >= 0"),
        ({"ce_weight": INF}, "kl_weight=1.0 and ce_weight=inf must be finite and >= 0"),
    ],
)
def test_fit_train_config_refuses_nan_and_out_of_range_values(fields, message):
    with pytest.raises(ValueError, match=message):
        FitTrainConfig(output_dir="x", seq_len=128, positions=64, **fields)


def _run_fit(out):
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4, 8), ratio_mix="fit-0"), max_position_embeddings=256)
    cfg = FitTrainConfig(output_dir=str(out), steps=1, seq_len=128, positions=64, ratios=(4,), grad_accum=1,
                         kl_weight=0.0, ce_weight=1.0, save_every=1)  # fmt: skip
    return train_fit(bm, SampleStream([TEXT], bm.tokenizer, 128, seed=1), cfg, teacher=None)


@pytest.mark.parametrize("run", [lambda out: _run(out, steps=1)[1], _run_fit], ids=["train", "train_fit"])
def test_history_is_replaced_by_rename_not_rewritten_in_place(tmp_path, run):
    out = tmp_path / "run"
    out.mkdir()
    old = tmp_path / "old-history.json"
    old.write_text('[{"step": 0}]')
    os.link(old, out / "history.json")  # a reader holding the previous file keeps reading it whole
    state = run(out)
    assert old.read_text() == '[{"step": 0}]'
    assert json.loads((out / "history.json").read_text()) == json.loads(json.dumps(state.history))
    assert len(state.history) == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "accum, precision, message",
    [
        (2, "no", None),
        (1, "no", r"gradient_accumulation_steps=1 and mixed_precision='no', the config grad_accum=2"),
        (2, "bf16", r"mixed_precision='bf16', the config grad_accum=2 and mixed_precision='no'"),
        (8, "fp16", r"create it with Accelerator\(gradient_accumulation_steps=2, mixed_precision='no'\)"),
    ],
)
def test_check_accelerator(tmp_path, accum, precision, message):
    from types import SimpleNamespace

    from beacon_llm.training import _check_accelerator

    accelerator = SimpleNamespace(gradient_accumulation_steps=accum, mixed_precision=precision)
    cfg = TrainConfig(output_dir=str(tmp_path), grad_accum=2, mixed_precision="no")
    if message is None:
        _check_accelerator(accelerator, cfg)
    else:
        with pytest.raises(ValueError, match=message):
            _check_accelerator(accelerator, cfg)


def test_train_refuses_an_accelerator_that_would_ignore_the_config_before_anything_changes(tmp_path):
    """A caller's Accelerator steps the optimiser: one set for another accumulation (or precision) than the config
    would silently train another schedule, so it is refused before the output folder or the model change."""
    from types import SimpleNamespace

    bm = tiny_beacon_model(CFG)
    stream = SampleStream([TEXT], bm.tokenizer, 64, seed=1)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), steps=2, seq_len=64, grad_accum=4, gradient_checkpointing=False)
    accelerator = SimpleNamespace(gradient_accumulation_steps=1, mixed_precision="no")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1 .* grad_accum=4"):
        train(bm, stream, cfg, progress=False, resume=False, accelerator=accelerator)
    assert not (tmp_path / "run").exists() and all(p.requires_grad for p in bm.model.parameters())


def _run_fit_steps(out, steps):
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4, 8), ratio_mix="fit-0"), max_position_embeddings=256)
    cfg = FitTrainConfig(output_dir=str(out), steps=steps, seq_len=128, positions=64, ratios=(4,), grad_accum=1,
                         kl_weight=0.0, ce_weight=1.0, save_every=100)  # fmt: skip
    return bm, train_fit(bm, SampleStream([TEXT], bm.tokenizer, 128, seed=1), cfg, teacher=None)


def _run_steps(out, steps):
    bm = tiny_beacon_model(CFG)
    cfg = TrainConfig(output_dir=str(out), steps=steps, seq_len=64, grad_accum=1, lr=1e-2, save_every=100,
                      gradient_checkpointing=False)  # fmt: skip
    return bm, train(bm, SampleStream([TEXT], bm.tokenizer, 64, seed=1), cfg, progress=False)


@pytest.mark.parametrize("run", [_run_steps, _run_fit_steps], ids=["train", "train_fit"])
def test_an_output_dir_with_a_checkpoint_past_steps_is_refused(tmp_path, run):
    """Resuming a checkpoint past ``steps`` would train nothing and write no final adapter: refused, naming the
    checkpoint's step, the steps asked for and the fix; ``steps`` at or beyond it continues as before."""
    out = tmp_path / "run"
    run(out, 3)
    (out / "history.json").unlink()
    shutil.rmtree(out / "final")
    with pytest.raises(ValueError, match=r"checkpoint-3 holds a run at step 3, past steps=2: give a new output_dir"):
        run(out, 2)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]
    _, state = run(out, 3)  # a finished run asked again: nothing to train, its final adapter written again
    assert state.step == 3 and (out / "final").is_dir()
