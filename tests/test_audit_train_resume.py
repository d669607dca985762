"""train(): what a run may silently get wrong before its first step (audit): a fresh run in a folder of an earlier
one, an accumulation the launcher overrides, a beacon config whose schedule trains no beacon."""

import pytest
import torch

from beacon_llm import BeaconConfig
from beacon_llm.tasks import SampleStream
from beacon_llm.testing import tiny_beacon_model
from beacon_llm.training import TrainConfig, train

TEXT = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry, who was a farmer. " * 40
CFG = BeaconConfig(window=16, ratios=(2, 4, 8), ratio_mix="step-random")


def _run(out, *, lr, seed, steps=3, stop_after=None, resume=True):
    bm = tiny_beacon_model(CFG)
    cfg = TrainConfig(output_dir=str(out), steps=steps, seq_len=64, grad_accum=1, lr=lr, seed=seed, save_every=1,
                      gradient_checkpointing=False)  # fmt: skip
    state = train(bm, SampleStream([TEXT], bm.tokenizer, 64, seed=1), cfg, progress=False, resume=resume,
                  stop_after=stop_after)  # fmt: skip
    return bm, state


def test_a_fresh_run_resumed_later_continues_itself_not_an_earlier_run_in_its_folder(tmp_path):
    """``resume=False`` (``beacon-llm train --fresh``) in a folder holding an earlier run: a later resume of the new
    run must continue the new run. The earlier run's checkpoint-3 used to be the latest one there, so the second
    sitting 'resumed' the earlier run (its losses, its weights in final/)."""
    straight, ref = _run(tmp_path / "ref", lr=1e-3, seed=5)
    _run(tmp_path / "run", lr=1e-2, seed=0)  # the earlier run: checkpoint-1..3, final/, history.json
    _, first = _run(tmp_path / "run", lr=1e-3, seed=5, stop_after=1, resume=False)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names[0] == "checkpoint-1" and len(names) == 2 and names[1].startswith("earlier-run-")
    # nothing of the earlier run is lost: moved aside as it was
    aside = sorted(p.name for p in (tmp_path / "run" / names[1]).iterdir())
    assert aside == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "final", "history.json"]
    resumed, state = _run(tmp_path / "run", lr=1e-3, seed=5)
    assert [h["loss"] for h in state.history] == [h["loss"] for h in ref.history]
    assert state.tokens == ref.tokens
    ref_params = dict(straight.model.named_parameters())
    assert all(torch.equal(p, ref_params[n]) for n, p in resumed.model.named_parameters())


def test_a_fresh_run_leaves_other_files_of_its_folder_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-best").mkdir()  # not a step checkpoint: never resumed from, kept
    _run(out, lr=1e-3, seed=0, steps=1, resume=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-best").is_dir()


def test_an_accumulation_set_by_the_launcher_is_refused_before_anything_changes(tmp_path, monkeypatch):
    """``accelerate launch --gradient_accumulation_steps N`` (or a DeepSpeed config's) overrides the accumulation
    train() asks its Accelerator for: with 1 against grad_accum=4 the optimiser stepped 4 times per recorded step (12
    for 3 steps), with 8 once in 3 steps. Refused, naming both values and the fix."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    bm = tiny_beacon_model(CFG)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), steps=2, seq_len=64, grad_accum=4, gradient_checkpointing=False)
    message = r"gradient_accumulation_steps=1 .* grad_accum=4 .*GRADIENT_ACCUMULATION_STEPS='1'.*set grad_accum=1"
    with pytest.raises(ValueError, match=message):
        train(bm, SampleStream([TEXT], bm.tokenizer, 64, seed=1), cfg, progress=False)
    assert not (tmp_path / "run").exists() and all(p.requires_grad for p in bm.model.parameters())


@pytest.mark.parametrize("mix", ["fit-0", "fit-1024"])
def test_a_fit_config_is_refused_before_anything_changes(tmp_path, mix):
    """A fit-N config plans each sample to fit the positions: a short sample is read raw, so train() used to fail in
    backward ("element 0 of tensors does not require grad") after marking the model, or train only the samples that
    happen not to fit. Refused up front, naming the mix and the two ways out."""
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix=mix))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), steps=1, seq_len=64, grad_accum=1, gradient_checkpointing=False)
    with pytest.raises(ValueError, match=rf"ratio_mix='{mix}'.*beacon_ratio_mix='step-random'.*train_fit"):
        train(bm, SampleStream([TEXT], bm.tokenizer, 64, seed=1), cfg, progress=False)
    assert not (tmp_path / "run").exists() and all(p.requires_grad for p in bm.model.parameters())


def test_fp16_on_the_cpu_is_refused_before_anything_changes(tmp_path):
    """accelerate autocasts fp16 on GPUs only: on the CPU a mixed_precision='fp16' run trained in float32 (the very
    losses of 'no'), silently. Refused, naming the two precisions that work there."""
    bm = tiny_beacon_model(CFG)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), steps=1, seq_len=64, grad_accum=1, mixed_precision="fp16",
                      gradient_checkpointing=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' casts nothing on the CPU.*'bf16'.*'no'"):
        train(bm, SampleStream([TEXT], bm.tokenizer, 64, seed=1), cfg, progress=False)
    assert not (tmp_path / "run").exists() and all(p.requires_grad for p in bm.model.parameters())


def test_a_resume_with_other_settings_names_each_difference(tmp_path, caplog):
    """A checkpoint records the run's settings; a resume with other ones (lr, seed, another beacon config) continues
    with the new ones and names each difference, instead of mixing two runs without a word. Settings that do not
    change the run (save_every) and an unchanged resume say nothing."""
    _run(tmp_path / "run", lr=1e-3, seed=5, stop_after=1)
    with caplog.at_level("WARNING", logger="beacon_llm.training"):
        _run(tmp_path / "run", lr=1e-3, seed=5, steps=3, stop_after=1)
    assert "differ" not in caplog.text
    with caplog.at_level("WARNING", logger="beacon_llm.training"):
        _run(tmp_path / "run", lr=2e-3, seed=6)
    assert "lr: 0.001 -> 0.002" in caplog.text and "seed: 5 -> 6" in caplog.text
    assert "save_every" not in caplog.text and "beacon config" not in caplog.text
    caplog.clear()
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), ratio_mix="step-random"))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), steps=4, seq_len=64, grad_accum=1, lr=2e-3, seed=6,
                      save_every=1, gradient_checkpointing=False)  # fmt: skip
    with caplog.at_level("WARNING", logger="beacon_llm.training"):
        train(bm, SampleStream([TEXT], bm.tokenizer, 64, seed=1), cfg, progress=False)
    assert "beacon config" in caplog.text and "steps: 3 -> 4" in caplog.text
