"""Every transformers-version detail lives here (tested against transformers 5.x)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, eager_attention_forward, rotate_half
from transformers.models.mistral.modeling_mistral import MistralMLP, MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

# model families whose decoder layer is: x + attn(norm(x)); x + mlp(norm(x)), with q/k/v/o projections + RoPE
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE types whose cos/sin depend only on the position (keys can be rotated once and kept)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

__all__ = [
    "AutoConfig",
    "AutoModelForCausalLM",
    "PretrainedConfig",
    "attention_function",
    "masked_gqa_sdpa",
    "check_llama_shaped",
    "max_positions",
    "rotate_half",
    "decoder_after_kv",
    "native_bf16_cpu",
    "amx_cpu",
    "avx512_bf16_cpu",
    "mlp_parts",
    "rms_norm_kernel",
    "stock_rms_norm_eps",
    "is_stock_mlp",
    "is_stock_silu",
    "pack_linear_weight",
    "packed_linear",
]


def attention_function(implementation: str) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The transformers attention kernel registered under ``implementation`` (eager, sdpa, flash_attention_2)."""
    if implementation == "eager":
        return eager_attention_forward
    try:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    except KeyError as exc:
        raise ValueError(
            f"attn_implementation={implementation!r} is not available; use 'sdpa', 'eager' or 'flash_attention_2'"
        ) from exc


def masked_gqa_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA with a mask and grouped key/value heads, without copying the keys per query head.

    transformers' sdpa path repeats the keys and values of every KV head for each of its query heads when a mask
    is given (``repeat_kv``), because masked GQA falls back to the math kernel on CUDA. On CPU ``enable_gqa`` gives
    the same result (tested to 1e-6), faster and without the copies (docs/design.md §5: every step reads the memory).
    query: (B, H, T, D); key/value: (B, KVH, K, D); returns (B, T, H, D) like transformers' kernels.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    return dict(params)


def _scaled_positions(max_position_embeddings: int, params: dict[str, Any], kind: str) -> int:
    """The positions a RoPE-scaled model covers: the scaling factor times the pre-scaling length, which is
    ``original_max_position_embeddings`` where the RoPE parameters give it (llama3, yarn: ``max_position_embeddings``
    is then already the scaled length, as in Llama 3.1 / 3.2 configs, or the pre-scaling one), else
    ``max_position_embeddings`` itself (linear scaling, the official code's rule); never fewer than
    ``max_position_embeddings``."""
    base = int(max_position_embeddings)
    if kind == "default" or not params.get("factor"):
        return base
    original = params.get("original_max_position_embeddings") or base
    return max(base, int(int(original) * float(params["factor"])))


def max_positions(config: PretrainedConfig) -> int:
    """Positions the base model was trained on, RoPE scaling included (docs/design.md §2.3, adapt-X)."""
    params = rope_parameters(config)
    return _scaled_positions(config.max_position_embeddings, params, params.get("rope_type", "default"))


def max_positions_from_dict(config: dict[str, Any]) -> int:
    """:func:`max_positions` from a raw ``config.json`` dict (``rope_parameters`` or the 4.x ``rope_scaling``)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    return _scaled_positions(config["max_position_embeddings"], params, kind)


def check_llama_shaped(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a Llama-family causal LM that beacon-llm can drive."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    if model_type not in SUPPORTED_MODEL_TYPES or inner is None or getattr(model, "lm_head", None) is None:
        raise ValueError(
            f"model_type={model_type!r} ({type(model).__name__}) is not a supported Llama-shaped causal LM; "
            f"supported model types: {SUPPORTED_MODEL_TYPES} (e.g. LlamaForCausalLM, MistralForCausalLM, "
            "Qwen2ForCausalLM, SmolLM2)"
        )
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            raise ValueError(f"{type(inner).__name__} has no '{name}': not a Llama-shaped decoder")
    for i, layer in enumerate(inner.layers):
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(isinstance(getattr(attn, p, None), nn.Linear) for p in needed):
            raise ValueError(f"layer {i} has no q/k/v/o_proj linear attention: not a Llama-shaped decoder")
        for extra in ("q_norm", "k_norm"):
            if getattr(attn, extra, None) is not None:
                raise ValueError(f"layer {i} attention has {extra}: not a Llama-shaped decoder (Qwen3/OLMo2 style)")
        if getattr(attn, "sliding_window", None):
            raise ValueError(
                f"layer {i} uses sliding-window attention ({attn.sliding_window}); disable it "
                "(e.g. use_sliding_window=False) to use beacons"
            )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {STATIC_ROPE_TYPES}")


def load_base_config(path: str, **kwargs: Any) -> PretrainedConfig:
    """Base config of a checkpoint folder, without remote-code hooks (``auto_map`` is dropped)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, **kwargs)
    if hasattr(config, "auto_map"):
        del config.auto_map
    return config


