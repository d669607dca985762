"""Training beacon parameters on a frozen base model (paper v2 §3.1, v3 §3.2 / §4.1; docs/design.md §9).

Only parameters named ``beacon_*`` are trained; the loss is next-token cross-entropy on raw tokens across all
windows of a sample with gradients through every window ("no stop gradients"), a compression ratio drawn per
window from the config's ratio set (``step-random``). It runs through ``accelerate``: one process, or data parallel
(DDP, DeepSpeed ZeRO-2) by ``accelerate launch --config_file ...``, each process training on its own share of the
samples. Parameter sharding (FSDP, ZeRO-3) is not supported: the beacon forward calls each decoder layer's parts
directly, so a per-layer wrapper would never gather its parameters. Checkpoints are safetensors + JSON and resume
bit-identically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import BeaconConfig
from .layers import GATE_NAME, clamp_memory_gates_, is_beacon_parameter
from .model import BeaconModel
from .serialization import (
    ADAPTER_WEIGHTS_NAME,
    _write_atomically,
    load_beacon_weights,
    read_adapter_config,
    save_adapter,
)
from .tasks import (
    CONDENSED_TASKS,
    IGNORE,
    RECALL_TASKS,
    SPAN_CUE,
    SPAN_PAIRS,
    SPAN_TASK,
    SPAN_TOKENS,
    Sample,
    SampleStream,
    make_condensed_recall,
    make_condensed_spans,
)

logger = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.safetensors"
HISTORY_NAME = "history.json"


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults follow the paper: AdamW, lr 5e-5, linear decay, no warmup, batch 8)."""

    output_dir: str
    steps: int = 100
    seq_len: int = 2048
    grad_accum: int = 8  # sequences per optimiser step (beacon forwards take one sequence at a time)
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    task_rate: float = 0.3
    gradient_checkpointing: bool = True
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (accelerate)
    save_every: int = 50
    seed: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        _check_optimizer_settings(self)
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay={self.weight_decay} must be a finite number >= 0 (0: no decay)")
        if not 0.0 <= self.task_rate <= 1.0:  # also rejects NaN
            raise ValueError(f"task_rate={self.task_rate} must be within [0, 1] (the share of generated task samples)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} must be 'no', 'bf16' or 'fp16'")


def _check_optimizer_settings(cfg: TrainConfig | FitTrainConfig) -> None:
    """The settings both configs share: ``lr`` a finite number > 0, ``max_grad_norm`` finite and >= 0 (0: no
    clipping), ``warmup_steps`` >= 0. Each test is written so that NaN fails it."""
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr={cfg.lr} must be a finite number > 0 (e.g. 5e-5)")
    if not (cfg.max_grad_norm >= 0 and math.isfinite(cfg.max_grad_norm)):
        raise ValueError(f"max_grad_norm={cfg.max_grad_norm} must be a finite number >= 0 (0: no clipping)")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be >= 0")


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    samples: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


class BeaconLoss(nn.Module):
    """``nn.Module`` face of the beacon forward, so accelerate/DDP wrap it like any model."""

    def __init__(self, bm: BeaconModel) -> None:
        super().__init__()
        self.model = bm.model
        self.bm = bm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
        cache = self.bm.new_cache(generator=np.random.default_rng(seed))  # per-sample ratio draws
        out = self.bm.forward(input_ids, cache, labels=labels, return_token_logprobs=False)
        if out.loss is None:
            raise ValueError("a training sample has no scored token")
        return out.loss


