"""The decode step: one raw token read after the memory (docs/design.md §8).

Past ``fit-N``'s condensed windows every token is kept raw, so each generated token of the default schedule is this
step. It runs the stock decoder layer's arithmetic on the token, as transformers does for one token after its KV
cache, some of it in fewer calls (the norm, RoPE: the same roundings; its logits equal the plain model's bit for
bit), and writes the token's keys and values straight into the cache's memory buffer (``kv_arena``): nothing is
concatenated or rebuilt per token, and the Python work per token does not grow with the memory.

With bf16 weights on a CPU with native bf16 (:func:`decode_products`), the step runs fused instead: the q/k/v and
gate/up projections as one matrix-vector product each, and RoPE on queries and keys together. The products are
oneDNN's with weights packed once (``"onednn"``: bit for bit the stock bf16 layers still; the packed copy costs as much
memory as the linear weights), or, on a CPU with AVX512-BF16 and no AMX, the native kernels of
:mod:`beacon_llm.native_kernels` (``"native"``: products that read the weights in place, faster than oneDNN's there,
and one token's attention, faster than torch's, and where every layer is the stock one, each layer as one native
call; every output within one bf16 rounding of the exact value, as the stock kernels', but not always the same
rounding; ``benchmarks/decode_matvec.py``).
Where the CPU has no AMX tiles, the step's attention folds the query heads that share a key/value head into query
rows of that head (:func:`should_fold_queries`): the same output, each key read once instead of once per query head.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _compat, native_kernels
from .cache import MemoryAppend

Linear = Callable[[torch.Tensor], torch.Tensor]
PRODUCTS = ("linear", "onednn", "native")  # F.linear on each weight; fused, packed for oneDNN; fused, native kernel
_PACK_MEMORY_SHARE = 4  # pack only when the packed copy takes at most 1/4 of the memory still available


@dataclass(frozen=True)
class _FusedLayer:
    """One layer of the packed step: fused projections and the norms."""

    qkv: Linear  # x -> [q | k | v]
    o: Linear
    gate_up: Linear  # x -> [gate | up]
    down: Linear
    act: Linear
    norm1: Linear  # the input RMSNorm
    norm2: Linear  # the post-attention RMSNorm
    n_q: int  # query features (heads x head_dim)
    n_k: int  # key features (kv heads x head_dim)
    n_inter: int  # MLP intermediate features


@dataclass(frozen=True)
class _LayerLinears:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    act: Linear
    norm1: Linear
    norm2: Linear


class DecodeLinears:
    """The decode step's linear kernels for one model's current weights: ``F.linear`` on each weight
    (``products="linear"``), or the fused step's products (``"onednn"``: weights packed once; ``"native"``: the native
    kernel reading them in place). ``matches(model)`` tells whether they still describe the model's weights (a weight
    replaced or changed in place makes them stale)."""

    def __init__(self, model: nn.Module, *, products: str = "linear") -> None:
        if products not in PRODUCTS:
            raise ValueError(f"products={products!r}: expected one of {PRODUCTS}")
        self.products = products
        self.packed = products != "linear"  # the fused step
        self.fold_queries = self.packed and should_fold_queries()
        # one token's attention over the memory: the native kernel with the native products, else torch's SDPA
        self.native_attention = native_kernels.kernels() if products == "native" else None
        # with the native products, each stock layer in one native call (None where a layer is not stock)
        self.native_layers = _native_layers(model) if products == "native" else None
        self.layers: list[_LayerLinears] = []
        self.fused: list[_FusedLayer] = []
        self._watched = _watched_weights(model)
        self._modules = _ModuleSlots(model)
        if self.packed:
            product = _native_product if products == "native" else _packed_product
            for layer in model.model.layers:
                self.fused.append(_fused_layer(layer, product))
            self.lm_head = product(model.lm_head)
            return
        for layer in model.model.layers:
            attn = layer.self_attn
            gate, up, down, act = _compat.mlp_parts(layer.mlp)
            q, k, v, o = (self._kernel(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
            norm1, norm2 = _norms(layer)
            self.layers.append(
                _LayerLinears(q, k, v, o, self._kernel(gate), self._kernel(up), self._kernel(down), act, norm1, norm2)
            )
        self.lm_head = self._kernel(model.lm_head)

    @staticmethod
    def _kernel(module: nn.Linear) -> Linear:
        if type(module) is not nn.Linear or _runs_as_itself(module):
            return module  # a wrapped or hooked projection (or one whose forward was replaced) runs as itself
        return functools.partial(torch.nn.functional.linear, weight=module.weight, bias=module.bias)

    def matches(self, model: nn.Module) -> bool:
        """Whether every module they stand for is still the model's and runs as it did (none replaced, e.g. by an
        adapter wrapping a projection, none hooked or unhooked since), and every weight they were made from is still
        in its module, unchanged (checked on every decode step: the modules' identities and hooks, a dictionary
        lookup, the version counter and the storage of each weight)."""
        if self._watched[0] is not model.lm_head or not self._modules.unchanged():
            return False
        return all(params.get(name) is p and _state(p) == state for params, name, p, state in self._watched[1])


def _packed_product(*mods: nn.Linear) -> Linear:
    """One oneDNN product of the modules' stacked weights (a packed copy)."""
    weight = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight
    bias = _cat_bias(*mods)
    return functools.partial(_compat.packed_linear, weight=_compat.pack_linear_weight(weight.detach()), bias=bias)