# transformers' from_pretrained is not thread-safe: two loads of tied-embedding models at once left both (and every
# later load in the process) with the output projection on the meta device, i.e. without weights
_load_lock = threading.Lock()


@contextlib.contextmanager
def one_load_at_a_time() -> Iterator[None]:
    """Hold the process's model-loading lock: every ``from_pretrained`` of a model in this package runs inside it."""
    with _load_lock:
        yield


def load_base_model(path: str, config: PretrainedConfig, **kwargs: Any) -> nn.Module:
    """The stock model of a checkpoint folder, one load at a time. Its beacon tensors are loaded separately
    (strictly), so the loader's report of them as "unexpected keys" is not shown. Raises RuntimeError naming the
    parameters a load left without weights (on the meta device)."""
    with one_load_at_a_time(), _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=False, **kwargs)
    # (a device_map may offload weights on purpose: they stay on meta until accelerate's hooks bring them in)
    empty = [] if kwargs.get("device_map") is not None else [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise RuntimeError(
            f"loading {path} left {len(empty)} parameters without weights ({', '.join(empty[:3])}); transformers "
            "loads are not thread-safe: load models one at a time in this process (a load outside beacon-llm may "
            "have run at the same time)"
        )
    return model


_quiet_lock = threading.Lock()
_quiet_loads: list[int] = []  # the verbosity to restore, while loads are running (one entry per running load)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' log level at "error" while any load runs (its verbosity is one setting per process): the
    first of overlapping loads saves the level, the last restores it."""
    from transformers.utils import logging as hf_logging

    with _quiet_lock:
        _quiet_loads.append(_quiet_loads[0] if _quiet_loads else hf_logging.get_verbosity())
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        with _quiet_lock:
            previous = _quiet_loads.pop()
            if not _quiet_loads:
                hf_logging.set_verbosity(previous)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars (e.g. "Loading weights") off for the block (a command run with ``--quiet``);
    the setting, one per process, is restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str) -> object | None:
    """The checkpoint's tokenizer, or None when the folder has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def logits_processors(
    do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float | None
) -> list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """transformers' own logits processors/warpers, in the order ``generate`` applies them."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            out.append(TemperatureLogitsWarper(temperature))
        if top_k:
            out.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            out.append(TopPLogitsWarper(top_p))
    return out


def plain_forward(
    model: nn.Module, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """The stock model's forward with a KV cache (``cache=`` in transformers 5; ``past_key_values`` is deprecated).

    Returns ``(logits, cache)``.
    """
    out = model(input_ids=input_ids, cache=cache, use_cache=True, **kwargs)
    return out.logits, out.cache


def decoder_after_kv(
    model: nn.Module,
    input_ids: torch.Tensor,
    keys: list[torch.Tensor | None],
    values: list[torch.Tensor | None],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The stock decoder (``model.model``) on ``input_ids`` (1, n) after cached keys/values (per layer
    (1, KVH, M, D), keys rotated at positions 0..M-1, or all None), through transformers' own ``DynamicCache``:
    the same operations as the plain model continuing its KV cache.

    Returns the final-normed hidden states (1, n, Dm) and the per-layer keys and values (1, KVH, M + n, D).
    """
    from transformers import DynamicCache

    data = None if keys[0] is None else list(zip(keys, values))
    kv = DynamicCache(ddp_cache_data=data, config=model.config)
    out = model.model(input_ids=input_ids, cache=kv, use_cache=True)
    return out.last_hidden_state, [layer.keys for layer in kv.layers], [layer.values for layer in kv.layers]


