"""One entry point that turns "what the user named" into a BeaconModel: the embedded default model and its
shipped adapter, an official beacon checkpoint, or a base model plus an adapter / fresh beacons."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import BeaconConfig
from .embedded import EMBEDDED_MODEL, embedded_model_path, home
from .engine import BeaconEngine
from .model import BeaconModel
from .registry import Registry
from .serialization import ADAPTER_WEIGHTS_NAME, from_pretrained, is_hub_id, resolve_dtype

SHIPPED_ADAPTERS = Path(__file__).parent / "adapters"
DEFAULT_MAX_MODELS = 2


def _forget_engines(models: list[BeaconModel]) -> None:
    """The model registry evicted ``models``: drop the registered engines over them too, so that the registries
    never keep alive a model the model registry let go (engines held by callers keep their model and keep working)."""
    _ENGINES.discard(value_matches=lambda engine: any(engine.bm is bm for bm in models))


_LOADED: Registry[tuple, BeaconModel] = Registry(
    "models", env="BEACON_LLM_MAX_MODELS", default=DEFAULT_MAX_MODELS, on_evict=_forget_engines
)


DEFAULT_MAX_ENGINES = 4
_ENGINES: Registry[tuple, BeaconEngine] = Registry("engines", env="BEACON_LLM_MAX_ENGINES", default=DEFAULT_MAX_ENGINES)


def get_engine(
    model: str | None = None,
    *,
    adapter: str | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: str | None = None,
    cache_dir: str | None = None,
    max_prefixes: int = 4,
    **beacon_overrides: Any,
) -> BeaconEngine:
    """The process-wide engine for these arguments: weights are loaded once and condensed prefixes are shared by
    every caller (LangChain / LlamaIndex objects, threads). It reads with ``fit-N`` unless ``beacon_ratio_mix`` is
    given (:func:`beacon_llm.loading.inference_overrides`).

    Engines are kept in a process-wide registry of at most ``$BEACON_LLM_MAX_ENGINES`` (default 4) entries, the least
    recently used one dropped beyond that. Each engine holds its own model (from :func:`beacon_llm.load`, shared by
    engines over the same model): an engine a caller still holds keeps its model alive and working after either
    registry dropped it, but when the model registry (``$BEACON_LLM_MAX_MODELS``) evicts a model the registered
    engines over it are dropped too, so the registries never keep more models alive than that bound. Loading runs
    outside the registries' locks (callers for other engines are not blocked; callers for this one wait for its
    load), though the weights themselves load one model at a time (transformers' loading is not thread-safe).
    :func:`beacon_llm.unload` drops engines and models explicitly."""
    beacon_overrides = inference_overrides(beacon_overrides)
    dtype = resolve_dtype("auto" if dtype is None else dtype, device)
    key = (model, adapter, str(dtype), device, cache_dir, max_prefixes, json.dumps(beacon_overrides, sort_keys=True))

    def build() -> BeaconEngine:
        bm = load(model, adapter=adapter, dtype=dtype, device=device, **beacon_overrides)
        return BeaconEngine(bm, max_prefixes=max_prefixes, cache_dir=cache_dir)

    engine = _ENGINES.get(key, build)
    if not any(bm is engine.bm for bm in _LOADED.values()):
        # its model was evicted while this engine was being built, when the eviction could not drop it yet: not kept
        # (the caller still gets it), so the registries keep no model the model registry let go
        _ENGINES.discard(value_matches=lambda registered: registered is engine)
    return engine


def shipped_adapter(name: str = EMBEDDED_MODEL) -> str | None:
    folder = SHIPPED_ADAPTERS / name
    return str(folder) if (folder / ADAPTER_WEIGHTS_NAME).is_file() else None


DEFAULT_ANSWER_RESERVE = 1024


def inference_overrides(overrides: dict[str, Any], answer_reserve: int = DEFAULT_ANSWER_RESERVE) -> dict[str, Any]:
    """The beacon overrides the engine-facing entry points (CLI, LangChain, LlamaIndex) load with: ``fit-N`` unless
    the caller chose a ratio mix (a checkpoint's own mix is often its training one, ``step-random``)."""
    out = dict(overrides)
    out.setdefault("beacon_ratio_mix", f"fit-{max(answer_reserve, 0)}")
    return out


def resolve_model(model: str | None) -> str:
    """``None`` or ``"smollm2-135m-instruct"`` → the converted embedded model folder; a local folder or a hub id
    (``namespace/name``, fetched or taken from the hub cache when loaded) as given; anything else is an error."""
    if model in (None, "", EMBEDDED_MODEL):
        return embedded_model_path()
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"{model!r} is a file; give the model's folder (config.json + weights) or a hub id")
    if is_hub_id(model):
        return model
    raise ValueError(
        f"model folder {model!r} does not exist, and it is not a Hugging Face hub id (namespace/name); "
        "give an existing folder or a hub id"
    )


def load(
    model: str | None = None,
    *,
    adapter: str | None = None,
    beacon_config: BeaconConfig | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: str | None = None,
    attn_implementation: str = "sdpa",
    shared: bool = True,
    **beacon_overrides: Any,
) -> BeaconModel:
    """Load (once per process when ``shared``) a beacon model.

    * ``model=None``: the embedded SmolLM2-135M-Instruct with the beacon adapter shipped in this package;
    * a folder / hub id of an official beacon checkpoint;
    * a base model plus ``adapter=`` (beacon-only folder) or ``beacon_config=`` (fresh beacons).
    ``beacon_overrides`` are ``beacon_*`` keys applied on top (e.g. ``beacon_ratio=[8]``). ``dtype`` defaults to
    ``"auto"`` (None means the same): bf16 on a CPU that computes it natively, else fp32; a checkpoint's own dtype
    on a GPU (:func:`beacon_llm.serialization.resolve_dtype`).

    Shared models are kept in a process-wide registry of at most ``$BEACON_LLM_MAX_MODELS`` (default 2) entries; the
    least recently used one is dropped beyond that (models still referenced elsewhere keep working), together with
    the registered engines over it (:func:`beacon_llm.get_engine`). Loading runs outside any global lock: threads
    loading other models go on, threads asking for the same one wait for that load (and share its result or error;
    a failed load is retried by the next call). :func:`unload` drops models explicitly.
    """
    path = resolve_model(model)
    dtype = resolve_dtype("auto" if dtype is None else dtype, device)
    if adapter is None and beacon_config is None and model in (None, "", EMBEDDED_MODEL):
        adapter = shipped_adapter()
        if adapter is None:
            raise ValueError("this installation ships no beacon adapter for the embedded model; pass adapter=...")
    key = (
        path,
        adapter,
        json.dumps(beacon_config.to_dict(), sort_keys=True) if beacon_config else None,
        str(dtype),
        device,
        attn_implementation,
        json.dumps(beacon_overrides, sort_keys=True, default=str),
    )

    def read() -> BeaconModel:
        return from_pretrained(
            path,
            adapter=adapter,
            beacon_config=beacon_config,
            dtype=dtype,
            device_map=device,
            attn_implementation=attn_implementation,
            **beacon_overrides,
        )

    return _LOADED.get(key, read) if shared else read()


def _same_model(name: str | None) -> str:
    """A model name normalised for :func:`unload`'s matching: the embedded model's folder for its aliases (without
    converting it), the real path of an existing folder, else the name as given (a hub id)."""
    if name in (None, "", EMBEDDED_MODEL):
        name = str(home() / EMBEDDED_MODEL)
    return os.path.realpath(name) if os.path.isdir(name) else name


def unload(model: str | BeaconModel | None = None) -> int:
    """Drop loaded models and engines from the process-wide registries (:func:`load`, :func:`beacon_llm.get_engine`)
    and free what nothing else references (``gc.collect()``, then ``torch.cuda.empty_cache()`` when CUDA is there).

    Args:
        model: ``None`` drops everything; a model name or folder (as given to :func:`load`; ``"smollm2-135m-instruct"``
            for the embedded model) drops the models loaded from it, with any adapter and options, and the engines
            over them; a :class:`BeaconModel` drops that model and the engines over it.

    Returns how many registry entries (models plus engines) were dropped. Objects a caller still holds keep working;
    a later :func:`load` or :func:`~beacon_llm.get_engine` loads again. A load in flight for a dropped model still
    answers its callers but is not kept."""
    if model is None:
        dropped = len(_ENGINES.discard()) + len(_LOADED.discard())
    elif isinstance(model, BeaconModel):
        models = _LOADED.discard(value_matches=lambda bm: bm is model)
        dropped = len(models) + len(_ENGINES.discard(value_matches=lambda engine: engine.bm is model))
    else:
        name = _same_model(model)
        models = _LOADED.discard(key_matches=lambda key: _same_model(key[0]) == name)
        engines = _ENGINES.discard(
            key_matches=lambda key: _same_model(key[0]) == name,
            value_matches=lambda engine: any(engine.bm is bm for bm in models),
        )
        dropped = len(models) + len(engines)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dropped


def model_identity(bm: BeaconModel) -> str:
    """A stable hash of the base model's name and config and of the beacon weights and config (cache keys):
    :meth:`BeaconModel.identity`."""
    return bm.identity()


def capacity_from_files(model: str | None = None, adapter: str | None = None, **beacon_overrides: Any) -> int:
    """The context capacity the engine would have (the inference defaults of :func:`inference_overrides`), read from
    config files only (no weights are loaded; a hub id's files come from the hub cache or are fetched).

    Raises ValueError naming the file and the cause when the configuration cannot be read."""
    from . import _compat
    from .config import CONFIG_NAME
    from .schedule import config_capacity
    from .serialization import check_override_names, resolve_file

    check_override_names(beacon_overrides)  # refused as loading refuses them
    where = "the embedded model"
    try:
        if model in (None, "", EMBEDDED_MODEL):
            folder = home() / EMBEDDED_MODEL
            positions = 8192  # SmolLM2-135M-Instruct's own; its converted config says the same once it exists
            if (folder / "config.json").is_file():
                where = str(folder / "config.json")
                positions = int(json.loads((folder / "config.json").read_text())["max_position_embeddings"])
            adapter = adapter or shipped_adapter()
            base_cfg: dict[str, Any] = {}
        else:
            where = f"{model} (config.json)"
            where = resolve_file(resolve_model(model), "config.json")
            base_cfg = json.loads(Path(where).read_text())
            positions = _compat.max_positions_from_dict(base_cfg)
        if adapter:
            where = f"{adapter} ({CONFIG_NAME})"
            where = resolve_file(adapter, CONFIG_NAME)
            source = json.loads(Path(where).read_text())
        else:
            source = base_cfg
        cfg = BeaconConfig.from_dict(source, **inference_overrides(beacon_overrides))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot compute the context capacity from {where}: {exc}") from exc
    return config_capacity(cfg, positions)
