"""Distillation targets for beacon training: the frozen base model reading the raw text is the teacher.

For a sample that fits the base positions, the teacher's next-token distributions on the tokens after the condensed
windows are what the beacon model should reproduce while it reads the older part only through its beacons. The
teacher's top-k log-probs are computed once per sample and kept as safetensors (one file per sample, keyed by a hash
of its tokens), so every training run and every ablation reuses them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .digests import WeightsDigest
from .layers import is_beacon_parameter
from .serialization import _write_atomically

logger = logging.getLogger(__name__)


def _key(ids: list[int], start: int, k: int, model: str) -> str:
    h = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
    h.update(f"{start}:{k}:{model}".encode())
    return h.hexdigest()[:32]


def _teacher_digest(model: nn.Module) -> WeightsDigest:
    """The digest of a teacher's base weights (``beacon_*`` parameters left out: the plain forward never reads them)."""
    return WeightsDigest((n, p) for n, p in model.named_parameters() if not is_beacon_parameter(n))


def _model_tag(model: nn.Module, digest: WeightsDigest) -> str:
    """Which teacher: its name, shape, weight dtype and weights digest (targets of another teacher, or of the same
    one with other weights, are never reused)."""
    config = model.config
    dtype = next(model.parameters()).dtype
    return (
        f"{getattr(config, '_name_or_path', '')}|{config.model_type}|{config.num_hidden_layers}|"
        f"{config.hidden_size}|{config.vocab_size}|{dtype}|{digest()}"
    )


class TeacherStore:
    """Top-k next-token log-probs of the plain ``model`` for ``ids[start:]``, computed on first use and stored in
    ``folder`` (safetensors, written to a unique temporary name and renamed)."""

    def __init__(self, model: nn.Module, folder: str | os.PathLike[str], k: int = 32) -> None:
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        self.model = model
        self._digest = _teacher_digest(model)
        self.folder = Path(folder)
        self.k = k

    @torch.no_grad()
    def compute(self, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, k) int64 token ids and (T, k) float32 log-probs of the teacher for targets ``ids[start:]``."""
        if not 0 < start < len(ids):
            raise ValueError(f"start={start} must be within (0, {len(ids)})")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            with torch.autocast(device.type, enabled=False):  # targets in the teacher's own precision
                ids_t = torch.tensor([ids], device=device)
                logits = self.model(input_ids=ids_t, logits_to_keep=len(ids) - start + 1).logits
        finally:
            self.model.train(was_training)
        logp = torch.log_softmax(logits[0, :-1].float(), -1)  # (T, V), predicting ids[start:]
        top = logp.topk(self.k, dim=-1)
        return top.indices.cpu(), top.values.cpu()

    def get(self, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`compute`'s targets, read from the store when there (a stored file that cannot be read or holds
        other shapes is computed again and replaced)."""
        path = self.folder / f"{_key(ids, start, self.k, _model_tag(self.model, self._digest))}.safetensors"
        shape = (len(ids) - start, self.k)
        tensors = _load(path, {"indices": shape, "logprobs": shape})
        if tensors is not None:
            return tensors["indices"].long(), tensors["logprobs"]
        indices, logprobs = self.compute(ids, start)
        _save(path, {"indices": indices.to(torch.int32).contiguous(), "logprobs": logprobs.contiguous()})
        return indices, logprobs


