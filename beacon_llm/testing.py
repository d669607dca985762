"""Tiny random models and a local tokenizer, built in code (no hub): for tests, notebooks' tiny mode, CI."""

from __future__ import annotations

import string
from typing import Any

import torch
from torch import nn

from .config import BeaconConfig
from .model import BeaconModel

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer (bos ``<|im_start|>`` = 1, eos ``<|im_end|>`` = 2) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_config(model_type: str = "llama", **overrides: Any) -> Any:
    """A 2-layer GQA config (4 heads, 2 KV heads, head_dim 8) of the given family."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
    }
    if model_type == "qwen2":
        kwargs["use_sliding_window"] = False
    if model_type == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_base_model(model_type: str = "llama", seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-init tiny causal LM in float32, eval mode, deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
        model.lm_head.weight.mul_(6.0)  # peaked next-token distributions: greedy choices far from ties
    return model.eval()


# tiny-model shapes whose head size the native attention kernels take (the default tiny model's 8 is not one): llama
# with 2 query heads per key/value head, qwen2 (q/k/v biases) with 3
NATIVE_HEAD_SHAPES: dict[str, dict[str, int]] = {
    "llama": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=192),
    "qwen2": dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, head_dim=64, intermediate_size=256),
}


def tiny_beacon_model(
    config: BeaconConfig | None = None, model_type: str = "llama", seed: int = 0, perturb: float = 0.3, **overrides: Any
) -> BeaconModel:
    """A tiny model with beacons whose weights differ from the base (``perturb``), so beacons matter."""
    base = tiny_base_model(model_type, seed, **overrides)
    config = config or BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16")
    bm = BeaconModel.attach(base, config, tiny_tokenizer() if base.config.vocab_size >= 104 else None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "beacon_" in name:
                p.add_(perturb * torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    return bm


def plain_reference_tokens(
    model: nn.Module,
    chunks: list[list[int]],
    max_new_tokens: int,
    *,
    repetition_penalty: float | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> tuple[list[int], list[torch.Tensor]]:
    """The stock transformers model fed ``chunks`` one call each with its own ``DynamicCache``, then greedy decoding
    one token per call (the repetition penalty over the answer's tokens, like the engine). Returns the tokens (the
    eos included, if reached) and the next-token logits before each of them: the reference for bit-for-bit checks."""
    from transformers import DynamicCache

    from .generation import TokenSampler

    kv = DynamicCache(config=model.config)
    sampler = TokenSampler(repetition_penalty=repetition_penalty)
    tokens: list[int] = []
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in chunks:
            out = model(input_ids=torch.tensor([chunk]), cache=kv, use_cache=True, logits_to_keep=1)
        for step in range(max_new_tokens):
            logits = out.logits[0, -1].float()  # (V,)
            seen.append(logits)
            token = sampler(logits, tokens)
            tokens.append(token)
            if token in eos_token_ids or step + 1 == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[token]]), cache=kv, use_cache=True, logits_to_keep=1)
    return tokens, seen
