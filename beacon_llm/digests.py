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


class WeightsDigest:
    """:func:`weights_sha256` of a fixed list of parameters (and ``text``), remembered until one of them changes in
    place (its version counter moves: an optimiser step, ``copy_``, ``load_state_dict``): checking reads the version
    counters only (it runs on every generated token), hashing happens only after a change."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], text: str = "") -> None:
        self.named = list(named)
        self.text = text
        self._memo: tuple[list[int], str] | None = None

    def __call__(self) -> str:
        key = [p._version for _, p in self.named]
        memo = self._memo
        if memo is not None and memo[0] == key:
            return memo[1]
        digest = weights_sha256(self.named, self.text)
        self._memo = (key, digest)
        return digest
