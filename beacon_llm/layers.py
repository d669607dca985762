"""The only new parameters: a beacon embedding and beacon copies of attention projections (paper v2 §2.2), and,
with this project's opt-in ``memory_gate``, one gate per query head of each layer (``self_attn.beacon_gate``).

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
    if config.memory_gate is not None:
        attach_memory_gates(model, config.memory_gate)


GATE_NAME = "beacon_gate"


@torch.no_grad()
def attach_memory_gates(model: nn.Module, value: float) -> None:
    """Add ``self_attn.beacon_gate`` (n_heads,) = ``value`` to every layer (see ``BeaconConfig.memory_gate``)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, GATE_NAME):
            raise ValueError("this model already carries memory gates")
        weight = attn.q_proj.weight  # (H * D, Dm)
        n_heads = weight.shape[0] // attn.head_dim
        setattr(attn, GATE_NAME, nn.Parameter(torch.full((n_heads,), float(value), device=weight.device)))


def memory_gate(attn: nn.Module) -> torch.Tensor | None:
    """The layer's gates (n_heads,), or None when the model has none."""
    return getattr(attn, GATE_NAME, None)


@torch.no_grad()
def clamp_memory_gates_(model: nn.Module) -> None:
    """Keep every gate >= 0 after an optimiser step (a projected gradient step: ``log g`` needs g >= 0)."""
    for layer in model.model.layers:
        gate = memory_gate(layer.self_attn)
        if gate is not None:
            gate.clamp_(min=0.0)


def detach_beacon_modules(model: nn.Module) -> None:
    inner = model.model
    if hasattr(inner, "beacon_embed_tokens"):
        del inner.beacon_embed_tokens
    for layer in inner.layers:
        for name in (*(f"beacon_{p}_proj" for p in ("q", "k", "v", "o")), GATE_NAME):
            if hasattr(layer.self_attn, name):
                delattr(layer.self_attn, name)


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