def _native_product(*mods: nn.Linear) -> Linear:
    """One native-kernel product of the modules' weights, read in place as consecutive row blocks."""
    kernel = native_kernels.kernels()
    if kernel is None:
        raise RuntimeError(f"the native bf16 kernels are not available: {native_kernels.unavailable()}")
    return kernel.linear([(m.weight, m.bias) for m in mods])


def _native_layers(model: nn.Module) -> list[native_kernels.NativeLayer] | None:
    """Every decoder layer as one native call, or None when one is not the stock layer the kernel computes (stock
    RMSNorms, SiLU, head size a multiple of 32 up to 256, at most 16 query heads per key/value head)."""
    kernel = native_kernels.kernels()
    layers = []
    for layer in model.model.layers:
        attn = layer.self_attn
        gate, up, down, act = _compat.mlp_parts(layer.mlp)
        eps = [_compat.stock_rms_norm_eps(n) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        head_dim = attn.head_dim
        n_heads, n_kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        if (
            kernel is None
            or None in eps
            or not _compat.is_stock_silu(act)
            or head_dim % 32
            or head_dim > 256
            or n_heads % n_kv
            or n_heads // n_kv > 16
        ):
            return None
        try:
            native = kernel.layer(
                norms=(layer.input_layernorm.weight, layer.post_attention_layernorm.weight),
                eps=eps,
                qkv=[(m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)],
                o=[(attn.o_proj.weight, attn.o_proj.bias)],
                gate_up=[(m.weight, m.bias) for m in (gate, up)],
                down=[(down.weight, down.bias)],
                scale=attn.scaling,
                n_heads=n_heads,
                n_kv=n_kv,
                head_dim=head_dim,
            )
        except ValueError:  # e.g. a norm weight not in bf16: the separate operators
            return None
        layers.append(native)
    return layers


def _cat_bias(*mods: nn.Linear) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods]).detach()


def _norms(layer: nn.Module) -> tuple[Linear, Linear]:
    """The layer's input and post-attention norms as the step calls them (one fused call where stock)."""
    device = layer.input_layernorm.weight.device
    return tuple(_compat.rms_norm_kernel(n, device) for n in (layer.input_layernorm, layer.post_attention_layernorm))


def _fused_layer(layer: nn.Module, product: Callable[..., Linear]) -> _FusedLayer:
    attn = layer.self_attn
    gate, up, down, act = _compat.mlp_parts(layer.mlp)
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    norm1, norm2 = _norms(layer)
    return _FusedLayer(
        qkv=product(q, k, v),
        o=product(attn.o_proj),
        gate_up=product(gate, up),
        down=product(down),
        act=act,
        norm1=norm1,
        norm2=norm2,
        n_q=q.out_features,
        n_k=k.out_features,
        n_inter=gate.out_features,
    )


