"""The only new parameters: a beacon embedding and beacon copies of attention projections (paper v2 §2.2).

They are registered on the base model under the official names (``model.beacon_embed_tokens``,
``model.layers.N.self_attn.beacon_{q,k,v,o}_proj``) so an official checkpoint's state dict maps onto them
one-to-one. Attaching is per instance and reversible: :func:`detach_beacon_modules` removes exactly what
:func:`attach_beacon_modules` added. No transformers class is modified.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .config import BeaconConfig

BEACON_PREFIX = "beacon_"


def is_beacon_parameter(name: str) -> bool:
    """The one filter used for freezing, optimiser groups and serialisation."""
    return any(part.startswith(BEACON_PREFIX) for part in name.split("."))


def _eos_or_bos_id(model: nn.Module, which: str) -> int:
    config = model.config
    value = getattr(config, f"{which}_token_id", None)
    if value is None:
        gen = getattr(model, "generation_config", None)
        value = getattr(gen, f"{which}_token_id", None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        raise ValueError(
            f"beacon_embed_init={which!r} but the model config has no {which}_token_id; "
            "set config.{which}_token_id or choose the other init"
        )
    return int(value)


@torch.no_grad()
def attach_beacon_modules(model: nn.Module, config: BeaconConfig) -> None:
    """Add beacon modules initialised from the base weights (docs/design.md §10): projections are value copies of the
    layer's own projections; the embedding is the eos (or bos) row of ``embed_tokens``."""
    inner = model.model
    if hasattr(inner, "beacon_embed_tokens"):
        raise ValueError("this model already carries beacon modules; detach them first or load it as is")
    embed = inner.embed_tokens.weight  # (V, D)
    row = _eos_or_bos_id(model, config.embed_init)
    beacon_embed = nn.Embedding(1, embed.shape[1], device=embed.device, dtype=embed.dtype)
    beacon_embed.weight.copy_(embed[row : row + 1])
    inner.beacon_embed_tokens = beacon_embed
    for layer in inner.layers:
        attn = layer.self_attn
        for p in config.param:
            base: nn.Linear = getattr(attn, f"{p}_proj")
            copy = nn.Linear(
                base.in_features,
                base.out_features,
                bias=base.bias is not None,
                device=base.weight.device,
                dtype=base.weight.dtype,
            )
            copy.weight.copy_(base.weight)
            if base.bias is not None:
                copy.bias.copy_(base.bias)
            setattr(attn, f"beacon_{p}_proj", copy)


def detach_beacon_modules(model: nn.Module) -> None:
    inner = model.model
    if hasattr(inner, "beacon_embed_tokens"):
        del inner.beacon_embed_tokens
    for layer in inner.layers:
        for p in ("q", "k", "v", "o"):
            if hasattr(layer.self_attn, f"beacon_{p}_proj"):
                delattr(layer.self_attn, f"beacon_{p}_proj")


def beacon_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in model.named_parameters():
        if is_beacon_parameter(name):
            yield name, param


def beacon_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the beacon tensors, under their official key names."""
    return {name: t for name, t in model.state_dict().items() if is_beacon_parameter(name)}


def mark_only_beacon_trainable(model: nn.Module) -> int:
    """Freeze the base; return the number of trainable (beacon) parameters."""
    total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_beacon_parameter(name))
        if param.requires_grad:
            total += param.numel()
    return total
