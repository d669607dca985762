"""Distillation targets for beacon training: the frozen base model reading the raw text is the teacher.

For a sample that fits the base positions, the teacher's next-token distributions on the tokens after the condensed
windows are what the beacon model should reproduce while it reads the older part only through its beacons. The
teacher's top-k log-probs are computed once per sample and kept as safetensors (one file per sample, keyed by a hash
of its tokens), so every training run and every ablation reuses them.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _key(ids: list[int], start: int, k: int, model: str) -> str:
    h = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
    h.update(f"{start}:{k}:{model}".encode())
    return h.hexdigest()[:32]


def _model_tag(model: nn.Module) -> str:
    """Which teacher: its name, shape and weight dtype (targets of another teacher are never reused)."""
    config = model.config
    dtype = next(model.parameters()).dtype
    return (
        f"{getattr(config, '_name_or_path', '')}|{config.model_type}|{config.num_hidden_layers}|"
        f"{config.hidden_size}|{config.vocab_size}|{dtype}"
    )


class TeacherStore:
    """Top-k next-token log-probs of the plain ``model`` for ``ids[start:]``, computed on first use and stored in
    ``folder`` (safetensors, written to a unique temporary name and renamed)."""

    def __init__(self, model: nn.Module, folder: str | os.PathLike[str], k: int = 32) -> None:
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        self.model = model
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
        path = self.folder / f"{_key(ids, start, self.k, _model_tag(self.model))}.safetensors"
        if path.is_file():
            tensors = load_file(str(path))
            return tensors["indices"].long(), tensors["logprobs"]
        indices, logprobs = self.compute(ids, start)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        save_file({"indices": indices.to(torch.int32).contiguous(), "logprobs": logprobs.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return indices, logprobs


def topk_kl(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token over the teacher's top-k tokens plus one bucket for all other tokens: the
    exact KL of the two distributions coarsened to those k + 1 outcomes (0 for the teacher itself).

    student_logits: (T, V); indices, logprobs: (T, k), the teacher's log-probs over the whole vocabulary.
    Returns (T,).
    """
    student = torch.log_softmax(student_logits.float(), -1).gather(1, indices)  # (T, k)
    teacher = logprobs.float()  # (T, k)
    limit = 1.0 - 1e-6

    def rest(logp: torch.Tensor) -> torch.Tensor:  # log of the probability outside the top k, (T,)
        return torch.log1p(-logp.exp().sum(-1).clamp(max=limit))

    t_rest, s_rest = rest(teacher), rest(student)
    return (teacher.exp() * (teacher - student)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
