"""What ChatBeacon and BeaconLLM share: model fields, lazy shared engine, call options, async bridging."""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator

import beacon_llm

CALL_OPTIONS = {"temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty", "stop", "timeout"}
# what LangChain itself passes with a call: run bookkeeping, and `stream` (its switch between _generate and _stream)
_LANGCHAIN_KEYS = {"run_id", "tags", "metadata", "callbacks", "run_name", "stream"}
# the fields that choose and load a model: meaningless next to an engine object, so refused with one
_LOADING_FIELDS = ("model", "adapter", "beacon_overrides", "device", "dtype", "cache_dir")


def check_options(
    max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any, seed: Any, timeout: Any
) -> None:
    """The engine's one validation of generation options (ValueError), under LangChain's names, and the timeout."""
    try:
        beacon_llm.check_sampling_options(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
    except ValueError as exc:  # the engine's max_new_tokens is LangChain's max_tokens
        raise ValueError(str(exc).replace("max_new_tokens=", "max_tokens=", 1)) from None
    beacon_llm.check_timeout(timeout)


class BeaconFields(BaseModel):
    """Model selection and generation defaults (all optional: no argument = the embedded default model)."""

    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=()
    )

    model: str | None = None
    """Base model or official beacon checkpoint (folder or hub id); None = embedded SmolLM2-135M-Instruct."""
    beacon: str | None = Field(default=None, alias="adapter")
    """Beacon adapter folder to put on ``model`` (None: the checkpoint's own or the shipped adapter)."""
    engine: Any = None
    """An already loaded :class:`beacon_llm.BeaconEngine` (or a :class:`beacon_llm.BeaconModel`, wrapped)."""
    beacon_overrides: dict[str, Any] = Field(default_factory=dict)
    """``beacon_*`` config keys applied on load, e.g. ``{"beacon_ratio": [8]}``."""
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    """Also persist condensed documents here (safetensors + JSON) and reuse them across processes."""
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None
    streaming: bool = False
    """ChatBeacon: True runs ``invoke`` through the streaming path too; False, given, switches streaming off (LangChain
    then streams nothing, and ``invoke`` hands no tokens to callbacks); not given, ``invoke`` hands each token over."""
    timeout: float | None = None
    """Seconds one call may take, reading and generating (None: no limit). Past it the call stops within one
    window step (reading) or one token (generating) and raises ``TimeoutError``. Also a per-call option."""
    max_retries: int = 0
    """Accepted for API compatibility; nothing is retried."""
    api_key: SecretStr | None = None
    """Accepted for API compatibility; unused (a secret: never shown in ``repr`` or traces)."""

    _engine: Any = PrivateAttr(default=None)
    _engine_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("stop", mode="before")
    @classmethod
    def _normalize_stop(cls, stop: Any) -> list[str] | None:
        """One string is one stop string; entries are checked as per call (``beacon_llm.normalize_stop``)."""
        return beacon_llm.normalize_stop(stop) or None

    @field_validator("seed", mode="before")
    @classmethod
    def _check_seed(cls, seed: Any) -> Any:
        """Checked as given (no coercion of "42" or True), with the message of a per-call seed."""
        beacon_llm.check_sampling_options(seed=seed)
        return seed

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        check_options(self.max_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed,
                      self.timeout)  # fmt: skip
        if self.engine is not None and not isinstance(self.engine, (beacon_llm.BeaconEngine, beacon_llm.BeaconModel)):
            raise TypeError(f"engine must be a BeaconEngine or BeaconModel, got {type(self.engine).__name__}")
        if self.engine is not None:
            given = {"model": self.model, "adapter": self.beacon, "beacon_overrides": self.beacon_overrides or None,
                     "device": self.device, "dtype": self.dtype, "cache_dir": self.cache_dir}  # fmt: skip
            if isinstance(self.engine, beacon_llm.BeaconModel):
                given.pop("cache_dir")  # the engine made around the model persists there
            conflicts = [name for name in _LOADING_FIELDS if given.get(name) is not None]
            if conflicts:
                raise ValueError(
                    f"{', '.join(conflicts)} cannot be set together with engine=: the engine is already loaded (its "
                    "model, adapter, beacon config, device, dtype and cache_dir are its own); pass either engine= or "
                    "these options"
                )

    # -------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """Picklable and deep-copyable (multiprocessing, Ray, joblib): the lock and a lazily loaded engine are left
        out and rebuilt on first use; an engine given explicitly travels with the object."""
        state = super().__getstate__()
        private = dict(state.get("__pydantic_private__") or {})
        private.pop("_engine_lock", None)
        if self.engine is None:
            private["_engine"] = None
        state["__pydantic_private__"] = private
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        private = dict(state.get("__pydantic_private__") or {})
        private["_engine_lock"] = threading.Lock()
        super().__setstate__({**state, "__pydantic_private__": private})

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        """A deep copy through the same state as pickling (pydantic's own copies the lock)."""
        import copy

        clone = self.__class__.__new__(self.__class__)
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    # -------------------------------------------------------------- engine
    def get_engine(self) -> beacon_llm.BeaconEngine:
        """The shared engine (loaded on first use; other objects over the same weights reuse it)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    if isinstance(self.engine, beacon_llm.BeaconEngine):
                        self._engine = self.engine
                    elif isinstance(self.engine, beacon_llm.BeaconModel):
                        self._engine = beacon_llm.BeaconEngine(self.engine, cache_dir=self.cache_dir)
                    elif self.engine is not None:
                        raise TypeError(
                            f"engine must be a BeaconEngine or BeaconModel, got {type(self.engine).__name__}"
                        )
                    else:
                        self._engine = beacon_llm.get_engine(
                            self.model,
                            adapter=self.beacon,
                            dtype=self.dtype,
                            device=self.device,
                            cache_dir=self.cache_dir,
                            **self.beacon_overrides,
                        )
        return self._engine

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """LangChain's LLM-cache key (and trace parameters): whatever changes the answer. An engine object given is
        keyed by its identity (a hash of its weights and beacon config), so two engines never share answers."""
        return {
            "model_name": self.model_name,
            "adapter": self.beacon,
            "beacon_overrides": self.beacon_overrides,
            "dtype": self.dtype,
            "engine": self.get_engine().identity if self.engine is not None else None,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "default_stop": self.stop,  # not "stop": LangChain puts the call's own stop under that key
        }

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text`` by the model's own tokenizer (offline), or by ``custom_get_token_ids`` when given."""
        return len(self.get_token_ids(text))

    def get_token_ids(self, text: str) -> list[int]:
        custom = getattr(self, "custom_get_token_ids", None)  # LangChain's field, on the model classes
        if custom is not None:
            return custom(text)
        return self.get_engine().encode(text)

    @property
    def model_name(self) -> str:
        if isinstance(self.engine, beacon_llm.BeaconEngine):
            return str(getattr(self.engine.bm.model.config, "_name_or_path", "beacon")) or "beacon"
        if isinstance(self.engine, beacon_llm.BeaconModel):
            return str(getattr(self.engine.model.config, "_name_or_path", "beacon")) or "beacon"
        return self.model or "smollm2-135m-instruct"

    def capacity(self) -> int | None:
        if self.engine is not None or self._engine is not None:
            return self.get_engine().capacity
        return beacon_llm.capacity_from_files(self.model, self.beacon, **self.beacon_overrides)

    def call_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The engine's options for one call: the fields merged with per-call ``kwargs``, validated before anything
        is tokenised or read; ``started`` marks when the call's ``timeout`` begins."""
        started = time.monotonic()
        unknown = set(kwargs) - CALL_OPTIONS - _LANGCHAIN_KEYS
        if unknown:
            raise TypeError(f"unknown generation options {sorted(unknown)}; supported: {sorted(CALL_OPTIONS)}")
        options = {name: kwargs.get(name, getattr(self, name)) for name in CALL_OPTIONS - {"stop"}}
        check_options(**options)
        stops = [*(self.stop or []), *beacon_llm.normalize_stop(stop), *beacon_llm.normalize_stop(kwargs.get("stop"))]
        return {
            "max_new_tokens": options["max_tokens"],
            "temperature": options["temperature"],
            "top_p": options["top_p"],
            "top_k": options["top_k"],
            "repetition_penalty": options["repetition_penalty"],
            "seed": options["seed"],
            "stop": stops or None,
            "timeout": options["timeout"],
            "started": started,
        }


def usage_metadata(usage: beacon_llm.Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "input_token_details": {"cache_read": usage.cache_read_tokens},
    }
