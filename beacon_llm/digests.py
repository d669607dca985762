"""Content digests of weights: what keys condensed caches, stored teacher targets and low-rank adapters to the
exact weights that produced them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def weights_sha256(named: Iterable[tuple[str, torch.Tensor]], text: str = "") -> str:
    """sha256 (32 hex digits) of ``text`` and of each tensor's name, dtype, shape and bytes, in the given order."""
    h = hashlib.sha256(text.encode())
    with torch.no_grad():
        for name, tensor in named:
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]
