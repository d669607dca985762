"""Loading and saving: official checkpoints, beacon-only adapters, condensed caches (safetensors + JSON only)."""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import _compat
from .cache import BeaconCache
from .config import CONFIG_NAME, BeaconConfig
from .digests import weights_sha256
from .layers import GATE_NAME, beacon_state_dict, is_beacon_parameter
from .model import BeaconModel

ADAPTER_WEIGHTS_NAME = "beacon_model.safetensors"
# the digest of a save's beacon tensors, in both of an adapter's files: a weights file and a config from saves of
# other weights (a save cut between its two renames, or two saves into one folder at once) are refused instead of
# run together; saves of the same weights agree
ADAPTER_SAVE_KEY = "adapter_weights_sha256"
CACHE_FORMAT = "beacon-llm-cache/1"


_META_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_BIN_WEIGHTS = "pytorch_model*.bin"


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(name: str) -> bool:
    """``namespace/name`` as the Hugging Face hub spells repository ids (one slash, no path syntax)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def _hub_error(path_or_id: str, exc: Exception) -> ValueError:
    broken = _broken_cache_ref(path_or_id)
    if broken is not None:
        return ValueError(
            f"{path_or_id!r} is not a local folder, and in the hub cache {broken}; download it again "
            f"(huggingface-cli download {path_or_id}) or pass a complete snapshot folder ({exc})"
        )
    return ValueError(
        f"{path_or_id!r} is not a local folder and could not be fetched from the Hugging Face hub ({exc}); "
        "download it first (or set HF_HUB_OFFLINE=1 to use the hub cache) and pass the folder or the hub id"
    )


def _broken_cache_ref(repo_id: str) -> str | None:
    """What is wrong when the hub cache's ``refs/main`` of ``repo_id`` names a snapshot that is not there (an
    interrupted or pruned download); None when there is no such ref or its snapshot exists."""
    try:
        from huggingface_hub import constants

        repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
        ref = repo_dir / "refs" / "main"
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
        if (repo_dir / "snapshots" / commit).is_dir():
            return None
    except (OSError, ValueError, ImportError):
        return None
    others = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    return (
        f"{ref} points at snapshot {commit!r}, which is missing from {repo_dir / 'snapshots'} "
        f"(snapshots there: {others or 'none'})"
    )


def _resolve(path_or_id: str) -> str:
    """A local folder as given; a hub id → its snapshot folder (fetched, or from the hub cache when offline), with
    the safetensors weights, or the ``pytorch_model*.bin`` ones when the checkpoint ships no safetensors."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; give the checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(path_or_id, allow_patterns=[*_META_PATTERNS, "*.safetensors"])
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(path_or_id, allow_patterns=[*_META_PATTERNS, _BIN_WEIGHTS])
    except Exception as exc:  # offline, unknown repo, auth
        raise _hub_error(path_or_id, exc) from exc
    return folder


def resolve_file(path_or_id: str, filename: str) -> str:
    """One file of a local folder or of a hub repository (fetched, or from the hub cache), without the weights."""
    if os.path.isdir(path_or_id):
        path = os.path.join(path_or_id, filename)
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist")
        return path
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; give the checkpoint folder")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path_or_id, filename)
    except Exception as exc:
        raise _hub_error(path_or_id, exc) from exc


_SINGLE_AND_INDEX = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def _weight_files(folder: str) -> list[str]:
    """The checkpoint's weight files, chosen as transformers chooses the base weights: ``model.safetensors``, else
    the shards its ``model.safetensors.index.json`` names, else the same for ``pytorch_model.bin``; without any of
    these, every ``*.safetensors`` file, else every ``pytorch_model*.bin`` one. Other files in the folder (a stale
    shard, an adapter saved beside the checkpoint) are not read."""
    for single, index in _SINGLE_AND_INDEX:
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            return _indexed_shards(folder, index_path)
    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    if not files:
        files = sorted(str(p) for p in Path(folder).glob(_BIN_WEIGHTS))
    if not files:
        raise ValueError(f"no weights in {folder}: expected *.safetensors (or pytorch_model*.bin) files")
    return files


