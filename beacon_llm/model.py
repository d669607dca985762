"""BeaconModel: a stock transformers causal LM that reads any length window by window (paper v2 §2, v3 §3).

The base model object is untouched except for the beacon modules registered on it (see ``layers``); calling
``beacon_model.model(...)`` is always the plain model. All per-input state lives in a :class:`BeaconCache`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from . import _compat, native_kernels
from .attention import StepTensors, layer_step, rope
from .cache import BeaconCache, StepTrace
from .config import BeaconConfig
from .decode import DecodeLinears, decode_products, raw_token_step
from .digests import WeightsDigest
from .generation import GenerateOutput, generate
from .layers import attach_beacon_modules, attach_memory_gates, detach_beacon_modules, mark_only_beacon_trainable
from .masks import window_visibility
from .positions import window_positions
from .read_layers import read_layers
from .schedule import (
    FitPlan,
    StepPlan,
    adapt_ratio,
    config_capacity,
    fit_plan,
    pick_ratio,
    plan_step,
    ratio_capacity,
    smallest_fitting_power_of_two,
)

_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("beacon_disabled", default=frozenset())
_SCORE_CHUNK = 256  # rows per lm_head call: never materialise (tokens x vocab) logits for a whole input


def _planned_length(value: object) -> int | None:
    """``planned_length`` as an int (None: not given); anything else, a negative count or a bool is refused here,
    before it reaches the ratio choice or a ``fit-N`` plan (a float or NaN would be planned with, infinity would
    never finish the capacity message's search)."""
    if value is None:
        return None
    try:
        length = operator.index(value)  # ints, numpy ints, integer 0-d tensors; not floats
    except TypeError:
        length = None
    if isinstance(value, bool) or length is None or length < 0:
        raise ValueError(
            f"planned_length={value!r} must be a non-negative int: the tokens the context is expected to hold "
            "(document + question + answer reserve), or None"
        )
    return int(length)


@dataclass
class BeaconOutput:
    """Result of reading one input.

    Attributes:
        last_logits: (V,) next-token logits after the last token.
        token_logprobs: (L-1,) float32 log p(token i+1 | context up to i) for every raw token of the input
            (``None`` when not requested). With ``labels``, targets are ``labels[i+1]`` and ignored ones are NaN.
        argmax_next: (L,) argmax of the logits at every raw token (``None`` when scores were not requested).
        loss: mean negative log-likelihood over the scored targets (keeps the graph when training).
        logits: (L, V) all logits, only with ``return_logits=True``.
        hidden: (L, Dm) final-normed hidden states of the raw tokens, only with ``return_hidden=True`` (they keep
            the graph when training: distillation scores them against a teacher).
        cache: the cache holding the condensed context.
    """

    last_logits: torch.Tensor
    cache: BeaconCache
    token_logprobs: torch.Tensor | None = None
    argmax_next: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    n_targets: int = 0
    hidden: torch.Tensor | None = None


class BeaconModel:
    """Activation Beacon around a Llama-family ``*ForCausalLM`` (Llama 2/3, Mistral, Qwen2, SmolLM2).

    Build it with :meth:`attach` (fresh beacons), :func:`beacon_llm.from_pretrained` (official checkpoint or base +
    adapter). ``model`` is the transformers model carrying the beacon modules; ``config`` the beacon config.
    """

    def __init__(self, model: nn.Module, config: BeaconConfig, tokenizer: object | None = None) -> None:
        _compat.check_llama_shaped(model)
        if not hasattr(model.model, "beacon_embed_tokens"):
            raise ValueError("the model carries no beacon modules; use BeaconModel.attach(model, config)")
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.gradient_checkpointing = False  # recompute each layer in backward (training long samples)
        self._decode_lock = threading.Lock()
        self.max_positions = _compat.max_positions(model.config)
        if self.max_positions <= config.window:
            raise ValueError(
                f"beacon_window={config.window} must be smaller than the model's "
                f"max_position_embeddings={self.max_positions}"
            )

    def __getstate__(self) -> dict:
        """Pickling / deepcopy: the lock and the decode step's kernels (made again on use) are left out."""
        state = dict(self.__dict__)
        for key in ("_decode_lock", "_decode", "_decode_inference"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._decode_lock = threading.Lock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def attach(
        cls, model: nn.Module, config: BeaconConfig | None = None, tokenizer: object | None = None
    ) -> BeaconModel:
        """Add freshly initialised beacons to a base model (copies of its projections, eos/bos embedding)."""
        _compat.check_llama_shaped(model)
        config = config or BeaconConfig()
        attach_beacon_modules(model, config)
        return cls(model, config, tokenizer)

    def detach(self) -> nn.Module:
        """Remove the beacon modules and return the plain base model (bit-identical to before attaching)."""
        detach_beacon_modules(self.model)
        self.__dict__.pop("_beacon_params", None)
        self.__dict__.pop("_decode", None)
        self.__dict__.pop("_decode_inference", None)
        return self.model

    @contextlib.contextmanager
    def disabled(self) -> Iterator[BeaconModel]:
        """Within the block, :meth:`forward` runs the plain base model (full attention). Only in the calling
        thread or asyncio task: other threads using this model at the same time keep their beacons."""
        token = _DISABLED.set(_DISABLED.get() | {id(self)})
        try:
            yield self
        finally:
            _DISABLED.reset(token)

    @property
    def _enabled(self) -> bool:
        """False inside :meth:`disabled` (in this thread / task only)."""
        return id(self) not in _DISABLED.get()

    def mark_only_beacon_trainable(self) -> int:
        return mark_only_beacon_trainable(self.model)

    def add_memory_gates(self, value: float = 1.0) -> None:
        """Give a model without memory gates one per layer and query head, all ``value`` (1: reads as before; see
        ``BeaconConfig.memory_gate``), e.g. to train gates on top of an adapter that has none."""
        config = dataclasses.replace(self.config, memory_gate=value)  # validated before anything changes
        attach_memory_gates(self.model, value)
        self.config = config

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.model.embed_tokens.weight.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def capacity(self) -> int:
        """Most tokens a context can hold within the base model's positions: ``(P - W)·α + W`` for the largest
        ratio this config may use (the smallest, for random mixes)."""
        return config_capacity(self.config, self.max_positions)

    def new_cache(
        self, *, generator: np.random.Generator | None = None, seed: int = 42, trace: bool = False
    ) -> BeaconCache:
        """A fresh, empty cache for this model."""
        return BeaconCache(
            self.config, self.num_layers, generator=generator, seed=seed, trace=trace, max_entries=self.max_positions
        )

    def weights_digest(self) -> str:
        """sha256 of the beacon config and every beacon weight (bytes as stored), remembered until a beacon weight
        changes (:class:`beacon_llm.digests.WeightsDigest`): a check on every call (every generated token) only reads
        the parameters' version counters."""
        found = self.__dict__.get("_beacon_params")
        if found is None or found[0] is not self.config:  # the beacon parameters and config text, once per config
            named = [(n, p) for n, p in self.model.named_parameters() if "beacon_" in n]
            found = (self.config, WeightsDigest(named, json.dumps(self.config.to_dict(), sort_keys=True)))
            self.__dict__["_beacon_params"] = found
        return found[1]()

    def base_weights_digest(self) -> str:
        """sha256 of every base-model weight (bytes as stored), remembered like :meth:`weights_digest`: a model
        retrained and saved under the same name, or edited in place, gets another digest."""
        found = self.__dict__.get("_base_params")
        if found is None:
            found = WeightsDigest((n, p) for n, p in self.model.named_parameters() if "beacon_" not in n)
            self.__dict__["_base_params"] = found
        return found()

    def reading_kernels(self) -> str:
        """Which attention kernels a read of this model runs (the implementation, ``+native`` where the native
        kernels serve it): they round bf16 differently, so a condensed prefix is kept per choice."""
        impl = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        with torch.no_grad():
            native = self._native_read(self.model.model.embed_tokens.weight)  # a read runs in the weights' dtype
        return impl + ("+native" if native is not None else "")

    def identity(self) -> str:
        """A stable hash of the base model (name, config and weights), of the beacon weights and config and of the
        reading kernels: the key under which condensed prefixes of this model are stored."""
        h = hashlib.sha256()
        h.update(str(getattr(self.model.config, "_name_or_path", "")).encode())
        h.update(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for part in self._fingerprint():
            h.update(f"|{part}".encode())
        return h.hexdigest()[:32]

    def _fingerprint(self) -> tuple:
        """What a cache must have been built by: the base shape, dtype and weights, the beacon weights and config,
        and the reading kernels."""
        c = self.model.config
        attn = self.model.model.layers[0].self_attn
        shape = (c.model_type, self.num_layers, attn.head_dim, attn.k_proj.out_features, str(self.dtype))
        return (*shape, self.weights_digest(), self.base_weights_digest(), self.reading_kernels())

    # ------------------------------------------------------------------ input checks
    def _as_ids(self, input_ids: object, attention_mask: object = None) -> torch.Tensor:
        if isinstance(input_ids, (list, tuple)):
            if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in input_ids):
                raise TypeError("input_ids must be a list of ints or a LongTensor of shape (L,) or (1, L)")
            input_ids = torch.tensor(list(input_ids), dtype=torch.long)
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a LongTensor or a list of ints, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(
                    f"batch size {input_ids.shape[0]} is not supported: Activation Beacon streams one sequence; "
                    "run one call (with its own cache) per sequence"
                )
            input_ids = input_ids[0]
        elif input_ids.dim() != 1:
            raise ValueError(f"input_ids must have shape (L,) or (1, L), got {tuple(input_ids.shape)}")
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            if mask.numel() != input_ids.numel() or not bool((mask == 1).all()):
                raise ValueError("attention_mask must be all ones: padding is not supported (batch size 1 only)")
        if input_ids.numel() > 0:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"token id {bad} is outside the vocabulary [0, {self.vocab_size}); "
                    "check the tokenizer matches the model"
                )
        return input_ids.to(device=self.device, dtype=torch.long)

    def can_hold(self, cache: BeaconCache, planned: int) -> bool:
        """Whether ``cache`` (read with its own ratio or plan) can go on to ``planned`` tokens within the positions:
        the check a read makes before it starts."""
        try:
            self._check_capacity(cache, cache.state.n_seen, planned)
        except ValueError:
            return False
        return True

    def _check_capacity(self, cache: BeaconCache, stream_total: int, planned: int) -> None:
        """Refuse, before anything is read, a context whose planned length does not fit the positions."""
        cfg, st = self.config, cache.state
        if cfg.is_fit:
            plan = st.fit_plan
            assert plan is not None
            total = max(stream_total, planned)
            needed = plan.entries(total)
            if needed > self.max_positions:
                raise ValueError(
                    f"this context would hold {total} tokens in {needed} positions, beyond the model's "
                    f"{self.max_positions}: it was planned (once, at its first read) for {plan.planned_length} tokens "
                    f"with {plan.condensed_windows} condensed windows, and text after the condensed windows stays raw. "
                    "Plan the read for the whole conversation (planned_length=, or a larger max_new_tokens on the "
                    "first call), or start a new cache"
                )
            return
        if len(cfg.ratios) == 1:
            ratio = cfg.ratios[0]
        elif st.fixed_ratio is not None:
            ratio = st.fixed_ratio
        elif cfg.is_adaptive:
            ratio = adapt_ratio(cfg, self.max_positions, planned)
        else:
            ratio = min(cfg.ratios)
        capacity = ratio_capacity(ratio, self.max_positions, cfg.window)
        if planned <= capacity:
            return
        fit = smallest_fitting_power_of_two(planned, self.max_positions, cfg.window)
        raise ValueError(
            f"the context would hold {planned} tokens, beyond the capacity of compression ratio {ratio}: "
            f"(max_position_embeddings {self.max_positions} - window {cfg.window}) x {ratio} + {cfg.window} = "
            f"{capacity} tokens. A ratio of {fit} would fit: configure ratios including {fit} "
            f"(e.g. ratio_mix='fit-256'), or shorten the input"
        )

    def _resolve_fit_plan(self, cache: BeaconCache, stream_total: int, planned_length: int | None) -> FitPlan:
        """``fit-N``: the plan is chosen once, at the first read of a cache, from the planned length."""

        def choose() -> FitPlan:
            total = stream_total + self.config.adapt_extra if planned_length is None else planned_length
            return fit_plan(self.config, max(total, stream_total), self.max_positions)

        return cache.ensure_fit_plan(choose)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: object,
        cache: BeaconCache | None = None,
        *,
        attention_mask: object = None,
        labels: object = None,
        return_token_logprobs: bool = True,
        return_logits: bool = False,
        progress: Callable[[int, BeaconCache], None] | None = None,
        planned_length: int | None = None,
        return_hidden: bool = False,
    ) -> BeaconOutput:
        """Read ``input_ids`` (any length) into ``cache``, window by window.

        Args:
            input_ids: (L,) or (1, L) token ids, appended to whatever ``cache`` already read.
            cache: a cache to continue; a new one is created when None (returned in the output).
            labels: optional (L,) / (1, L) targets for training (``-100`` = ignored); token i is scored on
                ``labels[i+1]`` across window boundaries (docs/design.md §9.1).
            return_token_logprobs: score every raw token (log-prob of its successor) and its argmax.
            return_logits: also return the (L, V) logits (for short inputs only).
            progress: called after every window step with (raw tokens read in this step, cache).
            planned_length: tokens this context is expected to hold in all (document + question + answer
                reserve). ``adapt-N`` and ``fit-N`` choose their ratio or plan from it, once, at the first read of
                a cache (default: the tokens read so far, plus N for ``fit-N``); it is refused at once if it does
                not fit.
            return_hidden: also return the final-normed hidden states of the raw tokens.
        """
        ids = self._as_ids(input_ids, attention_mask)
        planned_length = _planned_length(planned_length)
        if cache is None:
            cache = self.new_cache()
        if not self._enabled:
            if ids.numel() == 0:
                raise ValueError("input_ids is empty: give at least one token")
            if cache.n_seen or cache.state.pending:
                raise ValueError(
                    f"inside disabled() the plain model reads input_ids alone, but the cache given holds "
                    f"{cache.n_seen + len(cache.state.pending)} tokens of context it would ignore; pass no cache "
                    "(or a fresh one), or give the whole text as input_ids"
                )
            return self._plain_forward(ids, cache, labels, return_logits)
        cache.acquire()
        try:
            with cache.transaction():  # an error or interrupt never leaves a half-updated cache
                return self._forward(
                    ids, cache, labels, return_token_logprobs, return_logits, progress, planned_length, return_hidden
                )
        finally:
            cache.release()

    __call__ = forward

    def _targets(self, ids: torch.Tensor, labels: object) -> torch.Tensor:
        if labels is None:
            return ids
        lab = torch.as_tensor(labels, device=ids.device).long().reshape(-1)
        if lab.numel() != ids.numel():
            raise ValueError(f"labels has {lab.numel()} entries but input_ids has {ids.numel()}")
        return lab

    def _forward(
        self,
        ids: torch.Tensor,
        cache: BeaconCache,
        labels: object,
        want_scores: bool,
        want_logits: bool,
        progress: Callable[[int, BeaconCache], None] | None = None,
        planned_length: int | None = None,
        want_hidden: bool = False,
    ) -> BeaconOutput:
        cache.bind(self._fingerprint())
        st = cache.state
        pending = cache.take_pending()
        if pending:  # the last generated token, not fed yet (see generation.generate)
            if labels is not None:
                labels = torch.cat([torch.full((len(pending),), -100), torch.as_tensor(labels).reshape(-1).cpu()])
            ids = torch.cat([torch.tensor(pending, device=ids.device, dtype=torch.long), ids])
        n = int(ids.numel())
        if n == 0:
            raise ValueError("input_ids is empty: give at least one token")
        stream_total = st.n_seen + n
        planned = max(stream_total, planned_length or 0)
        fit = self._resolve_fit_plan(cache, stream_total, planned_length) if self.config.is_fit else None
        self._check_capacity(cache, stream_total, planned)
        targets = self._targets(ids, labels)
        score = want_scores or labels is not None
        grad = torch.is_grad_enabled() and self.model.training
        logprob_parts: list[torch.Tensor] = []
        argmax_parts: list[torch.Tensor] = []
        logit_parts: list[torch.Tensor] = []
        hidden_parts: list[torch.Tensor] = []
        loss_sum: torch.Tensor | None = None
        n_targets = 0
        last_logits = None
        # the decode step's kernels, checked against the weights once per call: the step and the last logits share them
        linears: DecodeLinears | None = None
        pos = 0
        with torch.set_grad_enabled(grad):
            while pos < n:
                if fit is not None and st.n_seen >= fit.raw_from:  # fit-N: past the condensed windows, all raw
                    # after condensed windows the raw part is read a window at a time (progress and cancellation
                    # every window); a read that fits is one call, bit for bit the plain model's with the stock
                    # kernels (within bf16 rounding of it with the native read attention, docs/design.md §8)
                    n_raw = n - pos if fit.condensed_windows == 0 else min(n - pos, self.config.window)
                    if linears is None and not (score or want_logits):
                        linears = self._decode_linears()
                    raw_hidden = self._run_raw(cache, ids[pos : pos + n_raw], linears=linears)  # (n_raw, Dm)
                else:
                    remaining = n - pos if fit is None else min(n - pos, fit.raw_from - st.n_seen)
                    plan = self._plan(cache, remaining, planned)
                    n_raw = plan.n_raw
                    raw_hidden = self._run_step(cache, ids[pos : pos + n_raw], plan)  # (n_raw, Dm)
                    if fit is not None and fit.overlap:
                        raw_hidden = self._read_overlap(cache, fit, ids[pos : pos + n_raw], raw_hidden)
                rows_end = pos + n_raw
                if want_hidden:
                    hidden_parts.append(raw_hidden)
                if score or want_logits:
                    tgt = targets[pos + 1 : rows_end + 1]  # (<= n_raw,)
                    for start in range(0, n_raw, _SCORE_CHUNK):
                        h = raw_hidden[start : start + _SCORE_CHUNK]
                        logits = self.model.lm_head(h).float()  # (c, V)
                        logp = torch.log_softmax(logits, dim=-1)
                        t = tgt[start : start + h.shape[0]]
                        picked = logp[: t.numel()].gather(1, t.clamp(min=0)[:, None]).squeeze(1)  # (c,)
                        valid = t >= 0 if labels is not None else torch.ones_like(t, dtype=torch.bool)
                        picked = torch.where(valid, picked, torch.full_like(picked, float("nan")))
                        contrib = -picked[valid].sum()
                        loss_sum = contrib if loss_sum is None else loss_sum + contrib
                        n_targets += int(valid.sum())
                        logprob_parts.append(picked.detach())
                        argmax_parts.append(logits.argmax(-1).detach())
                        if want_logits:
                            logit_parts.append(logits.detach())
                        last_logits = logits[-1]
                else:
                    linears = linears if linears is not None else self._decode_linears()
                    last_logits = linears.lm_head(raw_hidden[-1:]).float()[0]  # (V,) through the step's output kernel
                pos = rows_end
                if progress is not None:
                    progress(n_raw, cache)
        cache.set_last_logits(last_logits.detach())
        loss = None
        if loss_sum is not None and n_targets > 0:
            loss = loss_sum / n_targets
        return BeaconOutput(
            last_logits=last_logits.detach() if not grad else last_logits,
            cache=cache,
            token_logprobs=torch.cat(logprob_parts).cpu() if logprob_parts else None,
            argmax_next=torch.cat(argmax_parts).cpu() if argmax_parts else None,
            loss=loss,
            logits=torch.cat(logit_parts) if logit_parts else None,
            n_targets=n_targets,
            hidden=torch.cat(hidden_parts) if hidden_parts else None,
        )

    def _plan(self, cache: BeaconCache, remaining: int, stream_total: int) -> StepPlan:
        cfg, st = self.config, cache.state
        raw_in_window = cache.raw_in_window
        opens_window = raw_in_window == 0 if cfg.interleave else remaining >= cfg.window - raw_in_window
        if cfg.interleave and not opens_window:
            ratio = st.window_ratio
        elif opens_window and cfg.is_fit:
            assert st.fit_plan is not None and st.fit_plan.ratio > 0
            ratio = cache.choose_window_ratio(st.fit_plan.ratio, fixed=st.fixed_ratio)
        elif opens_window:
            ratio, fixed = pick_ratio(
                cfg,
                n_steps=st.n_steps,
                n_windows=st.n_windows,
                fixed=st.fixed_ratio,
                stream_total=stream_total,
                max_positions=self.max_positions,
                rng=cache.generator,
            )
            cache.choose_window_ratio(ratio, fixed=fixed)
        else:
            ratio = 0
        return plan_step(cfg, raw_in_window=raw_in_window, remaining=remaining, ratio=ratio, remainder=st.remainder)

    def _rotary(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.model.rotary_emb(like, positions.to(like.device)[None])  # (1, T, D) each

    def _attention_setup(self, visible: torch.Tensor, like: torch.Tensor) -> tuple[object, torch.Tensor | None, bool]:
        impl = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        fn = _compat.attention_function(impl)
        if impl.startswith("flash_attention") and self.config.memory_gate is not None:
            raise ValueError(f"beacon_memory_gate adds one key dimension, which {impl} kernels cannot take; use 'sdpa'")
        if impl.startswith("flash_attention"):
            if not (self.config.era == "v3" and self.config.attn == "full-coverage"):
                raise ValueError(
                    f"{impl} cannot take the custom beacon mask of beacon_attn={self.config.attn!r} "
                    f"(era {self.config.era}); use attn_implementation='sdpa' or 'eager'"
                )
            return fn, None, visible.shape[0] > 1
        native = self._native_read(like)
        if native is not None:
            return native.attention_forward, None if bool(visible.all()) else visible.to(like.device)[None, None], False
        if bool(visible.all()) and visible.shape[0] == 1:
            return fn, None, False
        mask = visible.to(like.device)[None, None]  # (1, 1, T, K)
        if impl == "eager":
            additive = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
            mask = additive.masked_fill(~mask, torch.finfo(like.dtype).min)
        elif impl == "sdpa" and like.device.type == "cpu":
            fn = _compat.masked_gqa_sdpa
        return fn, mask, False

    def _native_read(self, like: torch.Tensor) -> native_kernels.NativeKernels | None:
        """The native kernels whose attention a read step on tensors like ``like`` uses (docs/design.md §8): bf16 on
        a CPU where :func:`beacon_llm.native_kernels.preferred` gives them, with the ``sdpa`` implementation and no
        gradient (the kernel has no backward); None: the implementation's own kernel."""
        impl = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        if impl != "sdpa" or like.device.type != "cpu" or like.dtype != torch.bfloat16 or torch.is_grad_enabled():
            return None
        head_dim = self.model.model.layers[0].self_attn.head_dim
        if head_dim % 32 or head_dim > 256 or self.config.memory_gate is not None:  # shapes the kernel does not take
            return None
        return native_kernels.preferred()

    def _run_step(self, cache: BeaconCache, raw_ids: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Feed one window chunk through every layer; update ``cache``; return final-normed raw hidden states."""
        cfg, st = self.config, cache.state
        inner = self.model.model
        flags = plan.is_beacon
        window_flags = st.window_flags + flags
        n_cached = len(st.window_flags)
        mem_len = cache.memory_length
        positions = window_positions(cfg, window_flags, plan.ratio, mem_len)  # (R + T,)
        visible = window_visibility(cfg, window_flags, plan.ratio, plan.n_input, mem_len)  # (T, M + R + T)

        flag_t = torch.tensor(flags, dtype=torch.bool, device=self.device)  # (T,)
        beacon_rows = flag_t.nonzero().squeeze(1) if plan.n_beacons else None  # (n_beacon,)
        raw_rows = (~flag_t).nonzero().squeeze(1)  # (n_raw,)
        tok = torch.zeros(plan.n_input, dtype=torch.long, device=self.device)
        tok = tok.index_copy(0, raw_rows, raw_ids)  # (T,)
        hidden = inner.embed_tokens(tok[None])  # (1, T, Dm)
        if beacon_rows is not None:
            b = inner.beacon_embed_tokens.weight.expand(beacon_rows.numel(), -1)  # (n_beacon, Dm)
            hidden = hidden.index_copy(1, beacon_rows, b[None].to(hidden.dtype))
        cos_q, sin_q = self._rotary(hidden, positions[n_cached:])
        cos_w = sin_w = None
        if n_cached:
            cos_w, sin_w = self._rotary(hidden, positions[:n_cached])
        fn, mask, is_causal = self._attention_setup(visible, hidden)
        step = StepTensors(beacon_rows, cos_q, sin_q, cos_w, sin_w, mask, fn, is_causal)
        if self.config.memory_gate is not None:
            if cache.state.n_raw_memory:
                raise ValueError(
                    f"beacon_memory_gate: a window would be condensed after {cache.state.n_raw_memory} raw memory "
                    "entries, but the gates need the memory as sink, beacons, raw entries; read this cache with a "
                    "fit-N plan or without ratio-0 windows"
                )
            step.gate_span = (cache.state.n_sink, mem_len)
        hidden, new_k, new_v = self._layers(cache, hidden, step, with_window=True)
        raw_hidden = inner.norm(hidden)[0].index_select(0, raw_rows)  # (n_raw, Dm)

        if cache.trace is not None:
            cache.record(
                StepTrace(
                    beacon_size=plan.trace_beacon_size,
                    n_new_tokens=plan.n_raw,
                    n_input=plan.n_input,
                    mem_before=mem_len + n_cached,
                    is_beacon=flags,
                    positions=tuple(int(p) for p in positions[n_cached:]),
                )
            )
        self._commit(cache, plan, window_flags, new_k, new_v, hidden)
        return raw_hidden

    def _layers(
        self, cache: BeaconCache, hidden: torch.Tensor, step: StepTensors, *, with_window: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Every decoder layer on ``hidden`` (1, T, Dm) after the memory (and the open window if ``with_window``);
        returns the last hidden states and each layer's new keys (before RoPE) and values (1, KVH, T, D)."""
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        reads = read_layers(self.model, hidden)
        for i, layer in enumerate(self.model.model.layers):
            win_k, win_v = (cache.win_k[i], cache.win_v[i]) if with_window else (None, None)
            read = None if reads is None else reads[i]
            args = (layer, hidden, step, cache.mem_k[i], cache.mem_v[i], win_k, win_v, read)
            if checkpoint:
                hidden, k, v = torch.utils.checkpoint.checkpoint(layer_step, *args, use_reentrant=False)
            else:
                hidden, k, v = layer_step(*args)
            new_k.append(k)
            new_v.append(v)
        return hidden, new_k, new_v

    def _run_raw_layers(
        self, cache: BeaconCache, raw_ids: torch.Tensor, native: native_kernels.NativeKernels | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The stock decoder continuing its KV cache (the same layers, positions and causal visibility), run by
        :func:`beacon_llm.attention.layer_step` so that the memory gates (each layer's gates on the memory's beacons)
        and the native read attention (``native``, from :meth:`_native_read`) apply. The new entries' keys (rotated)
        and values are returned, (1, KVH, n, D) per layer, with the final-normed hidden states (n, Dm)."""
        inner, st = self.model.model, cache.state
        mem_len, n = cache.memory_length, int(raw_ids.numel())
        hidden = inner.embed_tokens(raw_ids[None])  # (1, n, Dm)
        cos, sin = self._rotary(hidden, torch.arange(mem_len, mem_len + n, device=self.device))  # (1, n, D)
        if native is not None:  # bottom-right causal in the kernel: no (n, M + n) mask, whatever n (a read that fits)
            fn, mask, is_causal = native.attention_forward, None, True
        else:
            causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()  # (n, n)
            visible = torch.cat([torch.ones(n, mem_len, dtype=torch.bool, device=self.device), causal], 1)  # (n, M+n)
            fn, mask, is_causal = self._attention_setup(visible, hidden)
        gates = (st.n_sink, mem_len - st.n_raw_memory) if self.config.memory_gate is not None else None
        step = StepTensors(None, cos, sin, None, None, mask, fn, is_causal, gates)
        hidden, keys, values = self._layers(cache, hidden, step, with_window=False)
        return inner.norm(hidden)[0], [rope(k, cos, sin) for k in keys], values

    def _read_overlap(
        self, cache: BeaconCache, fit: FitPlan, step_ids: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """``fit_overlap``: remember the last condensed tokens and, once the condensed windows are closed, read them
        again raw after the beacons. The state that predicts the first raw token is then the one read again (its
        local context is raw text, as for every later token). step_ids: (n,) the step's tokens; hidden: (n, Dm)."""
        cache.remember_condensed(step_ids.tolist(), fit.overlap)
        if cache.state.n_seen < fit.raw_from:
            return hidden
        again = torch.tensor(cache.take_overlap_ids(), device=step_ids.device, dtype=torch.long)
        again_hidden = self._run_raw(cache, again, new_tokens=False)  # (overlap, Dm)
        return torch.cat([hidden[:-1], again_hidden[-1:]])  # (n, Dm)

    def _run_raw(
        self,
        cache: BeaconCache,
        raw_ids: torch.Tensor,
        *,
        new_tokens: bool = True,
        linears: DecodeLinears | None = None,
    ) -> torch.Tensor:
        """``fit-N`` past the condensed windows: the stock decoder reads ``raw_ids`` after the memory (keys already
        at positions 0..M-1), exactly as the plain model continues its own KV cache (with the native read attention
        where :meth:`_native_read` gives it: the same within one bf16 rounding); every new KV entry is kept raw.
        ``new_tokens`` False: tokens of the stream read again (``fit_overlap``); ``linears``: the decode step's kernels
        when the caller already holds them (:meth:`_decode_linears`). Returns the final-normed hidden states
        (n_raw, Dm)."""
        mem_len = cache.memory_length
        n = int(raw_ids.numel())
        decode = n == 1 and not torch.is_grad_enabled() and self.config.memory_gate is None
        native = None if decode else self._native_read(self.model.model.embed_tokens.weight)
        by_layers = not decode and (self.config.memory_gate is not None or native is not None)
        if by_layers:
            hidden, keys, values = self._run_raw_layers(cache, raw_ids, native)  # (n, Dm); keys (1, KVH, n, D) each
        elif decode:  # the decode step: written in place into the memory buffer
            embed = self.model.model.embed_tokens.weight
            layer0 = self.model.model.layers[0].self_attn
            like = embed.new_empty(1, layer0.k_proj.out_features // layer0.head_dim, 1, layer0.head_dim)
            append = cache.reserve_memory(1, like)
            impl = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
            linears = linears if linears is not None else self._decode_linears()
            hidden = raw_token_step(self.model, linears, raw_ids, append, _compat.attention_function(impl))
        else:  # the stock decoder over a DynamicCache of the memory (one call when the read fits: bit for bit)
            hidden, keys, values = _compat.decoder_after_kv(self.model, raw_ids[None], cache.mem_k, cache.mem_v)
        if cache.trace is not None:
            n = int(raw_ids.numel())
            cache.record(
                StepTrace(
                    beacon_size=-1,
                    n_new_tokens=n,
                    n_input=n,
                    mem_before=mem_len,
                    is_beacon=(False,) * n,
                    positions=tuple(range(mem_len, mem_len + n)),
                )
            )
        if decode:  # after the step: a failed step leaves the memory as it was
            cache.commit_memory(append, new_tokens=new_tokens)
            return hidden[0]  # (1, Dm)
        if by_layers:
            cache.append_raw_memory(keys, values, new_tokens=new_tokens)
            return hidden  # (n_raw, Dm)
        keys, values = [k[:, :, mem_len:] for k in keys], [v[:, :, mem_len:] for v in values]
        cache.append_raw_memory(keys, values, new_tokens=new_tokens)
        return hidden[0]  # (n_raw, Dm)

    def _decode_linears(self) -> DecodeLinears:
        """The decode step's linear kernels for the current weights, made once and made again after a weight
        changes: the fused products :func:`beacon_llm.decode.decode_products` chooses (decided when they are made)
        when no gradient is needed, else ``F.linear`` on the weights themselves."""
        key = "_decode" if torch.is_grad_enabled() else "_decode_inference"
        with self._decode_lock:
            found = self.__dict__.get(key)
            if found is None or not found.matches(self.model):
                products = decode_products(self.model) if key == "_decode_inference" else "linear"
                found = DecodeLinears(self.model, products=products)
                self.__dict__[key] = found
            return found

    def _commit(
        self,
        cache: BeaconCache,
        plan: StepPlan,
        window_flags: tuple[bool, ...],
        new_k: Sequence[torch.Tensor],
        new_v: Sequence[torch.Tensor],
        like: torch.Tensor,
    ) -> None:
        """After a step: grow the open window or, once it is complete, commit it to memory (docs/design.md §3.2). The
        cache does the bookkeeping; the keys moved to memory are rotated here (RoPE is the model's)."""
        cache.grow_window(new_k, new_v, window_flags, n_raw=plan.n_raw, remainder=plan.remainder)
        if not plan.completes_window:
            return
        close = cache.window_close(plan.ratio)
        mem_len = cache.memory_length
        index = torch.tensor(close.move, dtype=torch.long, device=like.device)
        cos, sin = self._rotary(like, torch.arange(mem_len, mem_len + len(close.move)))
        keep_index = torch.tensor(close.keep, dtype=torch.long, device=like.device)
        win_k, win_v = cache.win_k, cache.win_v
        moved_k = [rope(k.index_select(2, index), cos, sin) for k in win_k]  # (B, KVH, n_move, D) at memory positions
        moved_v = [v.index_select(2, index) for v in win_v]
        kept_k = [k.index_select(2, keep_index) if close.keep else None for k in win_k]
        kept_v = [v.index_select(2, keep_index) if close.keep else None for v in win_v]
        cache.commit_window(close, moved_k, moved_v, kept_k, kept_v)

    # ------------------------------------------------------------------ plain path
    def _plain_forward(self, ids: torch.Tensor, cache: BeaconCache, labels: object, want_logits: bool) -> BeaconOutput:
        """Beacons disabled: the stock model on the whole input (full attention)."""
        grad = torch.is_grad_enabled() and self.model.training
        with torch.set_grad_enabled(grad):
            logits = self.model(input_ids=ids[None]).logits[0].float()  # (L, V)
        targets = self._targets(ids, labels)[1:]
        logp = torch.log_softmax(logits[:-1], -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        valid = targets >= 0
        loss = -logp[valid].sum() / max(int(valid.sum()), 1) if valid.any() else None
        return BeaconOutput(
            last_logits=logits[-1],
            cache=cache,
            token_logprobs=torch.where(valid, logp, torch.full_like(logp, math.nan)).detach().cpu(),
            argmax_next=logits.argmax(-1).cpu(),
            loss=loss,
            logits=logits.detach() if want_logits else None,
            n_targets=int(valid.sum()),
        )

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: object = None, **kwargs: object) -> torch.Tensor | GenerateOutput:
        """Greedy / sampled generation from a condensed context; see :func:`beacon_llm.generation.generate`."""
        return generate(self, input_ids, **kwargs)
