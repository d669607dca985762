"""What ChatBeacon and BeaconLLM share: model fields, lazy shared engine, call options, async bridging."""

from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

import beacon_llm

CALL_OPTIONS = {"temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty", "stop"}


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
    """Generate through the streaming path in ``invoke`` too (callbacks then see every token)."""
    timeout: float | None = None
    """Accepted for API compatibility; a local model has no request timeout."""
    max_retries: int = 0
    """Accepted for API compatibility; nothing is retried."""
    api_key: str | None = None
    """Accepted for API compatibility; unused."""

    _engine: Any = PrivateAttr(default=None)
    _engine_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

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
        return {
            "model_name": self.model_name,
            "adapter": self.beacon,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "beacon_overrides": self.beacon_overrides,
        }

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text`` by the model's own tokenizer (offline)."""
        return self.get_engine().count_tokens(text)

    def get_token_ids(self, text: str) -> list[int]:
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
        unknown = set(kwargs) - CALL_OPTIONS - {"run_id", "tags", "metadata", "callbacks", "run_name"}
        if unknown:
            raise TypeError(f"unknown generation options {sorted(unknown)}; supported: {sorted(CALL_OPTIONS)}")
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive int")
        stops = list(self.stop or []) + list(stop or []) + list(kwargs.get("stop") or [])
        return {
            "max_new_tokens": max_tokens,
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "top_k": kwargs.get("top_k", self.top_k),
            "repetition_penalty": kwargs.get("repetition_penalty", self.repetition_penalty),
            "seed": kwargs.get("seed", self.seed),
            "stop": stops or None,
        }


def usage_metadata(usage: beacon_llm.Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "input_token_details": {"cache_read": usage.cache_read_tokens},
    }
