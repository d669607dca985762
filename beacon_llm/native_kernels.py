"""Native bf16 kernels for CPUs with AVX512-BF16: the decode step's and the read's attention (docs/design.md §8,
"The native kernels").

A generated token reads every linear weight once and every key and value of the memory once, so its products and
its attention run at the speed those bytes stream from memory. On CPUs with AVX512-BF16 but no AMX (AMD Zen 4),
oneDNN's packed bf16 product and torch's CPU attention kernel stay well below that. ``kernels/matvec_bf16.c`` (the
products: float32 accumulation, one bf16 rounding per output, software prefetch) and ``kernels/attention_bf16.c``
(one token's grouped-query attention, split over the keys, float32 softmax) keep the stream full, and
``kernels/layer_bf16.c`` runs a whole stock decoder layer for one token in one call (the elementwise steps between
the products without an operator call each); ``benchmarks/decode_matvec.py`` measures them against the stock
kernels. Reading a document, ``kernels/read_attention_bf16.c`` is the windows' attention over the memory and
themselves (flash-style, with the beacon or causal mask; ``benchmarks/read_attention.py``), and
``kernels/rows_bf16.c`` the norms, RoPE and SiLU between a window's products (``beacon_llm.read_layers``;
``benchmarks/read_layers.py``). They are compiled once
per machine with the C compiler found on the path (``$CC``, ``cc`` or ``gcc``) into ``$BEACON_LLM_HOME/kernels`` and
linked against the OpenMP runtime torch already loaded, so both share one thread pool. Where any of that is missing
(no compiler, another CPU, another OpenMP runtime, ``BEACON_LLM_NATIVE_KERNELS=0``) the stock kernels are kept;
:func:`unavailable` says why. With AMX tiles the stock kernels stay the default (:func:`preferred`);
``BEACON_LLM_NATIVE_KERNELS=1`` uses the native ones there too, to measure them against the stock ones.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _compat

logger = logging.getLogger(__name__)

_KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = tuple(
    _KERNELS / name
    for name in ("matvec_bf16.c", "attention_bf16.c", "layer_bf16.c", "read_attention_bf16.c", "rows_bf16.c")
)
HEADERS = (_KERNELS / "bf16.h", _KERNELS / "exp_avx512.h")  # included by the sources: part of the build digest
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-fPIC")
SETTING_ENV = "BEACON_LLM_NATIVE_KERNELS"  # 0: never; 1: also with AMX; unset: where measured faster
_ENV_OFF = ("0", "false", "no", "off")
_ENV_ON = ("1", "true", "yes", "on")
_BUILD_TIMEOUT_S = 300
_MAX_PARTS = 64  # key parts per head in the attention kernel (its merge buffer)
_KEYS_PER_PART = 512
READ_ATTENTION_EVENT = "beacon_llm::read_attention"
_load_lock = threading.Lock()


class NativeLinear:
    """``F.linear(x, cat(weights), cat(biases))`` for bf16 vectors on the CPU through the native kernel, reading the
    row blocks in place (q, k, v as one product without a concatenated copy). Holds its own references to the
    weights, so the pointers stay valid while it lives."""

    __slots__ = ("_function", "_keep", "_blocks", "_biases", "_rows", "_n_blocks", "in_features", "out_features")

    def __init__(self, function, blocks: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        weights = [w.detach().contiguous() for w, _ in blocks]  # (rows_i, K) each
        in_features = weights[0].shape[-1]
        for w in weights:
            if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() != 2 or w.shape[1] != in_features:
                raise ValueError(
                    f"the native kernel multiplies 2-D bf16 CPU weights with {in_features} columns, got "
                    f"{tuple(w.shape)} {w.dtype} on {w.device}; use F.linear for this weight"
                )
        biases = [None if b is None else b.detach().to(torch.bfloat16).contiguous() for _, b in blocks]
        self._function = function
        self._keep = (weights, biases)
        self._n_blocks = len(weights)
        self._blocks = (ctypes.c_void_p * self._n_blocks)(*(w.data_ptr() for w in weights))
        self._biases = (ctypes.c_void_p * self._n_blocks)(*(None if b is None else b.data_ptr() for b in biases))
        self._rows = (ctypes.c_long * self._n_blocks)(*(w.shape[0] for w in weights))
        self.in_features = in_features
        self.out_features = sum(w.shape[0] for w in weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) bf16 -> (..., N) bf16, one kernel call per row of x."""
        if x.dtype != torch.bfloat16 or x.shape[-1] != self.in_features or x.device.type != "cpu":
            raise ValueError(
                f"expected a bf16 CPU input with {self.in_features} features, got {tuple(x.shape)} {x.dtype} on "
                f"{x.device}"
            )
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.bfloat16)  # (..., N)
        threads = torch.get_num_threads()
        x_ptr, y_ptr = x.data_ptr(), y.data_ptr()
        for row in range(x.numel() // self.in_features):
            self._function(
                self._blocks,
                self._biases,
                self._rows,
                self._n_blocks,
                x_ptr + 2 * row * self.in_features,
                y_ptr + 2 * row * self.out_features,
                self.in_features,
                threads,
            )
        return y


_P, _N = ctypes.c_void_p, ctypes.c_long


class _LayerOperands(ctypes.Structure):
    """``beacon_layer`` of ``kernels/layer_bf16.c`` (the same fields in the same order)."""

    _fields_ = [
        ("norm1", _P), ("norm2", _P),
        ("qkv", _P * 3), ("qkv_bias", _P * 3), ("qkv_rows", _N * 3),
        ("o", _P * 1), ("o_bias", _P * 1), ("o_rows", _N * 1),
        ("gate_up", _P * 2), ("gate_up_bias", _P * 2), ("gate_up_rows", _N * 2),
        ("down", _P * 1), ("down_bias", _P * 1), ("down_rows", _N * 1),
        ("eps1", ctypes.c_double), ("eps2", ctypes.c_double), ("scale", ctypes.c_double),
        ("hidden", _N), ("n_heads", _N), ("n_kv", _N), ("head_dim", _N), ("inter", _N),
    ]  # fmt: skip


class NativeLayer:
    """One stock decoder layer (RMSNorm, q/k/v, RoPE, attention, o, RMSNorm, SiLU-gated MLP) for one bf16 token in
    one native call (``kernels/layer_bf16.c``), reading the weights in place; holds its own references to them."""

    def __init__(self, function, *, norms, eps, qkv, o, gate_up, down, scale: float, n_heads: int, n_kv: int,
                 head_dim: int) -> None:  # fmt: skip
        def prepared(blocks):
            weights = [w.detach().contiguous() for w, _ in blocks]
            biases = [None if b is None else b.detach().to(torch.bfloat16).contiguous() for _, b in blocks]
            return weights, biases

        groups = {"qkv": prepared(qkv), "o": prepared(o), "gate_up": prepared(gate_up), "down": prepared(down)}
        norm_weights = [n.detach().contiguous() for n in norms]
        tensors = [*norm_weights] + [t for w, b in groups.values() for t in [*w, *b] if t is not None]
        if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors):
            raise ValueError("the native layer takes bf16 CPU weights; use the decode step's separate kernels")
        self._keep = (norm_weights, groups)
        operands = _LayerOperands()
        operands.norm1, operands.norm2 = (n.data_ptr() for n in norm_weights)
        for name, (weights, biases) in groups.items():
            for i, (w, b) in enumerate(zip(weights, biases)):
                getattr(operands, name)[i] = w.data_ptr()
                getattr(operands, f"{name}_bias")[i] = None if b is None else b.data_ptr()
                getattr(operands, f"{name}_rows")[i] = w.shape[0]
        operands.eps1, operands.eps2 = float(eps[0]), float(eps[1])
        operands.scale = float(scale)
        operands.hidden = norm_weights[0].numel()
        operands.n_heads, operands.n_kv, operands.head_dim = n_heads, n_kv, head_dim
        operands.inter = groups["gate_up"][0][0].shape[0]
        self.operands = operands
        self.scratch_size = 2 * operands.hidden + (2 * n_heads + 2 * n_kv) * head_dim + 3 * operands.inter
        self._function = function

    def work_size(self, m: int) -> int:
        """float32 scratch elements of this layer's attention over ``m`` entries."""
        o = self.operands
        return attention_work_size(o.n_kv, o.n_heads // o.n_kv, o.head_dim, m)

    def fits(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether the layer's memory views (1, KVH, M, D) are laid out as the kernel reads them."""
        o = self.operands
        return (
            keys.shape == values.shape == (1, o.n_kv, keys.shape[2], o.head_dim)
            and keys.dtype == values.dtype == torch.bfloat16
            and keys.stride()[2:] == (o.head_dim, 1) == values.stride()[2:]
            and keys.stride(1) == values.stride(1)
        )

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, scratch: torch.Tensor, work: torch.Tensor) -> None:  # fmt: skip
        """hidden (Dm,) bf16, updated in place; cos / sin (D,) bf16; keys / values (1, KVH, M, D) the layer's memory
        views (:meth:`fits`), whose last row receives the token's key and value; scratch (``scratch_size``,) bf16 and
        work (:func:`attention_work_size`,) float32."""
        o, m = self.operands, keys.shape[2]
        checks = (
            (hidden, torch.bfloat16, o.hidden),
            (cos, torch.bfloat16, o.head_dim),
            (sin, torch.bfloat16, o.head_dim),
            (scratch, torch.bfloat16, self.scratch_size),
            (work, torch.float32, self.work_size(m)),
        )
        for t, dtype, size in checks:  # the kernel trusts these sizes: refuse anything smaller
            if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or t.numel() < size:
                raise ValueError(f"native layer operand: expected {size} contiguous {dtype} on the CPU, got "
                                 f"{tuple(t.shape)} {t.dtype} on {t.device}")  # fmt: skip
        if not self.fits(keys, values):
            raise ValueError(
                f"the memory views {tuple(keys.shape)} / {keys.stride()} are not laid out as it reads them"
            )
        self._function(
            ctypes.byref(self.operands), hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
            values.data_ptr(), keys.stride(1), m - 1, m, attention_parts(m), scratch.data_ptr(), work.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip


def attention_parts(m: int) -> int:
    """Key parts per head of the native attention over ``m`` entries (about 512 keys each)."""
    return max(1, min(_MAX_PARTS, -(-m // _KEYS_PER_PART)))


def attention_work_size(n_kv: int, g: int, d: int, m: int) -> int:
    """float32 scratch elements of the native attention over ``m`` entries."""
    return n_kv * g * m + n_kv * attention_parts(m) * g * (d + 2)


class NativeKernels:
    """The loaded kernel library (``path``): :meth:`linear` makes a product from weight row blocks, :meth:`attention`
    attends one token's queries to a head-major key/value memory, :meth:`read_attention` a window's queries to the
    memory and the window (:meth:`attention_forward`: the same as a transformers attention function), and
    :meth:`rms_norm`, :meth:`silu_mul` and :meth:`rope` run a window's elementwise steps row by row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        library = ctypes.CDLL(str(path))  # CDLL calls release the GIL
        p, i, n, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
        self._matvec = library.beacon_matvec_bf16
        self._matvec.argtypes = [p, p, p, i, p, p, n, i]
        self._matvec.restype = None
        self._attention = library.beacon_decode_attention_bf16
        self._attention.argtypes = [p, p, p, n, n, n, n, n, n, f, p, p, i]
        self._attention.restype = None
        self._layer = library.beacon_decode_layer_bf16
        self._layer.argtypes = [p, p, p, p, p, p, n, n, n, n, p, p, i]
        self._layer.restype = None
        self._read_attention = library.beacon_read_attention_bf16
        self._read_attention.argtypes = [p, n, n, p, p, p, p, n, n, n, n, n, n, n, f, p, i]
        self._read_attention.restype = ctypes.c_int
        self._add_rms_norm = library.beacon_add_rms_norm_bf16
        self._add_rms_norm.argtypes = [p, p, p, f, n, n, p, p, i]
        self._add_rms_norm.restype = None
        self._silu_mul = library.beacon_silu_mul_bf16
        self._silu_mul.argtypes = [p, p, n, n, p, i]
        self._silu_mul.restype = None
        self._rope = library.beacon_rope_bf16
        self._rope.argtypes = [p, n, n, n, n, p, p, n, p, i]
        self._rope.restype = None

    def linear(self, blocks: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> NativeLinear:
        """The product ``x -> x @ cat(W_i).T + cat(b_i)`` of the (weight, bias or None) row blocks."""
        return NativeLinear(self._matvec, blocks)

    def layer(self, **operands) -> NativeLayer:
        """One decoder layer's step (:class:`NativeLayer`; keyword operands as its constructor's)."""
        return NativeLayer(self._layer, **operands)

    @staticmethod
    def attention_fits(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether :meth:`attention` takes these: bf16 CPU tensors, query (1, KVH, G, D) contiguous with G <= 16, keys
        and values (1, KVH, M, D) with rows of D contiguous elements and the same head stride, D a multiple of 32 up
        to 256."""
        tensors = (query, keys, values)
        if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 4 or t.shape[0] != 1 for t in tensors):
            return False
        _, n_kv, g, d = query.shape
        return (
            query.is_contiguous()
            and g <= 16
            and d % 32 == 0
            and d <= 256
            and keys.shape == values.shape
            and keys.shape[1] == n_kv
            and keys.shape[3] == d
            and keys.shape[2] >= 1
            and keys.stride()[2:] == (d, 1) == values.stride()[2:]
            and keys.stride(1) == values.stride(1)
        )

    def attention(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(scale q K^T) V for each key/value head and its G query rows: query (1, KVH, G, D), keys / values
        (1, KVH, M, D) (:meth:`attention_fits`) -> (1, KVH, G, D) bf16, as ``scaled_dot_product_attention`` without a
        mask, within float32 and one bf16 rounding."""
        if not self.attention_fits(query, keys, values):
            raise ValueError(
                f"the native attention takes bf16 CPU query (1, KVH, G<=16, D) and keys/values (1, KVH, M, D) with "
                f"contiguous rows, D a multiple of 32 up to 256; got {tuple(query.shape)}, {tuple(keys.shape)} "
                f"{keys.dtype}; use scaled_dot_product_attention"
            )
        _, n_kv, g, d = query.shape
        m = keys.shape[2]
        parts = attention_parts(m)
        out = torch.empty_like(query)  # (1, KVH, G, D)
        work = torch.empty(attention_work_size(n_kv, g, d, m), dtype=torch.float32)
        self._attention(
            query.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(1),
            n_kv,
            g,
            d,
            m,
            parts,
            scale,
            out.data_ptr(),
            work.data_ptr(),
            torch.get_num_threads(),
        )
        return out

    @staticmethod
    def read_attention_fits(
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        causal: bool = False,
    ) -> bool:
        """Whether :meth:`read_attention` takes these: bf16 CPU tensors, query (1, H, T, D) with contiguous rows,
        keys and values (1, KVH, K, D) with contiguous rows, H a multiple of KVH, D a multiple of 32 up to 256; mask
        None or a bool (1, 1, T, K) with contiguous rows; ``causal`` with at least as many keys as queries; no
        gradient to carry (the kernel has no backward)."""
        tensors = (query, keys, values)
        if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 4 or t.shape[0] != 1 for t in tensors):
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        _, n_heads, t_len, d = query.shape
        _, n_kv, n_keys, _ = keys.shape
        if causal and n_keys < t_len:
            return False
        if mask is not None and (
            mask.dtype != torch.bool
            or mask.device.type != "cpu"
            or mask.shape != (1, 1, t_len, n_keys)
            or (t_len > 1 and mask.stride(2) < n_keys)
            or mask.stride(3) != 1
        ):
            return False
        return (
            query.stride(3) == 1
            and d % 32 == 0
            and d <= 256
            and n_kv >= 1
            and n_heads % n_kv == 0
            and n_keys >= 1
            and keys.shape == values.shape
            and keys.shape[3] == d
            and keys.stride(3) == 1 == values.stride(3)
        )

    def read_attention(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        *,
        causal: bool = False,
    ) -> torch.Tensor:
        """softmax(scale q K^T, over the visible keys) V for a window of queries (paper v2 §2.2: every window reads
        the memory and itself): query (1, H, T, D), keys / values (1, KVH, K, D), mask None (every key visible) or
        (1, 1, T, K) bool, True = visible (:meth:`read_attention_fits`); ``causal``: query t also sees only the keys
        up to K - T + t (the queries are the last T keys: a raw window after the memory, without a (T, K) mask)
        -> (1, T, H, D) bf16, as ``scaled_dot_product_attention`` within float32 and one bf16 rounding (a row that
        sees no key reads zeros)."""
        if not self.read_attention_fits(query, keys, values, mask, causal=causal):
            raise ValueError(
                f"the native read attention takes bf16 CPU query (1, H, T, D), keys/values (1, KVH, K, D) with "
                f"contiguous rows and a bool (1, 1, T, K) mask or none, D a multiple of 32 up to 256, at least T keys "
                f"when causal, and no gradient; got causal={causal}, "
                f"{tuple(query.shape)} {query.dtype}, {tuple(keys.shape)}, mask "
                f"{None if mask is None else (tuple(mask.shape), mask.dtype)}; use scaled_dot_product_attention"
            )
        _, n_heads, t_len, d = query.shape
        _, n_kv, n_keys, _ = keys.shape
        out = torch.empty(1, t_len, n_heads, d, dtype=torch.bfloat16)  # (1, T, H, D)
        strides = (ctypes.c_long * 4)(keys.stride(1), keys.stride(2), values.stride(1), values.stride(2))
        with torch.profiler.record_function(READ_ATTENTION_EVENT):  # a named event in torch.profiler traces
            failed = self._read_attention(
                query.data_ptr(),
                query.stride(1),
                query.stride(2),
                keys.data_ptr(),
                values.data_ptr(),
                strides,
                None if mask is None else mask.data_ptr(),
                0 if mask is None else mask.stride(2),
                n_keys - t_len if causal else -1,
                n_kv,
                n_heads // n_kv,
                t_len,
                n_keys,
                d,
                scale,
                out.data_ptr(),
                torch.get_num_threads(),
            )
        if failed:
            raise MemoryError(f"the native read attention could not allocate its copy of {n_keys} keys and values")
        return out

    @staticmethod
    def _rows(name: str, *tensors: torch.Tensor) -> None:
        grad = torch.is_grad_enabled()
        for t in tensors:
            if t.dtype != torch.bfloat16 or t.device.type != "cpu" or (grad and t.requires_grad):
                raise ValueError(
                    f"the native {name} takes bf16 CPU tensors and no gradient (it has no backward), got "
                    f"{tuple(t.shape)} {t.dtype} on {t.device} (requires_grad={t.requires_grad}); use the torch "
                    "operators"
                )

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock RMSNorm ``weight * round(h * rsqrt(mean(h^2) + eps))`` of the rows h of x (..., n), or of
        ``x + residual`` rounded (the layer's residual sum); returns (h, the normed rows), both (..., n) bf16, as the
        stock bf16 operators within one rounding of the sum of squares' order."""
        self._rows("RMSNorm", x, weight, *(() if residual is None else (residual,)))
        n = x.shape[-1]
        if weight.shape != (n,) or (residual is not None and residual.shape != x.shape):
            raise ValueError(
                f"RMSNorm of {tuple(x.shape)} rows needs a ({n},) weight and a residual of the same shape, got "
                f"{tuple(weight.shape)} and {None if residual is None else tuple(residual.shape)}"
            )
        x, weight = x.contiguous(), weight.contiguous()
        out = torch.empty_like(x)  # (..., n)
        total = None if residual is None else torch.empty_like(x)
        b = None if residual is None else residual.contiguous()
        self._add_rms_norm(
            x.data_ptr(),
            None if b is None else b.data_ptr(),
            weight.data_ptr(),
            float(eps),
            x.numel() // n,
            n,
            None if total is None else total.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return (x if total is None else total), out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``round(silu(gate)) * up`` rounded, gate and up (..., I) -> (..., I) bf16 (the stock MLP's activation
        and product; within one bf16 rounding of torch's, whose exponential is another float32 polynomial)."""
        self._rows("SiLU", gate, up)
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        gate, up = gate.contiguous(), up.contiguous()
        inter = gate.shape[-1]
        out = torch.empty_like(gate)  # (..., I)
        rows = gate.numel() // inter if inter else 0
        self._silu_mul(gate.data_ptr(), up.data_ptr(), rows, inter, out.data_ptr(), torch.get_num_threads())
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Llama's rotate-half RoPE ``x * cos + rotate_half(x) * sin`` of x (1, H, T, D) (any head and row strides,
        contiguous features) with cos / sin (1, T, D) -> a new (1, H, T, D) tensor (a view of (1, T, H, D) memory),
        each product and the sum rounded as the stock bf16 operators round them (bit for bit but for subnormal
        results, which the bf16 conversion flushes to zero)."""
        self._rows("RoPE", x, cos, sin)
        _, heads, t_len, d = x.shape
        if x.shape[0] != 1 or x.stride(3) != 1 or d % 2 or cos.shape != (1, t_len, d) or sin.shape != cos.shape:
            raise ValueError(
                f"RoPE takes x (1, H, T, D) with contiguous features and even D, cos / sin (1, T, D); got "
                f"{tuple(x.shape)} (strides {x.stride()}), {tuple(cos.shape)}, {tuple(sin.shape)}"
            )
        cos, sin = cos.contiguous(), sin.contiguous()
        out = torch.empty(1, t_len, heads, d, dtype=torch.bfloat16)  # (1, T, H, D)
        self._rope(
            x.data_ptr(),
            x.stride(2),
            x.stride(1),
            heads,
            d,
            cos.data_ptr(),
            sin.data_ptr(),
            t_len,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out.transpose(1, 2)  # (1, H, T, D)

    def attention_forward(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        *,
        is_causal: bool = False,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        """:meth:`read_attention` as a transformers attention function (query (B, H, T, D), key / value
        (B, KVH, K, D), a bool mask or None, ``is_causal``: bottom-right causal, the queries being the last T keys;
        returns (B, T, H, D)); what it does not take (dropout, an additive mask, a gate dimension, float32, a
        gradient) goes to :func:`beacon_llm._compat.masked_gqa_sdpa`, with the causal part as a mask."""
        if dropout or not self.read_attention_fits(query, key, value, attention_mask, causal=is_causal):
            if is_causal:
                t_len, n_keys = query.shape[2], key.shape[2]
                causal = torch.ones(t_len, n_keys, dtype=torch.bool, device=query.device).tril(n_keys - t_len)
                if attention_mask is None or attention_mask.dtype == torch.bool:
                    attention_mask = causal if attention_mask is None else attention_mask & causal
                else:  # additive: the causal part as -inf
                    attention_mask = attention_mask.masked_fill(~causal, float("-inf"))
            return _compat.masked_gqa_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        return self.read_attention(query, key, value, attention_mask, scale, causal=is_causal), None


def env_choice() -> str:
    """``$BEACON_LLM_NATIVE_KERNELS`` read: "off" (0/false/no/off), "on" (1/true/yes/on: also on a CPU with AMX)
    or "auto" (unset, empty or ``auto``); any other value is refused with the ones it takes."""
    value = os.environ.get(SETTING_ENV, "").strip().lower()
    if value in _ENV_OFF:
        return "off"
    if value in _ENV_ON:
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(
        f"{SETTING_ENV}={os.environ[SETTING_ENV]!r} is not a setting: use 0 (stock kernels only), 1 (the native "
        f"kernels wherever they build, AMX CPUs included) or leave it unset (the native kernels without AMX)"
    )


def preferred() -> NativeKernels | None:
    """The native kernels where they are the ones measured faster than the stock kernels: a CPU with AVX512-BF16
    and no AMX tiles, where they build; else None. With AMX, oneDNN's packed products and torch's attention kernel
    stay the choice (the native kernels have not been measured there) unless ``BEACON_LLM_NATIVE_KERNELS=1``."""
    choice = env_choice()  # a setting it does not take is refused on any CPU
    if _compat.avx512_bf16_cpu() and (choice == "on" or not _compat.amx_cpu()):
        return kernels()
    return None


def unavailable() -> str | None:
    """Why the native kernels cannot be used here (None when they can). Builds them on first call (once per
    machine)."""
    return _platform_reason() or _load_or_reason(str(_kernel_dir()))[1]


def kernels() -> NativeKernels | None:
    """The native kernels, built and loaded on first use; None where :func:`unavailable` gives a reason."""
    return None if _platform_reason() else _load_or_reason(str(_kernel_dir()))[0]


def _kernel_dir() -> Path:
    from .embedded import home

    return home() / "kernels"


@functools.cache
def _load_or_reason(kernel_dir: str) -> tuple[NativeKernels | None, str | None]:
    with _load_lock:
        runtime = _openmp_runtime()
        if runtime is None:
            reason = "torch's OpenMP runtime (libgomp) is not loaded in this process"
            logger.info("native bf16 kernels not used: %s", reason)
            return None, reason
        try:
            path = _build(Path(kernel_dir), runtime)
            kernel = NativeKernels(path)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            reason = f"building or loading {', '.join(p.name for p in SOURCES)} failed: {exc}"
            logger.info("native bf16 kernels not used: %s", reason)
            return None, reason
        runtimes = _openmp_runtimes_loaded()
        if len(runtimes) != 1:
            reason = f"more than one OpenMP runtime is loaded ({sorted(runtimes)})"
            logger.warning("native bf16 kernels not used: %s", reason)
            return None, reason
        reason = _self_check(kernel)
        if reason is not None:
            logger.warning("native bf16 kernels not used: %s", reason)
            return None, reason
        return kernel, None


def _platform_reason() -> str | None:
    if env_choice() == "off":
        return f"{SETTING_ENV}={os.environ[SETTING_ENV]}"
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is built for Linux on x86-64, this is {sys.platform} on {platform.machine()}"
    if not _compat.avx512_bf16_cpu():
        return "this CPU has no AVX512-BF16"
    return None


def _openmp_runtimes_loaded() -> set[str]:
    """The distinct libgomp files mapped into this process (Linux ``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return set()
    return {os.path.realpath(p) for p in paths if p.startswith("/")}


def _openmp_runtime() -> Path | None:
    """The libgomp torch loaded (the kernel links against this very file, so the loader reuses it)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    runtimes = _openmp_runtimes_loaded()
    return Path(next(iter(runtimes))) if len(runtimes) == 1 else None


def _compiler() -> list[str]:
    """The compiler command: ``$CC`` split as a shell splits it (a wrapper or flags with the program, e.g.
    ``ccache gcc`` or ``gcc -march=znver4``), else ``cc`` or ``gcc``; a ``$CC`` whose program is not on the path is
    passed over with a warning naming it."""
    given = os.environ.get("CC", "").strip()
    if given:
        try:
            words = shlex.split(given)
        except ValueError as exc:
            raise RuntimeError(f"CC={given!r} is not a command ({exc}); set CC to a C compiler such as gcc") from exc
        program = shutil.which(words[0])
        if program:
            return [program, *words[1:]]
        logger.warning("CC=%r: %s is not on the path; trying cc and gcc", given, words[0])
    for candidate in ("cc", "gcc"):
        if shutil.which(candidate):
            return [shutil.which(candidate)]
    raise RuntimeError("no C compiler found ($CC, cc or gcc); install one (e.g. apt install gcc) to build it")


def _build(kernel_dir: Path, runtime: Path) -> Path:
    """Compile the kernels into ``kernel_dir/<digest>/`` unless already there (written under a unique temporary name
    and renamed, so concurrent builds never load a partial file). The digest covers the sources, the flags, the
    compiler and the OpenMP runtime linked."""
    compiler = _compiler()  # the program and $CC's own arguments
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = " ".join((*compiler[1:], *COMPILE_FLAGS))  # $CC's arguments change the build too
    digest = hashlib.sha256(
        b"\0".join([*(p.read_bytes() for p in SOURCES + HEADERS), flags.encode(), version.encode(),
                    str(runtime).encode()])
    ).hexdigest()[:16]  # fmt: skip
    target = kernel_dir / digest / "libbeacon_kernels_bf16.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the native bf16 kernels with %s (once per machine)", " ".join(compiler))
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        objects = [str(Path(work) / f"{p.stem}.o") for p in SOURCES]
        workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # the sources compiled side by side
            commands = [[*compiler, *COMPILE_FLAGS, "-c", str(src), "-o", obj] for src, obj in zip(SOURCES, objects)]
            list(pool.map(_run, commands))  # the first failure is raised here
        lib = Path(work) / target.name
        # link the runtime torch loaded by its path (not -lgomp): the loader then reuses it by its soname
        _run([*compiler, "-shared", "-fPIC", *objects, str(runtime), "-lm", "-o", str(lib)])
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".lib-", suffix=".so")
        os.close(fd)
        shutil.copyfile(lib, tmp)
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared home from loading it
        os.replace(tmp, target)
    return target


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(command[:1])} exited with {done.returncode}: {lines[-1] if lines else ''}")


def _self_check(kernel: NativeKernels) -> str | None:
    """Run both kernels on small random inputs (sizes that are not multiples of their blocks, two row blocks, a bias;
    several key parts) and compare with float64: every product within one bf16 rounding step of the exact value,
    every attention output within one bf16 rounding plus float32's error on the weighted sum."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(13, 75, generator=g).bfloat16(), torch.randn(6, 75, generator=g).bfloat16()
    b2 = torch.randn(6, generator=g).bfloat16()
    x = torch.randn(1, 75, generator=g).bfloat16()
    got = kernel.linear([(w1, None), (w2, b2)])(x).double()  # (1, 19)
    exact = x.double() @ torch.cat([w1, w2]).double().T + torch.cat([torch.zeros(13), b2.float()]).double()
    ulp = exact.abs().clamp_min(1e-30) * 2.0**-7  # one bf16 step at the exact value's magnitude
    if not bool(((got - exact).abs() <= ulp).all()):
        return "the product's self-check against float64 failed"
    q = torch.randn(1, 2, 3, 64, generator=g).bfloat16()
    keys, values = (torch.randn(1, 2, 1100, 64, generator=g).bfloat16() for _ in range(2))
    if not attention_close(kernel.attention(q, keys, values, 0.125), q, keys, values, 0.125):
        return "the attention's self-check against float64 failed"
    q = torch.randn(1, 6, 37, 64, generator=g).bfloat16()
    keys, values = (torch.randn(1, 2, 150, 64, generator=g).bfloat16() for _ in range(2))
    mask = torch.rand(37, 150, generator=g) < 0.7
    mask[:, 0] = True
    causal = torch.ones(37, 150, dtype=torch.bool).tril(150 - 37)
    for given, seen, is_causal in ((mask, mask, False), (mask, mask & causal, True), (None, causal, True)):
        got = kernel.read_attention(
            q, keys, values, None if given is None else given[None, None], 0.125, causal=is_causal
        ).transpose(1, 2)  # (1, H, T, D)
        if not attention_close(got, q, keys, values, 0.125, mask=seen):
            return "the read attention's self-check against float64 failed"
    return _self_check_rows(kernel, g)


def _self_check_rows(kernel: NativeKernels, g: torch.Generator) -> str | None:
    """The row kernels on 3 rows of 40 features (not a multiple of their 16 lanes) against torch's bf16 operators:
    the residual sum and RoPE equal, the norm and SiLU within one bf16 step."""
    from ._compat import rotate_half

    x, residual, gate, up = (torch.randn(3, 40, generator=g).bfloat16() for _ in range(4))
    weight = (1 + 0.3 * torch.randn(40, generator=g)).bfloat16()
    total, normed = kernel.rms_norm(x, weight, 1e-5, residual)
    h = x + residual
    want = weight * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    if not torch.equal(total, h) or not within_one_bf16_step(normed, want):
        return "the RMSNorm's self-check against torch failed"
    if not within_one_bf16_step(kernel.silu_mul(gate, up), torch.nn.functional.silu(gate) * up):
        return "the SiLU's self-check against torch failed"
    q = torch.randn(1, 2, 3, 64, generator=g).bfloat16()
    cos, sin = (torch.randn(1, 3, 64, generator=g).bfloat16() for _ in range(2))
    if not torch.equal(kernel.rope(q, cos, sin), q * cos[:, None] + rotate_half(q) * sin[:, None]):
        return "the RoPE's self-check against torch failed"
    return None


def within_one_bf16_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Each element equal to ``want`` or one bf16 step from it at its magnitude."""
    g, w = got.double(), want.double()
    step = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - 7)
    return bool((((g - w).abs() <= step) | (g == w)).all())


def attention_close(
    got: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    *,
    mask: torch.Tensor | None = None,
) -> bool:
    """Whether ``got`` is within one bf16 rounding of the float64 attention, plus 1e-4 of the largest value (float32
    sums and exponentials); with a (T, M) bool ``mask`` (True = visible), the exponentials are also rounded to bf16
    for the sum with the values, so the bound is 2^-8 of the largest value. q / got: (1, KVH * G, T, D) with a mask,
    (1, KVH, G, D) without; keys / values: (1, KVH, M, D)."""
    k, v = keys.double(), values.double()
    if mask is not None:  # grouped heads: query head a reads key/value head a // G
        group = q.shape[1] // keys.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (1, H, M, D)
    logits = q.double() @ k.transpose(-1, -2) * scale  # (1, H, T, M) or (1, KVH, G, M)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    exact = torch.softmax(logits, -1) @ v
    slack = 1e-4 if mask is None else 2.0**-8
    bound = exact.abs() * 2.0**-8 + slack * values.double().abs().max()
    return bool(((got.double() - exact).abs() <= bound).all())