def _indexed_shards(folder: str, index_path: str) -> list[str]:
    """The shard files a ``*.index.json`` maps weights to, each checked to exist."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index_path} is not a readable shard index ({type(exc).__name__}: {exc})") from exc
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing or not names:
        raise ValueError(
            f"{index_path} names shard files that are not in {folder}: {missing or 'none at all'}; download the "
            "whole checkpoint again"
        )
    return [os.path.join(folder, n) for n in names]


def _load_bin_weights_only(path: str) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict through ``torch.load(weights_only=True)``: tensors and plain containers only;
    any other object in the pickle is refused, never constructed."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds objects other than tensors and was refused (only weights are loaded, nothing is "
            f"unpickled): {_unpickling_cause(exc)}. Convert the checkpoint to safetensors"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors (name -> tensor)")
    others = sorted(f"{k}={type(v).__name__}" for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(
            f"{path} is not a plain state dict of tensors: it also holds {others[:6]}"
            f"{' ...' if len(others) > 6 else ''} (a training checkpoint?); save only the model's state_dict(), or "
            "convert the checkpoint to safetensors"
        )
    return state


def _unpickling_cause(exc: Exception) -> str:
    """What ``weights_only`` refused (torch's "Unsupported global: ..." line), without its advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        if "Unsupported" in line or "WeightsUnpickler error" in line:
            return line.strip().split(" Please use ")[0].replace("WeightsUnpickler error: ", "").rstrip(".")
    return text.splitlines()[0].strip() if text.strip() else type(exc).__name__


def _read_beacon_tensors(files: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.endswith(".bin"):
            out.update({k: v for k, v in _load_bin_weights_only(f).items() if is_beacon_parameter(k)})
            continue
        with safe_open(f, framework="pt") as handle:
            for key in handle.keys():
                if is_beacon_parameter(key):
                    out[key] = handle.get_tensor(key)
    return out


@torch.no_grad()
def load_beacon_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy beacon tensors into the attached modules; missing or unexpected keys are an error."""
    expected = beacon_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"beacon weights in {source} do not match the beacon config: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''} ({len(missing)}), unexpected {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)}). Check beacon_param / the base model"
        )
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        target = params[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in {source} != model shape {tuple(target.shape)}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def from_pretrained(
    path_or_id: str,
    *,
    adapter: str | None = None,
    beacon_config: BeaconConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    attn_implementation: str = "sdpa",
    tokenizer: bool = True,
    torch_dtype: torch.dtype | str | None = None,
    **beacon_overrides: Any,
) -> BeaconModel:
    """Load a beacon model.

    * an official beacon checkpoint (``config.json`` with ``beacon_*`` keys + safetensors holding the beacon
      tensors), e.g. ``namespace-Pt/beacon-qwen-2-7b-instruct``: base and beacon weights from the same folder;
    * a base model plus ``adapter=`` (a folder written by :func:`save_adapter`);
    * a base model plus ``beacon_config=``: fresh beacons (initialised from the base weights).

    ``beacon_overrides`` are official ``beacon_*`` keys applied on top of the checkpoint config (e.g.
    ``beacon_ratio=[8]``); ``beacon_memory_gate=g`` on beacons saved without gates adds them, all ``g``, as
    :meth:`BeaconModel.add_memory_gates` does. ``dtype``: a torch dtype or its name, ``"auto"``
    (:func:`resolve_dtype`), or None for transformers' default; ``torch_dtype`` is accepted as its older name.
    Remote code is never executed.
    """
    if torch_dtype is not None:
        if dtype is not None and resolve_dtype(dtype, device_map) != resolve_dtype(torch_dtype, device_map):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
        dtype = torch_dtype
    check_override_names(beacon_overrides)
    folder = _resolve(path_or_id)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        shadows = " (a local folder of that name is used before the hub id)" if is_hub_id(path_or_id) else ""
        raise ValueError(
            f"{folder!r} has no config.json{shadows}: give a checkpoint folder (config.json + weights), or, for a "
            "hub id, run from a directory without a folder of that name or pass the downloaded snapshot folder"
        )
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        raw_config = json.load(f)
    has_beacon_config = any(k.startswith("beacon_") for k in raw_config)
    if adapter is not None and beacon_config is not None:
        raise ValueError(
            "adapter= and beacon_config= were both given: an adapter carries its own beacon config; pass one of them "
            "(change the adapter's settings with beacon_* overrides, e.g. beacon_ratio=[8])"
        )
    stored: dict[str, Any] = {}  # the adapter's saved beacon config
    if adapter is not None:
        stored = read_adapter_config(_resolve(adapter))
    source = stored if adapter is not None else raw_config
    if beacon_config is None and (adapter is not None or has_beacon_config):
        era_given = {"beacon_era": beacon_overrides["beacon_era"]} if beacon_overrides.get("beacon_era") else {}
        _refuse_other_era_keys({**source, **beacon_overrides}, _saved_era({**source, **era_given}))
    if adapter is not None:
        bcfg = BeaconConfig.from_dict(stored, **beacon_overrides)
    elif beacon_config is not None:
        bcfg = beacon_config  # with overrides applied on top, as on a checkpoint's config
        if beacon_overrides:
            given = {**beacon_config.to_dict(), "beacon_era": beacon_config.era}
            bcfg = BeaconConfig.from_dict(given, **beacon_overrides)
    elif has_beacon_config:
        bcfg = BeaconConfig.from_dict(raw_config, **beacon_overrides)
    else:
        raise ValueError(
            f"{path_or_id!r} is a plain model (no beacon_* keys in config.json); pass adapter=... (trained beacons) "
            "or beacon_config=BeaconConfig(...) (fresh, untrained beacons)"
        )
    saved = {} if beacon_config is not None else source  # a BeaconConfig's own keys are those of its era
    _refuse_other_era_keys({**saved, **beacon_overrides}, bcfg.era)  # what the config would drop silently
    hf_config = _compat.load_base_config(folder, attn_implementation=attn_implementation)
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    dtype = resolve_dtype(dtype, device_map)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        base = _compat.load_base_model(folder, hf_config, **kwargs)
    except pickle.UnpicklingError as exc:  # a .bin with objects other than weights, refused by weights_only
        for f in _weight_files(folder):
            if f.endswith(".bin"):
                _load_bin_weights_only(f)  # raises the ValueError naming the file
        raise ValueError(
            f"the weights in {folder} were refused: they hold objects other than tensors (only weights are loaded, "
            f"nothing is unpickled): {_unpickling_cause(exc)}. Convert the checkpoint to safetensors"
        ) from exc
    tok = None
    if tokenizer:
        tok = _compat.load_tokenizer(folder)
    bm = BeaconModel.attach(base, bcfg, tok)
    if adapter is not None:
        path = os.path.join(_resolve(adapter), ADAPTER_WEIGHTS_NAME)
        tensors = read_adapter_tensors(base, path)
        load_beacon_weights(base, _with_added_gates(base, tensors, stored, beacon_overrides), path)
    elif beacon_config is None:
        tensors = _read_beacon_tensors(_weight_files(folder))
        load_beacon_weights(base, _with_added_gates(base, tensors, raw_config, beacon_overrides), folder)
    base.eval()
    return bm


def check_override_names(beacon_overrides: dict[str, Any]) -> None:
    """Beacon config overrides are official ``beacon_*`` keys; anything else is refused (``TypeError``) by name, as
    a misspelt keyword argument would be."""
    unknown = sorted(k for k in beacon_overrides if not k.startswith("beacon_"))
    if unknown:
        raise TypeError(f"unknown arguments {unknown}; beacon config overrides are named beacon_* (e.g. beacon_ratio)")


def _saved_era(d: dict[str, Any]) -> str:
    """The era of a saved beacon config, by the rule of :meth:`BeaconConfig.from_dict`."""
    return d.get("beacon_era") or (
        "v2" if "beacon_attend_previous" in d or isinstance(d.get("beacon_stride"), list) else "v3"
    )


_ERA_KEYS = {"v2": "beacon_attend_previous", "v3": "beacon_attend_prev"}


def _refuse_other_era_keys(given: dict[str, Any], era: str) -> None:
    """Refuse, by name, the other era's spelling of "attend previous" (``beacon_attend_prev`` on an era-v2 config,
    ``beacon_attend_previous`` on an era-v3 one): the config would drop it silently, and the two keys mean different
    things (v2: beacons see earlier windows' memory; v3: beacons see earlier beacons of their window)."""
    own = _ERA_KEYS.get(era)
    for other_era, key in _ERA_KEYS.items():
        if other_era != era and given.get(key) is not None:
            raise ValueError(
                f"{key}={given[key]!r} is the era-{other_era} key, but this beacon config is era {era}, whose key is "
                f"{own} (with another meaning); set {own} instead, or drop {key}"
            )


def _with_added_gates(
    model: nn.Module, tensors: dict[str, torch.Tensor], stored: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """``tensors`` plus the freshly attached memory gates (at the ``beacon_memory_gate`` value) when that override
    adds gates to beacons saved without any (as :meth:`BeaconModel.add_memory_gates` does after loading); gates
    the saved config promises must be in the file."""
    if overrides.get("beacon_memory_gate") is None or stored.get("beacon_memory_gate") is not None:
        return tensors
    if any(k.endswith(f".{GATE_NAME}") for k in tensors):
        return tensors
    gates = {k: v for k, v in beacon_state_dict(model).items() if k.endswith(f".{GATE_NAME}")}
    return {**tensors, **gates}


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: torch.dtype | str | None, device: Any = None) -> torch.dtype | str | None:
    """The weights dtype to load: a torch dtype or its name as given; ``"auto"`` on the CPU (``device`` None or
    ``"cpu"``) is bfloat16 where the CPU computes bf16 natively (AVX512-BF16 / AMX: reading runs 2-3x faster) and
    float32 elsewhere (on AVX2-only CPUs bf16 is emulated and slower); on other devices ``"auto"`` is the
    checkpoint's own dtype (transformers' ``"auto"``). None is left to transformers."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPE_NAMES} (or a torch.dtype)")
    if dtype != "auto":
        return getattr(torch, dtype)
    on_cpu = device is None or (isinstance(device, (str, torch.device)) and _is_cpu(device))
    if not on_cpu:
        return "auto"
    return torch.bfloat16 if _compat.native_bf16_cpu() else torch.float32


def _is_cpu(device: str | torch.device) -> bool:
    """``"cpu"``, ``"cpu:0"`` or ``torch.device("cpu", 0)``; a placement mode such as ``"auto"`` is not a device."""
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, ValueError):
        return False


DELTA_A, DELTA_B = ".delta_a", ".delta_b"
BASE_DIGEST_KEY = "beacon_delta_base_sha256"  # low-rank adapters: the base projections the deltas were taken over


def _base_key(beacon_key: str) -> str:
    return beacon_key.replace("beacon_", "", 1)


@torch.no_grad()
def save_adapter(bm: BeaconModel, folder: str, *, dtype: torch.dtype | None = None, rank: int | None = None) -> None:
    """Write only the beacon weights (``beacon_model.safetensors``) and ``beacon_config.json``.

    Args:
        dtype: store tensors in this dtype (e.g. ``torch.bfloat16`` halves the size).
        rank: store each beacon projection as a rank-``rank`` delta over the base projection
            (``W_beacon ≈ W_base + A @ B``, from a truncated SVD): a much smaller adapter, rebuilt exactly from
            the same base weights at load time up to the truncation.
    """
    os.makedirs(folder, exist_ok=True)
    state = bm.model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in beacon_state_dict(bm.model).items():
        if rank is not None and key.endswith("_proj.weight"):
            delta = (value - state[_base_key(key)]).float()  # (out, in)
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, sv.numel())
            pieces = {key + DELTA_A: u[:, :r] * sv[:r], key + DELTA_B: vh[:r]}  # (out, r), (r, in)
        else:
            pieces = {key: value}
        for k, v in pieces.items():
            tensors[k] = (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
    c = bm.model.config
    meta = {"format": "pt", "base_model_type": str(c.model_type), "base_name_or_path": str(c._name_or_path)}
    if rank is not None:
        meta["beacon_delta_rank"] = str(rank)
        meta[BASE_DIGEST_KEY] = _delta_base_digest(state, [k[: -len(DELTA_A)] for k in tensors if k.endswith(DELTA_A)])
    meta[ADAPTER_SAVE_KEY] = digest = weights_sha256(sorted(tensors.items()))
    config = {**bm.config.to_dict(), "beacon_era": bm.config.era, ADAPTER_SAVE_KEY: digest}
    _write_atomically(os.path.join(folder, ADAPTER_WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata=meta))
    _write_atomically(os.path.join(folder, CONFIG_NAME), lambda tmp: _write_json(tmp, config))


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def read_adapter_config(folder: str) -> dict[str, Any]:
    """The beacon config saved in the adapter ``folder`` (its ``beacon_config.json`` as written), refused
    (``ValueError``) when the folder's weights file was written by a save of other weights than the config: each
    save marks both files with the digest of its tensors, and a save cut between its two renames, or two saves of
    different weights into one folder at once, leave them apart. Files without the mark (hand-made, or saved before
    it existed) are read as they are."""
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as f:
        stored = json.load(f)
    weights = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if not isinstance(stored, dict) or not os.path.isfile(weights):
        return stored  # refused by the config reader, or the missing weights named by the weights reader
    with safe_open(weights, framework="pt") as handle:
        meta = handle.metadata() or {}
    in_config, in_weights = stored.get(ADAPTER_SAVE_KEY), meta.get(ADAPTER_SAVE_KEY)
    if in_config and in_weights and in_config != in_weights:
        raise ValueError(
            f"adapter {folder}: {CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} come from two different saves (a save was "
            "interrupted, or two saves of different weights wrote into this folder at once), so the weights may not "
            "match the config; save the adapter again, or restore both files from one save"
        )
    return stored


def _write_atomically(path: str, write: Any) -> None:
    """``write(tmp)`` to a name unique to this writer, then rename it to ``path``: readers never see a half-written
    file and concurrent writers all succeed (the last rename wins)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _delta_base_digest(state: dict[str, torch.Tensor], keys: list[str]) -> str:
    """sha256 of the base projections under the low-rank deltas ``keys``, as bf16 (the same for a base loaded in
    float32 or bfloat16)."""
    return weights_sha256((_base_key(k), state[_base_key(k)].to(torch.bfloat16)) for k in sorted(keys))


@torch.no_grad()
def read_adapter_tensors(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """The full beacon weights of the adapter file ``path`` for ``model``: refused (``ValueError``) when it was
    written for another model type, or, for a low-rank adapter, over other base weights."""
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    made_for, model_type = meta.get("base_model_type"), str(getattr(model.config, "model_type", ""))
    if made_for and model_type and made_for != model_type:
        raise ValueError(
            f"adapter {path} was trained on a {made_for} model ({meta.get('base_name_or_path') or 'unnamed'}), not "
            f"on this {model_type} model; load it onto the base model it was trained on"
        )
    stored = load_file(path)
    tensors = expand_adapter_tensors(model, stored)  # checks every delta's shapes against the base
    wanted = meta.get(BASE_DIGEST_KEY)
    if wanted is not None:
        deltas = [k[: -len(DELTA_A)] for k in stored if k.endswith(DELTA_A)]
        if _delta_base_digest(model.state_dict(), deltas) != wanted:
            raise ValueError(
                f"adapter {path} stores its beacon projections as low-rank deltas over the weights of "
                f"{meta.get('base_name_or_path') or 'another model'}, and this model's weights differ; load it onto "
                "that base model, or save the adapter without rank="
            )
    return tensors


@torch.no_grad()
def expand_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn low-rank delta pairs (see :func:`save_adapter`) back into full beacon weights over ``model``'s base."""
    if not any(k.endswith(DELTA_A) for k in tensors):
        return tensors
    state = model.state_dict()
    out = {k: v for k, v in tensors.items() if not k.endswith((DELTA_A, DELTA_B))}
    for key in [k[: -len(DELTA_A)] for k in tensors if k.endswith(DELTA_A)]:
        b_key = key + DELTA_B
        if b_key not in tensors:
            raise ValueError(f"adapter has {key}{DELTA_A} without {b_key}")
        base = state.get(_base_key(key))
        if base is None:
            raise ValueError(f"adapter delta {key} has no base projection {_base_key(key)} in the model")
        a, b = tensors[key + DELTA_A], tensors[b_key]  # (out, r), (r, in)
        if a.dim() != 2 or b.dim() != 2 or (a.shape[0], b.shape[1]) != tuple(base.shape) or a.shape[1] != b.shape[0]:
            raise ValueError(
                f"adapter delta {key} has shapes {tuple(a.shape)} x {tuple(b.shape)}, which do not make the base "
                f"projection's {tuple(base.shape)}: the adapter was made for a model of another size"
            )
        delta = a.float() @ b.float()  # (out, in)
        out[key] = (base.float().cpu() + delta).to(base.dtype)
    return out


def load_adapter(model: nn.Module, folder: str, tokenizer: object | None = None) -> BeaconModel:
    """Attach the beacons saved in ``folder`` (by :func:`save_adapter`) to an already loaded base model."""
    bcfg = BeaconConfig.from_dict(read_adapter_config(folder))
    bm = BeaconModel.attach(model, bcfg, tokenizer)
    path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    load_beacon_weights(model, read_adapter_tensors(model, path), path)
    return bm


# ---------------------------------------------------------------------- condensed caches
def save_cache(cache: BeaconCache, path: str, *, extra: dict[str, Any] | None = None) -> None:
    """Write a cache as one safetensors file; scheduling state and ``extra`` go into its JSON metadata."""
    tensors, record = cache.to_record()
    meta = {"format": CACHE_FORMAT, **record, "extra": extra or {}}
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"  # unique per writer
    try:
        save_file(tensors, tmp, metadata={"beacon_cache": json.dumps(meta, default=int)})
        os.replace(tmp, path)  # never leave a half-written cache behind
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cache(path: str, bm: BeaconModel) -> tuple[BeaconCache, dict[str, Any]]:
    """Read a cache written by :func:`save_cache` for ``bm``; raises ``ValueError`` if it is corrupt or foreign."""
    try:
        with safe_open(path, framework="pt") as handle:
            meta = json.loads(handle.metadata()["beacon_cache"])
        tensors = load_file(path)
    except Exception as exc:
        raise ValueError(f"cache file {path} is unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"cache file {path} has format {found!r}, expected {CACHE_FORMAT!r}")
    try:
        return _cache_from(meta, tensors, path, bm)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"cache file {path} is incomplete or corrupt ({type(exc).__name__}: {exc})") from exc


def _cache_from(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: str, bm: BeaconModel
) -> tuple[BeaconCache, dict[str, Any]]:
    cfg = BeaconConfig.from_dict(meta["config"])
    if cfg != bm.config or meta["num_layers"] != bm.num_layers:
        raise ValueError(f"cache file {path} was written with another beacon config or model")
    fp = tuple(meta["fingerprint"]) if meta["fingerprint"] else None
    if fp is not None and fp != bm._fingerprint():
        raise ValueError(
            f"cache file {path} was written by another model, beacon weights or beacon config ({fp}), not this one "
            f"({bm._fingerprint()}); read the document again"
        )
    cache = BeaconCache.from_record(
        tensors,
        meta,
        config=bm.config,
        num_layers=bm.num_layers,
        device=bm.device,
        dtype=bm.dtype,
        max_entries=bm.max_positions,
    )
    problem = _layout_problem(cache, bm)
    if problem is not None:
        raise ValueError(f"cache file {path} is inconsistent ({problem}); read the document again")
    return cache, meta.get("extra", {})


def _layout_problem(cache: BeaconCache, bm: BeaconModel) -> str | None:
    """What in a loaded cache does not fit ``bm`` or itself (None: nothing): the scheduling state's types, every
    layer's keys and values (present together, (1, KV heads, entries, head dim), one length per kind), the last
    logits' size and a model fingerprint once anything was read."""
    st = cache.state
    counts = {"n_seen": st.n_seen, "n_steps": st.n_steps, "n_windows": st.n_windows, "n_sink": st.n_sink,
              "remainder": st.remainder, "n_raw_memory": st.n_raw_memory}  # fmt: skip
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"state {name}={value!r} is not a count"
    for name in ("window_ratio", "fixed_ratio"):
        value = getattr(st, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"state {name}={value!r} is not a ratio"
    for name in ("pending", "window_sizes"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(st, name)):
            return f"state {name} holds something other than ints"
    if st.n_seen and cache.fingerprint is None:
        return "it holds read tokens but no model fingerprint"
    attn = bm.model.model.layers[0].self_attn
    n_kv, head_dim = attn.k_proj.out_features // attn.head_dim, attn.head_dim
    for keys_name, values_name in (("mem_k", "mem_v"), ("win_k", "win_v")):
        shapes = set()
        for i, (k, v) in enumerate(zip(getattr(cache, keys_name), getattr(cache, values_name), strict=True)):
            if (k is None) != (v is None):
                return f"layer {i} has {keys_name if v is None else values_name} without its pair"
            if k is not None:
                if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (1, n_kv, head_dim):
                    return f"layer {i} {keys_name}/{values_name} shapes {tuple(k.shape)}/{tuple(v.shape)}"
                shapes.add(k.shape[2])
            else:
                shapes.add(0)
        if len(shapes) > 1:
            return f"the layers' {keys_name} lengths differ ({sorted(shapes)})"
    if cache.window_length != (0 if cache.win_k[0] is None else cache.win_k[0].shape[2]):
        return "window layout vs tensors"
    vocab = bm.model.get_output_embeddings().weight.shape[0]
    if cache.last_logits is not None and cache.last_logits.shape[-1] != vocab:
        return f"last logits of size {cache.last_logits.shape[-1]}, not the model's vocabulary of {vocab}"
    return None