def mlp_parts(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, Callable[[torch.Tensor], torch.Tensor]]:
    """(gate, up, down, activation) of a Llama / Mistral / Qwen2 MLP, whose forward is
    ``down(act(gate(x)) * up(x))`` (the decode step computes exactly that with its own linear kernels)."""
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn


# the stock RMSNorm forwards: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype), x32 = x in float32
_STOCK_RMS_NORM_FORWARDS = (LlamaRMSNorm.forward, MistralRMSNorm.forward, Qwen2RMSNorm.forward)


def rms_norm_kernel(norm: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm`` as one call for the decode step: on the CPU a stock RMSNorm runs as ``F.rms_norm`` on float32, whose
    CPU kernel makes the same operations (pow, mean, add, rsqrt, mul) without the Python between them (the same bits;
    tested against the modules); any other norm or device, a hooked module or one whose forward was replaced on the
    instance runs as itself (hooks and the device are checked again at each call)."""
    stock = type(norm).forward in _STOCK_RMS_NORM_FORWARDS and "forward" not in vars(norm)
    if not stock or device.type != "cpu" or _hooked(norm):
        return norm
    weight, eps = norm.weight, float(norm.variance_epsilon)

    def rms_norm(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or _hooked(norm):  # moved or hooked since: the module itself
            return norm(x)
        return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    return rms_norm


def stock_rms_norm_eps(norm: nn.Module) -> float | None:
    """The epsilon of a stock Llama / Mistral / Qwen-2 RMSNorm that runs as its class defines it (no hooks, forward
    not replaced on the instance); None for any other norm."""
    stock = type(norm).forward in _STOCK_RMS_NORM_FORWARDS and "forward" not in vars(norm) and not _hooked(norm)
    return float(norm.variance_epsilon) if stock else None


def is_stock_mlp(mlp: nn.Module) -> bool:
    """Whether an MLP is a stock Llama / Mistral / Qwen-2 one running as its class defines it (no hooks, forward not
    replaced on the instance): ``down(act(gate(x)) * up(x))``."""
    stock = (LlamaMLP.forward, MistralMLP.forward, Qwen2MLP.forward)
    return type(mlp).forward in stock and "forward" not in vars(mlp) and not _hooked(mlp)


def is_stock_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether an MLP activation is transformers' or torch's SiLU, running as its class defines it."""
    if isinstance(act, nn.SiLU):
        return not _hooked(act) and "forward" not in vars(act)
    return (
        type(act).__name__ == "SiLUActivation"
        and type(act).__module__ == "transformers.activations"
        and not _hooked(act)
        and "forward" not in vars(act)
    )


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty where unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(f.read().split())
    except OSError:
        return set()


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 matmuls are then 2-3x faster than fp32;
    without it (AVX2 only) they are emulated and several times slower."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is not None for p in probes):
        return any(bool(p()) for p in probes)
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})  # older torch: the flags Linux reports


def avx512_bf16_cpu() -> bool:
    """Whether this CPU has the AVX512-BF16 instructions (vdpbf16ps) that :mod:`beacon_llm.native_kernels` uses."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None:
        return bool(probe())
    return "avx512_bf16" in _cpu_flags()


def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later): torch's CPU attention kernel then runs its
    small bf16 matrix products on them; with AVX512-BF16 alone (e.g. AMD Zen 4) each such product is far slower."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        return bool(probe())
    return "amx_tile" in _cpu_flags()


def packed_linear_available() -> bool:
    """oneDNN's pre-packed linear (what ``torch.compile`` uses on CPU): a bf16 matrix-vector product from weights
    reordered once, at the memory-bandwidth limit, where ``F.linear`` re-reads them in an unfavourable layout."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (
            bool(torch.backends.mkldnn.is_available())
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) reordered for :func:`packed_linear` with one input row (an opaque oneDNN tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``weight`` from :func:`pack_linear_weight`. x: (..., in) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
