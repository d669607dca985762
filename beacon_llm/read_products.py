"""The read's linear products on a bf16 CPU model (docs/design.md §8).

A read step multiplies every window (a few hundred rows) by each layer's seven projection matrices. ``F.linear`` in
bf16 reorders each weight into oneDNN's blocked layout on every call; here the weights are packed once, and the q/k/v
and gate/up projections run as one product each (their weights stacked). Every output is the same dot product in
the same order, so the read's states equal the stock layers' bit for bit (tested), and the norms are the decode
step's single-call RMSNorm (the same bits). The packed copy costs as much memory as the linear weights; it is made
only where :func:`beacon_llm.decode.packed_copy_fits` allows it (measured: ``benchmarks/read_products.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _compat
from .decode import (
    FusedLayer,
    fused_layer,
    packed_copy_fits,
    packed_product,
    plain_projections,
    watched_weights,
    weights_unchanged,
)


class ReadProducts:
    """Each decoder layer's fused, packed products (:class:`beacon_llm.decode.FusedLayer`) for one model's current
    weights; ``matches(model)`` tells whether they still describe them."""

    def __init__(self, model: nn.Module) -> None:
        self._watched = watched_weights(model)
        self.layers: list[FusedLayer] = [fused_layer(layer, packed_product) for layer in model.model.layers]

    def matches(self, model: nn.Module) -> bool:
        return weights_unchanged(self._watched, model)


def read_products(model: nn.Module) -> bool:
    """Whether the read runs on :class:`ReadProducts` (decided when they are made): bf16 weights on a CPU with native
    bf16, plain (unwrapped, unhooked) projections, and room for the packed copy. Reads that need a
    gradient (training) always run on the modules themselves."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _compat.native_bf16_cpu():
        return False
    return plain_projections(model) and packed_copy_fits(model)


__all__ = ["ReadProducts", "read_products"]