def _load(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
    """The stored tensors of ``path`` when it holds them with these names and shapes; None when there is no such
    file, and (with a warning naming the file) when it cannot be read or holds something else: the caller computes
    them again and replaces it."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        logger.warning("%s: unreadable stored targets (%s); computing them again", path, exc)
        return None
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(found.get(name) != shape for name, shape in shapes.items()):
        logger.warning("%s: stored tensors %s, expected %s; computing them again", path, found, shapes)
        return None
    return tensors


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors under a unique temporary name, then renamed (concurrent writers never leave a partial file; a
    failed write leaves no temporary one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(str(path), lambda tmp: save_file(tensors, tmp))


def topk_kl(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token over the teacher's top-k tokens plus one bucket for all other tokens: the
    exact KL of the two distributions coarsened to those k + 1 outcomes (0 for the teacher itself).

    student_logits: (T, V); indices, logprobs: (T, k), the teacher's log-probs over the whole vocabulary.
    Returns (T,).
    """
    student = torch.log_softmax(student_logits.float(), -1).gather(1, indices)  # (T, k)
    return coarse_kl(logprobs, student)


def coarse_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """:func:`topk_kl` from the student's log-probs at the teacher's top-k tokens (both (T, k), normalised over the
    whole vocabulary): sum_i p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest). Returns (T,)."""
    teacher = teacher_logprobs.float()  # (T, k)
    student = student_logprobs.float()
    limit = 1.0 - 1e-6

    def rest(logp: torch.Tensor) -> torch.Tensor:  # log of the probability outside the top k, (T,)
        return torch.log1p(-logp.exp().sum(-1).clamp(max=limit))

    t_rest, s_rest = rest(teacher), rest(student)
    return (teacher.exp() * (teacher - student)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


class TailReferenceStore:
    """A second reference for the distance-weighted loss: the plain ``model`` reading only the ``context`` tokens
    before ``ids[start]`` and the tail (``context=1``: the ablations' "tail only (no memory)"), stored as its log-probs
    at the teacher's top-k tokens, so :func:`distance_gain` is exactly ``topk_kl`` of its logits. Computed once per
    (sample, teacher indices) and kept in ``folder`` like :class:`TeacherStore`'s targets."""

    def __init__(self, model: nn.Module, folder: str | os.PathLike[str], context: int = 1) -> None:
        if context < 1:
            raise ValueError(f"context={context} must be >= 1 (the token before the tail predicts its first token)")
        self.model = model
        self._digest = _teacher_digest(model)
        self.folder = Path(folder)
        self.context = context

    @torch.no_grad()
    def compute(self, ids: list[int], start: int, indices: torch.Tensor) -> torch.Tensor:
        """(T, k) float32 log-probs of the tail-only model at the teacher's ``indices`` (T, k) for ``ids[start:]``."""
        if not self.context <= start < len(ids):
            raise ValueError(f"start={start} must be within [{self.context}, {len(ids)})")
        if indices.shape[0] != len(ids) - start:
            raise ValueError(f"indices cover {indices.shape[0]} tokens, the tail has {len(ids) - start}")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            with torch.autocast(device.type, enabled=False):
                seq = torch.tensor([ids[start - self.context :]], device=device)
                logits = self.model(input_ids=seq, logits_to_keep=len(ids) - start + 1).logits
        finally:
            self.model.train(was_training)
        logp = torch.log_softmax(logits[0, :-1].float(), -1)  # (T, V), predicting ids[start:]
        return logp.gather(1, indices.to(logp.device).long()).cpu()

    def get(self, ids: list[int], start: int, indices: torch.Tensor) -> torch.Tensor:
        h = hashlib.sha256(np.ascontiguousarray(indices.to(torch.int64).cpu().numpy()).tobytes())
        h.update(f"tail-only:{self.context}".encode())
        key = _key(ids, start, indices.shape[-1], _model_tag(self.model, self._digest) + "|" + h.hexdigest())
        path = self.folder / f"{key}.safetensors"
        tensors = _load(path, {"logprobs": tuple(indices.shape)})
        if tensors is not None:
            return tensors["logprobs"]
        logprobs = self.compute(ids, start, indices)
        _save(path, {"logprobs": logprobs.contiguous()})
        return logprobs


def distance_gain(teacher_logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per tail token, how much the condensed context matters: g = KL(teacher || tail-only reference), coarsened as in
    :func:`topk_kl` (both (T, k) at the teacher's top-k), clamped at 0 against rounding. Returns (T,)."""
    return coarse_kl(teacher_logprobs, reference_logprobs).clamp(min=0.0)


def distance_weights(gain: torch.Tensor, mix: float) -> torch.Tensor:
    """Per-token KL weights (1 - mix) + mix * g / mean(g) over one sample's tail (mean 1, so the loss keeps its
    scale); ``mix`` 0: all 1 (the plain mean), 1: proportional to the gain. All 1 when the gain is 0 everywhere."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix={mix} must be within [0, 1]")
    gain = gain.float()
    mean = gain.mean()
    if mix == 0.0 or not mean > 0:
        return torch.ones_like(gain)
    return (1.0 - mix) + mix * gain / mean
