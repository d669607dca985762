"""One decoder layer run with beacon tokens (paper v2 §2.2, v3 §3.1; docs/design.md §5).

The frozen modules of a stock Llama-shaped layer are called as they are (norms, projections, MLP); beacon rows
use the ``beacon_*_proj`` copies. Keys of the open window are rotated at the positions of this step; memory keys
were rotated when they entered the memory. The attention kernel is transformers' own (sdpa, eager, flash), or
the native read attention the step passes in. In a bf16 read without gradient the norms, RoPE and SiLU may run as
native row kernels instead (:mod:`beacon_llm.read_layers`), with the stock rounding points. With memory gates
(``BeaconConfig.memory_gate``) each head's logit offset on the memory's beacons rides on one extra key/query
dimension (:func:`with_gate_dimension`), so the kernels and masks stay those of the ungated model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._compat import rotate_half
from .layers import memory_gate

if TYPE_CHECKING:
    from .read_layers import ReadLayer

# smallest gate whose logarithm is taken: g = 0 then adds about -69 to the logits, which no attention weight survives
# in fp32 or bf16 (e^-69 ~ 1e-30), while the gradient with respect to g stays finite
GATE_FLOOR = 1e-30


@dataclass
class StepTensors:
    """Everything a layer needs for one step, shared by all layers."""

    beacon_rows: torch.Tensor | None  # (n_beacon,) long indices of beacon inputs, None if none
    cos_q: torch.Tensor  # (B, T, D) RoPE of the step inputs
    sin_q: torch.Tensor
    cos_w: torch.Tensor | None  # (B, R, D) RoPE of the cached open-window entries
    sin_w: torch.Tensor | None
    mask: torch.Tensor | None  # (B, 1, T, M + R + T) bool or additive float; None = everything visible
    attention: Callable[..., tuple[torch.Tensor, object]]
    is_causal: bool  # bottom-right causal instead of a mask (flash attention, the native read attention)
    gate_span: tuple[int, int] | None = None  # memory gates: the key columns of the memory's beacons


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``cos``/``sin`` (B, T, D) — the rotate-half convention of Llama."""
    cos = cos.unsqueeze(1)  # (B, 1, T, D)
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def with_gate_dimension(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gate: torch.Tensor,
    span: tuple[int, int],
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append one dimension to the query (B, H, T, D), key and value (B, KVH, K, D) so that attention over them adds
    ``log g_h`` to the logits of query head h on the keys ``span = (start, end)`` (the memory's beacons): the query
    gets ``log g_h / scaling``, those keys 1, every other key and every value 0. gate: (H,), below 0 reads as 0.
    The output's last dimension is then 0 and is dropped by the caller."""
    start, end = span
    bsz, n_heads, t_len, _ = query.shape
    n_keys = key.shape[2]
    if not 0 <= start <= end <= n_keys:
        raise ValueError(f"gate span {span} is not within the {n_keys} keys")
    offset = torch.log(gate.float().clamp(min=0.0) + GATE_FLOOR) / scaling  # (H,)
    q_extra = offset.to(query.dtype)[None, :, None, None].expand(bsz, n_heads, t_len, 1)  # (B, H, T, 1)
    k_extra = key.new_zeros(bsz, key.shape[1], n_keys, 1)  # (B, KVH, K, 1)
    k_extra[:, :, start:end] = 1
    v_extra = value.new_zeros(bsz, value.shape[1], n_keys, 1)
    return torch.cat([query, q_extra], -1), torch.cat([key, k_extra], -1), torch.cat([value, v_extra], -1)


def project(base: nn.Linear, beacon: nn.Linear | None, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``base(x)``, with the rows listed in ``rows`` computed by ``beacon`` instead. x: (B, T, Din)."""
    out = base(x)  # (B, T, Dout)
    if beacon is None or rows is None:
        return out
    return out.index_copy(1, rows, beacon(x.index_select(1, rows)))  # (B, T, Dout)


def layer_step(
    layer: nn.Module,
    hidden: torch.Tensor,
    step: StepTensors,
    mem_k: torch.Tensor | None,
    mem_v: torch.Tensor | None,
    win_k: torch.Tensor | None,
    win_v: torch.Tensor | None,
    read: ReadLayer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one decoder layer on the step inputs.

    Args:
        hidden: (B, T, Dm) inputs of this layer.
        mem_k/mem_v: (B, KVH, M, D) memory, keys already rotated.
        win_k/win_v: (B, KVH, R, D) open-window cache, keys before RoPE.
        read: the layer's norms, RoPE and MLP on the native row kernels for a bf16 read without gradient
            (:mod:`beacon_llm.read_layers`); None: the layer's modules.

    Returns:
        (hidden_out (B, T, Dm), new keys before RoPE (B, KVH, T, D), new values (B, KVH, T, D)).
    """
    attn = layer.self_attn
    bsz, t_len, _ = hidden.shape
    head_dim = attn.head_dim
    rows = step.beacon_rows

    residual = hidden
    x = layer.input_layernorm(hidden) if read is None else read.norm1(hidden)  # (B, T, Dm)
    q = project(attn.q_proj, getattr(attn, "beacon_q_proj", None), x, rows)
    k = project(attn.k_proj, getattr(attn, "beacon_k_proj", None), x, rows)
    v = project(attn.v_proj, getattr(attn, "beacon_v_proj", None), x, rows)
    q = q.view(bsz, t_len, -1, head_dim).transpose(1, 2)  # (B, H, T, D)
    k = k.view(bsz, t_len, -1, head_dim).transpose(1, 2)  # (B, KVH, T, D)
    v = v.view(bsz, t_len, -1, head_dim).transpose(1, 2)  # (B, KVH, T, D)

    rotate = rope if read is None else read.rope
    keys = [rotate(k, step.cos_q, step.sin_q)]
    values = [v]
    if win_k is not None:
        keys.insert(0, rotate(win_k, step.cos_w, step.sin_w))  # (B, KVH, R, D)
        values.insert(0, win_v)
    if mem_k is not None:
        keys.insert(0, mem_k)  # (B, KVH, M, D)
        values.insert(0, mem_v)
    key_all = torch.cat(keys, dim=2) if len(keys) > 1 else keys[0]  # (B, KVH, M+R+T, D)
    value_all = torch.cat(values, dim=2) if len(values) > 1 else values[0]
    query = rotate(q, step.cos_q, step.sin_q)  # (B, H, T, D)

    kwargs = {"is_causal": True} if step.is_causal else {}
    gate = memory_gate(attn)
    if gate is not None and step.gate_span is not None:  # (B, H, T, D + 1), (B, KVH, K, D + 1) twice
        query, key_all, value_all = with_gate_dimension(query, key_all, value_all, gate, step.gate_span, attn.scaling)
    out, _ = step.attention(
        attn,
        query,
        key_all,
        value_all,
        step.mask,
        dropout=0.0,
        scaling=attn.scaling,
        **kwargs,
    )  # (B, T, H, D), or D + 1 with a gate dimension
    out = out[..., :head_dim].reshape(bsz, t_len, -1)  # (B, T, H*D)
    out = project(attn.o_proj, getattr(attn, "beacon_o_proj", None), out, rows)  # (B, T, Dm)
    if read is None:
        hidden = residual + out  # (B, T, Dm)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), k, v
    hidden, x = read.add_norm2(residual, out)  # (B, T, Dm) each
    return read.mlp(hidden, x), k, v
