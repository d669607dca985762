"""The read's elementwise steps as native row kernels (docs/design.md §8).

Between a read step's products, a stock Llama layer runs a dozen eager operators on every window (the residual sum,
the RMSNorm's passes through float32, RoPE's products and concatenation, SiLU and its product with up), each a pass
over a few hundred rows. Where :func:`beacon_llm.native_kernels.preferred` gives the native kernels, a bf16 read
without gradient runs each of them as one native pass instead, with the stock operations' bf16 rounding points:
RoPE and the residual sum bit for bit, the norm and SiLU within one bf16 rounding (their float32 sums and
exponentials are computed in another order). The products and the attention are the layer's own modules and the
attention function of the step. A norm or activation that is not the stock one (hooked, replaced, another class)
runs as itself.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _compat, native_kernels
from .attention import rope as stock_rope


class ReadLayer:
    """One decoder layer's norms, RoPE and MLP for a read step, on the native row kernels where they apply. Made per
    step: it reads the modules' weights when called."""

    def __init__(self, layer: nn.Module, native: native_kernels.NativeKernels) -> None:
        self._layer = layer
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self._eps = [_compat.stock_rms_norm_eps(n) if n.weight.dtype == torch.bfloat16 else None for n in norms]
        self._mlp = None  # (gate, up, down) of a stock MLP with a stock SiLU; else the MLP runs as itself
        if _compat.is_stock_mlp(layer.mlp):
            gate, up, down, act = _compat.mlp_parts(layer.mlp)
            self._mlp = (gate, up, down) if _compat.is_stock_silu(act) else None
        self._native = native

    def norm1(self, hidden: torch.Tensor) -> torch.Tensor:
        """The input RMSNorm of hidden (B, T, Dm)."""
        norm, eps = self._layer.input_layernorm, self._eps[0]
        return norm(hidden) if eps is None else self._native.rms_norm(hidden, norm.weight, eps)[1]

    def add_norm2(self, residual: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h = residual + out, the post-attention RMSNorm of h), each (B, T, Dm)."""
        norm, eps = self._layer.post_attention_layernorm, self._eps[1]
        if eps is None or out.dtype != torch.bfloat16:
            hidden = residual + out
            return hidden, norm(hidden)
        return self._native.rms_norm(residual, norm.weight, eps, out)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) by cos / sin (B, T, D) (the stock RoPE where the kernel does not take them)."""
        if x.shape[0] != 1 or x.stride(3) != 1 or x.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16:
            return stock_rope(x, cos, sin)
        return self._native.rope(x, cos, sin)

    def mlp(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """hidden + down(silu(gate(x)) * up(x)), hidden and x (B, T, Dm)."""
        if self._mlp is None:
            return hidden + self._layer.mlp(x)
        gate, up, down = self._mlp
        g, u = gate(x), up(x)  # (B, T, I) each
        if g.dtype != torch.bfloat16 or u.dtype != torch.bfloat16:  # e.g. a projection wrapped to return float32
            return hidden + down(self._layer.mlp.act_fn(g) * u)
        return hidden + down(self._native.silu_mul(g, u))


def read_layers(model: nn.Module, like: torch.Tensor) -> list[ReadLayer] | None:
    """Each decoder layer's :class:`ReadLayer` for a read step on hidden states like ``like`` (B, T, Dm): bf16 on the
    CPU without gradient, where :func:`beacon_llm.native_kernels.preferred` gives the native kernels; else None (the
    layers' own modules)."""
    if like.dtype != torch.bfloat16 or like.device.type != "cpu" or torch.is_grad_enabled():
        return None
    native = native_kernels.preferred()
    if native is None:
        return None
    return [ReadLayer(layer, native) for layer in model.model.layers]


__all__ = ["ReadLayer", "read_layers"]