def _watched_weights(model: nn.Module) -> tuple[nn.Module, list[tuple[dict, str, torch.Tensor, int]]]:
    """The weights the decode step's kernels hold (linear and norm weights): (their modules' parameter dict, name,
    tensor, in-place version)."""
    mods = _projections(model)
    for layer in model.model.layers:
        mods += [layer.input_layernorm, layer.post_attention_layernorm]
    watched = [
        (m._parameters, name, m._parameters[name], _state(m._parameters[name]))
        for m in mods
        for name in ("weight", "bias")
        if m._parameters.get(name) is not None
    ]
    return (model.lm_head, watched)


class _ModuleSlots:
    """Where each module the decode step's kernels stand for sits in the model (its parent's ``_modules`` entry,
    down from the model through every layer to the projections, norms and activations), and which of those ran as
    the plain module (no hooks, forward not replaced on the instance) when the kernels were made: the kernels were
    chosen by these. The check runs on every token, so it is C-level loops over dictionaries (``map``), not a walk
    through ``nn.Module.__getattr__`` (ten times the cost)."""

    def __init__(self, model: nn.Module) -> None:
        self.boxes: list[dict] = []
        self.names: list[str] = []
        self.mods: list[Any] = []
        inner = self._child(model, "model")
        leaves = [self._child(model, "lm_head")]
        layers = self._child(inner, "layers")
        self.layer_box, self.n_layers = layers._modules, len(layers._modules)
        for key in list(layers._modules):
            layer = self._child(layers, key)
            attn, mlp = self._child(layer, "self_attn"), self._child(layer, "mlp")
            leaves += [self._child(layer, name) for name in ("input_layernorm", "post_attention_layernorm")]
            leaves += [self._child(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            leaves += [self._child(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
        plain = [m for m in leaves if isinstance(m, nn.Module) and not _runs_as_itself(m)]
        # a plain module stays plain while these stay empty and its __dict__ has no "forward"
        self.hooks = [d for m in plain for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.dicts = [vars(m) for m in plain]

    def _child(self, parent: nn.Module, name: str) -> Any:
        box = parent._modules if name in parent._modules else vars(parent)
        self.boxes.append(box)
        self.names.append(name)
        self.mods.append(box[name])
        return box[name]

    def unchanged(self) -> bool:
        """Whether every slot still holds its module and each plain one is still plain."""
        return (
            len(self.layer_box) == self.n_layers
            and all(map(operator.is_, map(dict.get, self.boxes, self.names), self.mods))
            and not any(map(len, self.hooks))
            and not any(map(dict.__contains__, self.dicts, itertools.repeat("forward")))
        )


def _runs_as_itself(module: Any) -> bool:
    """Whether ``module`` has forward hooks or a forward replaced on the instance (False for a plain function)."""
    if not isinstance(module, nn.Module):
        return False
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)


def _state(p: torch.Tensor) -> tuple[int, int]:
    """What makes a weight's kernels stale: its in-place version and its storage (``.data`` replaced, as
    ``model.to(...)`` does, keeps the version; a new dtype or device is new storage too)."""
    return (p._version, p.data_ptr())


def decode_products(model: nn.Module) -> str:
    """The products of the inference decode step (:data:`PRODUCTS`), decided when its kernels are made: ``"linear"``
    unless the model has bf16 weights on a CPU with native bf16 and plain (unwrapped, unhooked) projections; then
    ``"native"`` on a CPU with AVX512-BF16 and no AMX tiles where the kernel builds (measured there:
    ``benchmarks/decode_matvec.py``; with AMX, oneDNN's packed product is the one measured fast), else ``"onednn"``
    where its packed kernels exist and the packed copy (as large as the linear weights) takes at most a quarter of
    the memory still available."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _compat.native_bf16_cpu():
        return "linear"
    if not _plain_projections(model):
        return "linear"  # a wrapped or hooked projection runs as itself
    if native_kernels.preferred() is not None:
        return "native"
    if not _compat.packed_linear_available():
        return "linear"
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    available = _available_memory()
    return "onednn" if available is None or nbytes * _PACK_MEMORY_SHARE <= available else "linear"


def _projections(model: nn.Module) -> list[nn.Module]:
    """Every projection the decode step reads: the output head, then each layer's q, k, v, o, gate, up and down."""
    mods: list[nn.Module] = [model.lm_head]
    for layer in model.model.layers:
        attn = layer.self_attn
        mods += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *_compat.mlp_parts(layer.mlp)[:3]]
    return mods


def _plain_projections(model: nn.Module) -> bool:
    """Whether every projection the fused step reads is a plain ``nn.Linear`` without hooks."""
    return all(type(m) is nn.Linear and not _runs_as_itself(m) for m in _projections(model))


def should_fold_queries() -> bool:
    """Whether the packed bf16 step's attention folds the G query heads of each key/value head into G query rows
    of one head: on a CPU without AMX tiles, torch's CPU attention kernel spends most of its time in one small bf16
    matrix product per query head and key block, and folding makes one per key/value head (after 32K tokens of
    the bundled book, 7,040 entries: 28 instead of 128 ms per token on an AMD EPYC with AVX512-BF16). With AMX the
    unfolded call is the faster one (19 against 24 ms); ``benchmarks/decode_attention.py`` measures both. The
    outputs are the same (the same rows of the same products)."""
    return not _compat.amx_cpu()


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            return None
    return None


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin (1, 1, D) of the token as (1, 1, 1, D) factors of :func:`_rotate`: ``rotate_half(x) * sin`` equals
    ``roll(x, D/2) * sin'`` with the first half of ``sin'`` negated (one exact sign flip moved from x to sin)."""
    half = cos.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], -1)  # (1, 1, D)
    return cos[:, None], signed[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotate-half RoPE of x (1, H, 1, D) with the factors of :func:`_rotation`: the same products and sum,
    rounded as the stock ``x * cos + rotate_half(x) * sin``, in four operations instead of seven."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def raw_token_step(
    model: nn.Module, linears: DecodeLinears, token: torch.Tensor, append: MemoryAppend, attention: Callable
) -> torch.Tensor:
    """Read one raw token after the memory: every layer of the stock decoder, its key/value written into the
    reserved memory entry ``append.start`` (its position). Returns the final-normed hidden state (1, 1, Dm).

    token: (1,) long. ``attention`` is the model's attention kernel (transformers' ``sdpa`` / ``eager`` / flash).
    """
    inner = model.model
    position = append.start
    hidden = inner.embed_tokens(token[None])  # (1, 1, Dm)
    cos, sin = inner.rotary_emb(hidden, torch.tensor([[position]], device=hidden.device))  # (1, 1, D) each
    if linears.native_layers is not None and append.end - append.start == 1:
        if linears.native_layers[0].fits(*append.layer_memory(0)):  # every layer's memory is laid out alike
            return _native_token_step(model, linears.native_layers, hidden, cos, sin, append)
    cos, sin = _rotation(cos, sin)  # (1, 1, 1, D) each
    if linears.packed:
        return _fused_token_step(model, linears, hidden, cos, sin, append)
    for i, (layer, lin) in enumerate(zip(inner.layers, linears.layers)):
        attn = layer.self_attn
        head_dim = attn.head_dim
        x = lin.norm1(hidden)  # (1, 1, Dm)
        q = lin.q(x).view(1, -1, 1, head_dim)  # (1, H, 1, D): one token, so the head axis needs no transpose
        k = lin.k(x).view(1, -1, 1, head_dim)  # (1, KVH, 1, D)
        v = lin.v(x).view(1, -1, 1, head_dim)  # (1, KVH, 1, D)
        keys, values = append.write(i, _rotate(k, cos, sin), v)  # (1, KVH, M + 1, D) each
        out, _ = attention(attn, _rotate(q, cos, sin), keys, values, None, dropout=0.0, scaling=attn.scaling)
        hidden = hidden + lin.o(out.reshape(1, 1, -1))  # (1, 1, Dm)
        x = lin.norm2(hidden)
        hidden = hidden + lin.down(lin.act(lin.gate(x)) * lin.up(x))
    return inner.norm(hidden)  # (1, 1, Dm)


def _native_token_step(
    model: nn.Module,
    layers: list[native_kernels.NativeLayer],
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    append: MemoryAppend,
) -> torch.Tensor:
    """:func:`raw_token_step` with each layer one native call (:class:`beacon_llm.native_kernels.NativeLayer`): the
    stock layer's operations and bf16 rounding points, the products and attention of the native kernels; the token's
    key and value written into its reserved memory row by the kernel. hidden: (1, 1, Dm); cos / sin: (1, 1, D)."""
    state = hidden.reshape(-1).clone()  # (Dm,) the residual stream, updated in place layer by layer
    cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()  # (D,) each
    m = append.end  # entries each layer attends to, the new one included
    scratch = torch.empty(max(layer.scratch_size for layer in layers), dtype=torch.bfloat16)
    work = torch.empty(max(layer.work_size(m) for layer in layers), dtype=torch.float32)
    for i, layer in enumerate(layers):
        keys, values = append.layer_memory(i)  # (1, KVH, M + 1, D) each: the new row is the last
        layer(state, cos, sin, keys, values, scratch, work)
    return model.model.norm(state.view(1, 1, -1))  # (1, 1, Dm)


def _fused_token_step(
    model: nn.Module,
    linears: DecodeLinears,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    append: MemoryAppend,
) -> torch.Tensor:
    """:func:`raw_token_step` with fused projections (bf16 on the CPU). hidden: (1, 1, Dm); cos / sin from
    :func:`_rotation`. Each fused product equals the separate ones bit for bit (every output is the same dot product),
    RoPE is elementwise, and the norms, attention call and MLP formula are the stock layer's: the logits equal the
    stock bf16 layers' (tested). Every view is taken so that no step copies more than the layer's own outputs."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for i, (layer, f) in enumerate(zip(model.model.layers, linears.fused)):
        attn = layer.self_attn
        head_dim = attn.head_dim
        n_heads, n_kv = f.n_q // head_dim, f.n_k // head_dim
        qkv = f.qkv(f.norm1(hidden)).view(1, n_heads + 2 * n_kv, 1, head_dim)  # (1, H + 2 KVH, 1, D)
        qk = _rotate(qkv.narrow(1, 0, n_heads + n_kv), cos, sin)  # (1, H + KVH, 1, D)
        q, k, v = qk.narrow(1, 0, n_heads), qk.narrow(1, n_heads, n_kv), qkv.narrow(1, n_heads + n_kv, n_kv)
        keys, values = append.write(i, k, v)  # (1, KVH, M + 1, D) each
        folded = q.view(1, n_kv, n_heads // n_kv, head_dim)  # query head h reads key/value head h // G (enable_gqa)
        native = linears.native_attention
        if native is not None and native.attention_fits(folded, keys, values):
            out = native.attention(folded, keys, values, attn.scaling)  # (1, KVH, G, D)
        elif linears.fold_queries and n_heads != n_kv:
            out = sdpa(folded, keys, values, scale=attn.scaling)  # (1, KVH, G, D)
        else:
            out = sdpa(q, keys, values, scale=attn.scaling, enable_gqa=n_heads != n_kv)  # (1, H, 1, D)
        hidden = hidden + f.o(out.reshape(1, 1, f.n_q))  # heads in order either way
        gate_up = f.gate_up(f.norm2(hidden))  # (1, 1, 2 I)
        hidden = hidden + f.down(f.act(gate_up.narrow(-1, 0, f.n_inter)) * gate_up.narrow(-1, f.n_inter, f.n_inter))
    return model.model.norm(hidden)  # (1, 1, Dm)