def _lr_factor(step: int, cfg: TrainConfig | FitTrainConfig) -> float:
    """Linear warmup over ``cfg.warmup_steps``, then linear decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"{names[id(p)]}::{key}"] = t.detach().cpu().contiguous()
    return out


def _load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor], source: Path
) -> None:
    """Put the moments saved by :func:`_optimizer_tensors` back; a moment whose shape is not its parameter's (a
    checkpoint of another model or config) raises ``ValueError`` naming ``source``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"{names[id(p)]}::"
            state = {k[len(prefix) :]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
            bad = {k: tuple(v.shape) for k, v in state.items() if v.dim() and v.shape != p.shape}
            if bad:
                raise ValueError(
                    f"{source}: the optimiser moments {bad} of {names[id(p)]} do not fit its shape {tuple(p.shape)}; "
                    "the checkpoint is of another model or config: resume with the same ones, or use another "
                    "output_dir"
                )
            if state:
                optimizer.state[p] = state


def save_checkpoint(
    folder: Path,
    bm: BeaconModel,
    optimizer: Any,
    names: Any,
    stream: SampleStream,
    state: TrainState,
    cfg: TrainConfig | FitTrainConfig | None = None,
) -> None:
    """Adapter, optimiser moments (unless ``optimizer`` is None) and trainer state (with the run's settings ``cfg``,
    which a resume compares with its own), written under a unique temporary name and renamed."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_adapter(bm, str(tmp))  # fp32 beacon weights + config
    if optimizer is not None:
        save_file(_optimizer_tensors(optimizer, names), str(tmp / OPTIM_NAME))
    record: dict[str, Any] = {"state": asdict(state), "data_rng": stream.rng.bit_generator.state}
    if cfg is not None:
        record["train_config"] = asdict(cfg)
    with open(tmp / STATE_NAME, "w") as f:
        json.dump(record, f, default=int)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)


# settings that do not change what a run computes: a resume may change them without notice
_UNRECORDED_SETTINGS = frozenset({"output_dir", "save_every", "log_every"})


def _changed_settings(saved: dict[str, Any], cfg: TrainConfig | FitTrainConfig) -> list[str]:
    """``name: saved -> now`` for each setting of ``cfg`` that differs from the checkpoint's record ``saved``."""
    now = json.loads(json.dumps(asdict(cfg), default=int))  # tuples as lists, as the record holds them
    return [
        f"{name}: {saved[name]!r} -> {now[name]!r}"
        for name in sorted(now)
        if name not in _UNRECORDED_SETTINGS and name in saved and saved[name] != now[name]
    ]


def _resume_from(
    ckpt: Path,
    bm: BeaconModel,
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    stream: SampleStream,
    cfg: TrainConfig | FitTrainConfig,
) -> TrainState:
    """Load a checkpoint written by :func:`save_checkpoint` into a run: beacon weights, optimiser moments (missing
    in a checkpoint from before they were saved: they restart, with a warning), the data position and the state.
    The run continues with its own settings; where they, or the beacon config, differ from the checkpoint's, a
    warning names each difference (a resume into the wrong ``output_dir`` would otherwise mix two runs silently)."""
    path = str(ckpt / ADAPTER_WEIGHTS_NAME)
    stored_config = BeaconConfig.from_dict(read_adapter_config(str(ckpt)))
    load_beacon_weights(bm.model, load_file(path), path)
    if (ckpt / OPTIM_NAME).exists():
        _load_optimizer_tensors(optimizer, names, load_file(str(ckpt / OPTIM_NAME)), ckpt / OPTIM_NAME)
    else:
        logger.warning("%s has no %s (an older checkpoint): the optimiser moments restart", ckpt, OPTIM_NAME)
    saved = json.loads((ckpt / STATE_NAME).read_text())
    changed = _changed_settings(saved.get("train_config") or {}, cfg)
    if stored_config != bm.config:
        changed.append(f"beacon config: {stored_config.to_dict()} -> {bm.config.to_dict()}")
    if changed:
        logger.warning(
            "resuming %s with settings that differ from the ones it was trained with (the run continues with the new "
            "ones; give another output_dir, or start afresh, for a separate run): %s",
            ckpt,
            "; ".join(changed),
        )
    state = TrainState(**saved["state"])
    stream.rng.bit_generator.state = saved["data_rng"]
    logger.info("resumed from %s (step %d)", ckpt, state.step)
    return state


def write_history(out_dir: Path, history: list[dict[str, float]]) -> None:
    """``out_dir/history.json``, written under a unique temporary name and renamed: a reader (or a run killed
    while writing) never sees it half-written."""
    text = json.dumps(history)
    _write_atomically(str(out_dir / HISTORY_NAME), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    named = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    found = sorted(named, key=lambda p: int(p.name.split("-")[1]))
    found = [p for p in found if (p / STATE_NAME).is_file()]
    return found[-1] if found else None


def _resume_checkpoint(output_dir: Path, steps: int) -> Path | None:
    """The latest checkpoint in ``output_dir`` to resume from (None: none), refused when it is past ``steps``:
    resuming it would train nothing and write no final adapter for ``steps``."""
    ckpt = latest_checkpoint(output_dir)
    step = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    if step > steps:
        raise ValueError(
            f"{ckpt} holds a run at step {step}, past steps={steps}: give a new output_dir for a new run, or "
            f"steps >= {step} to continue that one"
        )
    return ckpt


def _check_accelerator(accelerator: Any, cfg: TrainConfig, *, created: bool = False) -> None:
    """``accelerator`` must accumulate and cast as ``cfg`` says: :func:`train` steps through it. A caller's is
    checked before anything changes; the one :func:`train` creates (``created``) too, since the launcher's environment
    overrides what it is asked for (``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``, set by ``accelerate launch
    --gradient_accumulation_steps`` or a DeepSpeed config's ``gradient_accumulation_steps``)."""
    accum = accelerator.gradient_accumulation_steps
    precision = getattr(accelerator.mixed_precision, "value", accelerator.mixed_precision)
    if accum == cfg.grad_accum and precision == cfg.mixed_precision:
        return
    found = (
        f"the accelerator has gradient_accumulation_steps={accum} and mixed_precision={precision!r}, the config "
        f"grad_accum={cfg.grad_accum} and mixed_precision={cfg.mixed_precision!r}"
    )
    if created:
        env = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        raise ValueError(
            f"{found}: the launcher's settings override the config's (ACCELERATE_GRADIENT_ACCUMULATION_STEPS="
            f"{env!r}, from accelerate launch --gradient_accumulation_steps or a DeepSpeed config's "
            f"gradient_accumulation_steps), and training would step the optimiser off its schedule; launch with "
            f"gradient_accumulation_steps={cfg.grad_accum} (and mixed_precision={cfg.mixed_precision!r}), or set "
            f"grad_accum={accum} in the config"
        )
    raise ValueError(
        f"{found}: create it with Accelerator(gradient_accumulation_steps={cfg.grad_accum}, "
        f"mixed_precision={cfg.mixed_precision!r}), or pass accelerator=None"
    )


def _check_trainable_mix(bm: BeaconModel) -> None:
    """:func:`train` reads each sample with a fresh cache at the config's ``ratio_mix``: a ``fit-N`` one plans the
    sample to fit the model's positions, so a sample that fits condenses nothing and trains no beacon. Refused."""
    if bm.config.is_fit:
        raise ValueError(
            f"train() draws a compression ratio per window, but this model's beacon config has "
            f"ratio_mix={bm.config.ratio_mix!r}, an inference schedule that condenses only what does not fit the "
            f"model's {bm.max_positions} positions: a sample that fits is read raw and trains no beacon. Load the "
            "beacons with beacon_ratio_mix='step-random' (as `beacon-llm train` does), or train in the fit regime "
            "with train_fit"
        )


def _start_afresh(out_dir: Path) -> Path | None:
    """Before a run that does not resume (``resume=False``), move an earlier run's checkpoints, final adapter and
    history out of the way, into ``out_dir/earlier-run-<time>-<pid>/`` (nothing is deleted): left in place, a later
    resume of the new run would pick the earlier run's latest checkpoint, and its ``final/`` would pass for the new
    run's. Returns the folder they went to (None: there were none)."""
    stale = sorted(p for p in out_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+(\.\d+\.tmp)?", p.name))
    stale += [p for p in (out_dir / "final", out_dir / HISTORY_NAME) if p.exists()]
    if not stale:
        return None
    aside = out_dir / f"earlier-run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for p in stale:
        os.replace(p, aside / p.name)
    logger.warning("resume=False: moved the earlier run's %s from %s to %s", [p.name for p in stale], out_dir, aside)
    return aside


def train(
    bm: BeaconModel,
    stream: SampleStream,
    cfg: TrainConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    accelerator: Any = None,
    stop_after: int | None = None,
) -> TrainState:
    """Train the beacons of ``bm`` on ``stream``; checkpoints go to ``cfg.output_dir/checkpoint-<step>``.

    With ``resume`` the latest checkpoint there is loaded first (weights, optimiser moments, data position, step);
    one past ``cfg.steps`` is refused. Without it the run starts afresh there: an earlier run's checkpoints, final
    adapter and history are first moved into ``earlier-run-<time>-<pid>/`` there, so that resuming the new run later
    continues it and no other.
    ``stop_after`` ends this run after that many optimiser steps (the schedule still spans ``cfg.steps``), for
    training in several sittings.
    Returns the final state (loss history included); the final adapter is written to ``cfg.output_dir/final``.
    A caller's ``accelerator`` must have ``cfg``'s ``grad_accum`` and ``mixed_precision`` (so must the one created
    here, which the launcher's environment can override). The beacon config must not be ``fit-N`` (see
    :func:`train_fit`).
    """
    from accelerate import Accelerator, PartialState
    from tqdm.auto import tqdm

    _check_trainable_mix(bm)
    if accelerator is not None:
        _check_accelerator(accelerator, cfg)
    device = accelerator.device if accelerator is not None else PartialState().device  # the one it will train on
    if cfg.mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "mixed_precision='fp16' casts nothing on the CPU (accelerate autocasts fp16 on GPUs only): the run would "
            "train in float32 while recorded as fp16; use mixed_precision='bf16' (CPU autocast) or 'no'"
        )
    out_dir = Path(cfg.output_dir)
    ckpt = _resume_checkpoint(out_dir, cfg.steps) if resume else None
    if accelerator is None:
        accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)
        _check_accelerator(accelerator, cfg, created=True)
    if not resume:
        if accelerator.is_main_process:
            _start_afresh(out_dir)
        accelerator.wait_for_everyone()  # no process starts before the earlier run is out of the way
    out_dir.mkdir(parents=True, exist_ok=True)
    bm.mark_only_beacon_trainable()
    bm.gradient_checkpointing = cfg.gradient_checkpointing
    params = [p for n, p in bm.model.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in bm.model.named_parameters() if is_beacon_parameter(n)}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState()
    if ckpt is not None:
        state = _resume_from(ckpt, bm, optimizer, names, stream, cfg)
    module = BeaconLoss(bm)
    module, optimizer = accelerator.prepare(module, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    bm.model.train()
    bar = tqdm(
        total=cfg.steps,
        initial=state.step,
        disable=not progress or not accelerator.is_main_process,
        desc="training beacons",
        unit="step",
    )
    last = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
    try:
        while state.step < last:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(state.step, cfg)
            losses, n_tok = [], 0
            for _ in range(cfg.grad_accum):
                # every process draws the same samples and trains on its own share (rank-strided), so the data
                # position, saved once, is the same for all of them
                drawn: list[Sample] = [next(stream) for _ in range(world)]
                sample = drawn[rank]
                index = state.samples + rank  # the sample's global index seeds its ratio draws
                ids = torch.tensor(sample.input_ids, device=accelerator.device)
                labels = torch.tensor(sample.labels, device=accelerator.device)
                with accelerator.accumulate(module):
                    loss = module(ids, labels, cfg.seed * 1_000_003 + index)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                    clamp_memory_gates_(bm.model)
                losses.append(float(loss.detach()))
                n_tok += sum(len(d.input_ids) for d in drawn)
                state.samples += world
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens += n_tok
            state.elapsed_s += dt
            record = {
                "step": state.step,
                "loss": float(np.mean(losses)),
                "tokens": state.tokens,
                "lr": optimizer.param_groups[0]["lr"],
                "tok_per_s": n_tok / dt,
            }
            state.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
            if state.step % cfg.save_every == 0 or state.step == last:
                if accelerator.is_main_process:
                    save_checkpoint(out_dir / f"checkpoint-{state.step}", bm, optimizer, names, stream, state, cfg)
    finally:
        bar.close()
        bm.model.eval()
        bm.gradient_checkpointing = False
    if accelerator.is_main_process and state.step == cfg.steps:
        save_adapter(bm, str(out_dir / "final"))
        write_history(out_dir, state.history)
    return state


def perplexity(bm: BeaconModel, ids: list[int]) -> float:
    """exp(mean NLL) of ``ids`` read in one call (for evaluation)."""
    with torch.no_grad():
        out = bm.forward(ids)
    return math.exp(float(out.loss))


# ---------------------------------------------------------------------- training for the fit-N schedule
@dataclass
class FitTrainConfig:
    """Training in the regime ``fit-N`` reads in: the oldest windows of a sample condensed, the rest raw.

    Each sample of ``seq_len`` tokens is planned as if the base model had only ``positions`` positions, so its first
    windows get beacons (at a ratio drawn from ``ratios``) and its tail is read raw after them, by the plain decoder.
    The loss is on the tail only: ``kl_weight`` x KL to the teacher's top-k distributions (the plain model reading
    the whole sample, :class:`beacon_llm.distill.TeacherStore`) + ``ce_weight`` x next-token cross-entropy.
    ``distant_weight`` (0..1) weights the KL of each tail token by (1 - d) + d * g / mean(g), g the teacher's KL to the
    plain model reading the tail alone (:func:`beacon_llm.distill.distance_weights`): 0 is the plain mean.
    With memory gates (``BeaconConfig.memory_gate``): ``gate_lr`` is their learning rate (None: ``lr``) and
    ``gates_only`` trains them alone, the rest of the adapter frozen.
    ``recall_rate`` (0..1) of the samples are facts to carry instead (:func:`beacon_llm.tasks.make_condensed_recall`):
    a pass key or needle planted in 1..``recall_windows`` condensed windows of training text, up to ``recall_tail``
    raw tokens after them, then the question; the loss is ``recall_weight`` x cross-entropy of the asked value.
    ``"span"`` in ``recall_tasks`` asks for the condensed text itself instead (:func:`beacon_llm.tasks.
    make_condensed_spans`): ``span_pairs`` cues of ``span_cue`` tokens, each followed by the ``span_tokens`` it
    precedes in the condensed windows, all labelled.
    """

    output_dir: str
    steps: int = 50
    seq_len: int = 2048
    positions: int = 1024
    ratios: tuple[int, ...] = (32,)
    grad_accum: int = 2
    lr: float = 1e-4
    warmup_steps: int = 2
    max_grad_norm: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    topk: int = 32
    distant_weight: float = 0.0
    autocast_bf16: bool = False
    save_every: int = 10
    seed: int = 0
    gate_lr: float | None = None
    gates_only: bool = False
    recall_rate: float = 0.0
    recall_windows: int = 4
    recall_tail: int = 1024
    recall_weight: float = 1.0
    recall_tasks: tuple[str, ...] = RECALL_TASKS
    span_pairs: int = SPAN_PAIRS
    span_cue: int = SPAN_CUE
    span_tokens: int = SPAN_TOKENS

    def __post_init__(self) -> None:
        if not 0.0 <= self.recall_rate <= 1.0:  # also rejects NaN
            raise ValueError(f"recall_rate={self.recall_rate} must be within [0, 1]")
        if self.recall_rate > 0:
            if self.recall_windows < 1 or self.recall_tail < 0 or not self.recall_weight > 0:
                raise ValueError(
                    f"recall_windows={self.recall_windows} must be >= 1, recall_tail={self.recall_tail} >= 0 and "
                    f"recall_weight={self.recall_weight} > 0"
                )
            unknown = set(self.recall_tasks) - set(CONDENSED_TASKS)
            if not self.recall_tasks or unknown:
                raise ValueError(f"recall_tasks={self.recall_tasks} must be a non-empty subset of {CONDENSED_TASKS}")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise ValueError(f"gate_lr={self.gate_lr} must be > 0 (or None: the gates train at lr)")
        sizes = ("steps", "seq_len", "positions", "grad_accum", "save_every", "topk")
        for name in (*sizes, "span_pairs", "span_cue", "span_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.positions >= self.seq_len:
            raise ValueError(f"positions={self.positions} must be below seq_len={self.seq_len}: nothing to condense")
        _check_optimizer_settings(self)
        weights_ok = self.kl_weight >= 0 and self.ce_weight >= 0 and math.isfinite(self.kl_weight + self.ce_weight)
        if not weights_ok or (self.kl_weight + self.ce_weight == 0 and self.recall_rate < 1):
            raise ValueError(
                f"kl_weight={self.kl_weight} and ce_weight={self.ce_weight} must be finite and >= 0, and not both 0 "
                "(unless every sample is a recall task)"
            )
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ValueError(f"ratios={self.ratios} must be positive")
        if not 0.0 <= self.distant_weight <= 1.0:  # also rejects NaN
            raise ValueError(
                f"distant_weight={self.distant_weight} must be within [0, 1] (0: every tail token weighs the same, "
                "1: KL weights proportional to the distance gain)"
            )
        if self.distant_weight > 0 and self.kl_weight == 0:
            raise ValueError("distant_weight > 0 weights the KL term: it needs kl_weight > 0")


def tail_loss(
    bm: BeaconModel,
    ids: list[int],
    plan: Any,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None,
    kl_weight: float,
    ce_weight: float,
    score_from: int = 0,
    kl_token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Read ``ids`` under the fit ``plan`` and score the tokens after its condensed windows: returns the weighted loss
    (with graph when training) and its parts (mean KL, mean NLL, tokens). ``teacher_topk``: the teacher's (indices,
    log-probs) for those tokens (:meth:`beacon_llm.distill.TeacherStore.get`). ``score_from``: score only the tail
    tokens from that offset on (evaluation of what the memory adds once the tail itself gives the local context).
    ``kl_token_weights``: (tail tokens,) weights of the per-token KL, sum(w * kl) / T (None: the plain mean; the
    reported ``kl`` part stays the plain mean, the weighted one is ``kl_weighted``)."""
    if plan.condensed_windows == 0:
        raise ValueError(f"a sample of {len(ids)} tokens has nothing condensed under {plan}; use longer samples")
    cache = bm.new_cache()
    cache.set_fit_plan(plan)
    out = bm.forward(ids, cache, return_token_logprobs=False, return_hidden=True)
    start = plan.raw_from
    hidden = out.hidden[start - 1 + score_from : len(ids) - 1]  # (T, Dm): the states that predict ids[start + from:]
    logits = bm.model.lm_head(hidden).float()  # (T, V)
    target = torch.tensor(ids[start + score_from :], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target)
    parts = {"nll": float(nll.detach()), "tokens": float(len(target))}
    loss = ce_weight * nll
    if teacher_topk is not None:
        from .distill import topk_kl

        indices, logprobs = (t[score_from:] for t in teacher_topk)
        per_token = topk_kl(logits, indices.to(logits.device), logprobs.to(logits.device))
        kl = per_token.mean()
        parts["kl"] = float(kl.detach())
        if kl_token_weights is not None:
            w = kl_token_weights[score_from:].to(per_token.device, per_token.dtype)
            if w.shape != per_token.shape:
                raise ValueError(f"kl_token_weights cover {w.shape[0]} tokens, {per_token.shape[0]} are scored")
            kl = (w * per_token).sum() / per_token.shape[0]
            parts["kl_weighted"] = float(kl.detach())
        loss = loss + kl_weight * kl
    return loss, parts


def recall_loss(bm: BeaconModel, sample: Sample, plan: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Read a recall ``sample`` under ``plan`` (its fact inside the condensed windows) and score its labelled
    tokens, the asked value: returns the mean cross-entropy (with graph when training) and its parts (``nll``,
    ``exact``: 1.0 when every labelled token is the argmax: greedy decoding after the same prefix writes the
    value)."""
    ids, labels = sample.input_ids, sample.labels
    at = [i for i, label in enumerate(labels) if label != IGNORE]
    if not at or at[0] < plan.raw_from:
        raise ValueError(
            f"a recall sample needs labelled tokens after its condensed windows (raw_from {plan.raw_from})"
        )
    cache = bm.new_cache()
    cache.set_fit_plan(plan)
    out = bm.forward(ids, cache, return_token_logprobs=False, return_hidden=True)
    logits = bm.model.lm_head(out.hidden[[i - 1 for i in at]]).float()  # (A, V): the states that predict the value
    return labelled_scores(logits, torch.tensor([labels[i] for i in at], device=logits.device))


def labelled_scores(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The labelled tokens' mean cross-entropy (with graph) from the ``logits`` (A, V) that predict ``target`` (A,),
    and its parts: ``nll``, ``exact`` (1.0 when every token is the argmax: greedy decoding after the same prefix
    writes them all), ``token_acc`` (the share that is) and ``tokens``."""
    nll = torch.nn.functional.cross_entropy(logits, target)
    hits = logits.detach().argmax(-1) == target  # (A,)
    return nll, {"nll": float(nll.detach()), "exact": float(bool(hits.all())), "token_acc": float(hits.float().mean()),
                 "tokens": float(len(target))}  # fmt: skip


def _recall_rng(cfg: FitTrainConfig, index: int) -> np.random.Generator | None:
    """The generator of sample ``index``'s recall draws when that sample is a recall task, None when it is text: the
    one decision, seeded by the index alone."""
    if not cfg.recall_rate:
        return None
    rng = np.random.default_rng([cfg.seed, 13, index])
    return rng if rng.random() < cfg.recall_rate else None


def _long_text_share(stream: SampleStream, positions: int) -> float:
    """The share of the stream's texts longer than ``positions`` tokens (only those have windows to condense);
    refuses a stream with none, on which training would redraw forever."""
    lengths = [len(ids) for ids in stream.token_texts]
    longest = max(lengths)
    if longest <= positions:
        raise ValueError(
            f"train_fit condenses texts longer than positions={positions} tokens, but the longest training text has "
            f"{longest} tokens: give longer texts, or a positions below {longest}"
        )
    return sum(n > positions for n in lengths) / len(lengths)


def _next_long_text(stream: SampleStream, positions: int, max_draws: int) -> Sample:
    """The stream's next text longer than ``positions`` tokens (shorter ones are skipped), drawn at most
    ``max_draws`` times."""
    for _ in range(max_draws):
        sample = next(stream)
        if len(sample.input_ids) > positions:
            return sample
    raise RuntimeError(f"{max_draws} texts in a row had no more than positions={positions} tokens")


def draw_recall_sample(
    cfg: FitTrainConfig, bm: BeaconModel, stream: SampleStream, index: int
) -> tuple[Sample | None, Any]:
    """The recall sample number ``index`` of a run, or None when that sample is text (seeded by the index alone,
    so a resumed run draws the same ones), with its plan."""
    from .schedule import condensing_plan

    rng = _recall_rng(cfg, index)
    if rng is None:
        return None, None
    config = bm.config
    windows = int(rng.integers(1, cfg.recall_windows + 1))
    tail = int(rng.integers(0, cfg.recall_tail + 1))
    kind = cfg.recall_tasks[int(rng.integers(len(cfg.recall_tasks)))]
    filler = stream.token_texts[int(rng.integers(len(stream.token_texts)))]
    if kind == SPAN_TASK:
        sample, windows = make_condensed_spans(filler, window=config.window, windows=windows, tail=tail,
                                               keep_raw=config.fit_overlap, raw_head=config.sink_size, rng=rng,
                                               pairs=cfg.span_pairs, cue=cfg.span_cue,
                                               span=cfg.span_tokens)  # fmt: skip
    else:
        sample, windows = make_condensed_recall(kind, filler, stream.tokenizer, window=config.window,
                                                windows=windows, tail=tail, keep_raw=config.fit_overlap,
                                                raw_head=config.sink_size, rng=rng)  # fmt: skip
    ratio = cfg.ratios[int(rng.integers(len(cfg.ratios)))]
    return sample, condensing_plan(config, len(sample.input_ids), windows, ratio)


def train_fit(
    bm: BeaconModel,
    stream: SampleStream,
    cfg: FitTrainConfig,
    teacher: Any | None,
    reference: Any | None = None,
    grad_sync: Callable[[list[nn.Parameter]], bool] | None = None,
) -> TrainState:
    """Train the beacons of ``bm`` (a ``fit-N`` config) in the fit regime; see :class:`FitTrainConfig`.
    ``reference``: the tail-only model's store (:class:`beacon_llm.distill.TailReferenceStore`), for
    ``cfg.distant_weight > 0``. ``grad_sync``: called with the trainable parameters after each step's backward
    passes, before clipping; data-parallel training averages its processes' gradients there. It returns True to end
    training after this step (a wall-clock limit), which then saves the final adapter as usual.

    Resumes from the latest ``checkpoint-<step>`` in ``cfg.output_dir`` (weights, optimiser moments, step, tokens,
    data position and ratio draws), refused past ``cfg.steps``. Texts of no more than ``positions`` tokens are
    skipped; a stream with no longer one is refused. Returns the state with the loss history; the final adapter goes
    to ``output_dir/final``.
    """
    from tqdm.auto import tqdm

    from .schedule import fit_plan

    if not bm.config.is_fit:
        raise ValueError(f"train_fit needs a fit-N beacon config, got ratio_mix={bm.config.ratio_mix!r}")
    if cfg.kl_weight > 0 and cfg.recall_rate < 1 and teacher is None:
        raise ValueError("kl_weight > 0 needs a teacher (beacon_llm.distill.TeacherStore)")
    if cfg.distant_weight > 0 and reference is None:
        raise ValueError("distant_weight > 0 needs a tail-only reference (beacon_llm.distill.TailReferenceStore)")
    if (cfg.gates_only or cfg.gate_lr is not None) and bm.config.memory_gate is None:
        raise ValueError(
            "gates_only / gate_lr train memory gates, which this model has none of; set beacon_memory_gate or call "
            "BeaconModel.add_memory_gates()"
        )
    if stream.seq_len != cfg.seq_len or stream.task_rate:
        raise ValueError(
            f"train_fit reads text slices of seq_len={cfg.seq_len}: give a SampleStream with that seq_len and "
            f"task_rate=0 (got seq_len={stream.seq_len}, task_rate={stream.task_rate})"
        )
    # every text sample is drawn from the long texts: at most max_draws tries miss them all with odds of e**-50
    max_draws = math.ceil(50 / _long_text_share(stream, cfg.positions)) if cfg.recall_rate < 1 else 0
    out_dir = Path(cfg.output_dir)
    ckpt = _resume_checkpoint(out_dir, cfg.steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    bm.mark_only_beacon_trainable()
    groups: dict[bool, list[nn.Parameter]] = {False: [], True: []}  # is a gate -> parameters
    for name, p in bm.model.named_parameters():
        is_gate = name.endswith(GATE_NAME)
        if p.requires_grad and cfg.gates_only and not is_gate:
            p.requires_grad_(False)
        if p.requires_grad:
            groups[is_gate].append(p)
    base_lr = {False: cfg.lr, True: cfg.gate_lr or cfg.lr}
    params = groups[False] + groups[True]
    optimizer = torch.optim.AdamW(
        [{"params": groups[g], "base_lr": base_lr[g]} for g in (False, True) if groups[g]], lr=cfg.lr, weight_decay=0.0
    )
    names = {id(p): n for n, p in bm.model.named_parameters() if p.requires_grad}
    state = TrainState()
    if ckpt is not None:
        state = _resume_from(ckpt, bm, optimizer, names, stream, cfg)
    draw = np.random.default_rng([cfg.seed, 7])  # one ratio draw per text sample
    for index in range(state.samples):  # the ratio draws continue where they stopped
        if _recall_rng(cfg, index) is None:
            draw.integers(len(cfg.ratios))
    bm.model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc="training beacons (fit)", unit="step")
    try:
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            lr = cfg.lr * _lr_factor(state.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(state.step, cfg)
            record: dict[str, float] = {"loss": 0.0, "nll": 0.0, "kl": 0.0}
            n_tok = n_text = 0
            for _ in range(cfg.grad_accum):
                recall, recall_plan = draw_recall_sample(cfg, bm, stream, state.samples)
                if recall is not None:
                    with torch.autocast(bm.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                        loss, parts = recall_loss(bm, recall, recall_plan)
                    (cfg.recall_weight * loss / cfg.grad_accum).backward()
                    record["loss"] += cfg.recall_weight * float(loss.detach()) / cfg.grad_accum
                    record["recall_nll"] = record.get("recall_nll", 0.0) + parts["nll"]
                    record["recall_exact"] = record.get("recall_exact", 0.0) + parts["exact"]
                    record["recall_token_acc"] = record.get("recall_token_acc", 0.0) + parts["token_acc"]
                    record["recall_samples"] = record.get("recall_samples", 0.0) + 1
                    n_tok += len(recall.input_ids)
                    state.samples += 1
                    continue
                sample = _next_long_text(stream, cfg.positions, max_draws)
                ratio = cfg.ratios[int(draw.integers(len(cfg.ratios)))]
                plan = fit_plan(bm.config, len(sample.input_ids), cfg.positions, ratio=ratio)
                targets = teacher.get(sample.input_ids, plan.raw_from) if cfg.kl_weight > 0 else None  # full precision
                weights = None
                if cfg.distant_weight > 0:
                    from .distill import distance_gain, distance_weights

                    ref = reference.get(sample.input_ids, plan.raw_from, targets[0])
                    weights = distance_weights(distance_gain(targets[1], ref), cfg.distant_weight)
                with torch.autocast(bm.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                    loss, parts = tail_loss(bm, sample.input_ids, plan, targets, cfg.kl_weight, cfg.ce_weight,
                                            kl_token_weights=weights)  # fmt: skip
                (loss / cfg.grad_accum).backward()
                record["loss"] += float(loss.detach()) / cfg.grad_accum
                record["nll"] += parts["nll"]
                record["kl"] += parts.get("kl", 0.0)
                n_text += 1
                n_tok += len(sample.input_ids)
                state.samples += 1
            for key in ("nll", "kl"):  # means over the step's text samples
                record[key] /= max(n_text, 1)
            if "recall_samples" in record:  # means over its recall samples
                for key in ("recall_nll", "recall_exact", "recall_token_acc"):
                    record[key] /= record["recall_samples"]
            stop = bool(grad_sync(params)) if grad_sync is not None else False
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            clamp_memory_gates_(bm.model)
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens += n_tok
            state.elapsed_s += dt
            state.history.append({"step": state.step, "tokens": state.tokens, "lr": lr, "tok_per_s": n_tok / dt,
                                  **record})  # fmt: skip
            bar.update(1)
            shown = {"kl": f"{record['kl']:.3f}"} if cfg.distant_weight > 0 else {}  # the loss is the weighted KL
            bar.set_postfix(loss=f"{record['loss']:.3f}", **shown, tok_s=f"{n_tok / dt:.0f}")
            if state.step % cfg.save_every == 0 or state.step == cfg.steps or stop:
                save_checkpoint(out_dir / f"checkpoint-{state.step}", bm, optimizer, names, stream, state, cfg)
            if stop:
                break
    finally:
        bar.close()
        bm.model.eval()
    save_adapter(bm, str(out_dir / "final"))
    write_history(out_dir, state.history)
    return state


@torch.no_grad()
def evaluate_fit(
    bm: BeaconModel, samples: list[list[int]], positions: int, ratio: int, teacher: Any | None, score_from: int = 0
) -> dict[str, float]:
    """Held-out score in the fit regime: mean KL to the teacher and perplexity of the tokens after the condensed
    windows (from offset ``score_from`` of that tail on), over ``samples`` (each planned with ``positions`` positions
    and ``ratio``)."""
    from .schedule import fit_plan

    nll_sum = kl_sum = 0.0
    n = 0
    for ids in samples:
        plan = fit_plan(bm.config, len(ids), positions, ratio=ratio)
        targets = teacher.get(ids, plan.raw_from) if teacher is not None else None
        _, parts = tail_loss(bm, ids, plan, targets, 1.0, 1.0, score_from=score_from)
        t = parts["tokens"]
        nll_sum += parts["nll"] * t
        kl_sum += parts.get("kl", 0.0) * t
        n += int(t)
    return {"kl": kl_sum / n, "ppl": math.exp(nll_sum / n), "tokens": n}
