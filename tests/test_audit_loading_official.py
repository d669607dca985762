"""Audit of official-checkpoint loading: sharded weights read as transformers reads them, ``.bin`` files with
non-tensor objects refused by name, the other era's "attend previous" key refused instead of dropped, and a local
folder shadowing a hub id."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import beacon_llm
from beacon_llm.config import BeaconConfig
from beacon_llm.testing import tiny_beacon_model


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (1, n), generator=torch.Generator().manual_seed(seed))


def _config(bm) -> dict:
    config = bm.model.config.to_dict()
    config.update(bm.config.to_dict())
    return config


def _state(bm) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in bm.model.state_dict().items()}


def _write_sharded(bm, folder, weights: str) -> None:
    """Two shards named by an index, plus a stale third shard (from an older layout) with zeroed beacon weights."""
    os.makedirs(folder, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_config(bm)))
    state = _state(bm)
    keys = sorted(state)
    ext, prefix = ("safetensors", "model") if weights == "safetensors" else ("bin", "pytorch_model")
    weight_map = {}
    for i in range(2):
        name = f"{prefix}-{i + 1:05d}-of-00002.{ext}"
        part = {k: state[k] for k in keys[i::2]}
        if ext == "bin":
            torch.save(part, folder / name)
        else:
            save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{prefix}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    stale = {k: torch.zeros_like(v) for k, v in state.items() if "beacon_" in k}
    if ext == "bin":
        torch.save(stale, folder / f"{prefix}-00003-of-00003.{ext}")
    else:
        save_file(stale, folder / f"{prefix}-00003-of-00003.{ext}", metadata={"format": "pt"})


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_sharded_checkpoint_reads_only_the_shards_its_index_names(tmp_path, weights):
    bm = tiny_beacon_model(model_type="qwen2")
    _write_sharded(bm, tmp_path / "ckpt", weights)
    loaded = beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False)
    ids = _ids(70)
    with torch.no_grad():
        assert torch.equal(loaded.forward(ids).token_logprobs, bm.forward(ids).token_logprobs)


def test_an_adapter_beside_the_checkpoint_is_not_read_as_its_weights(tmp_path):
    bm = tiny_beacon_model()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_config(bm)))
    save_file(_state(bm), folder / "model.safetensors", metadata={"format": "pt"})
    lora = {"base_model.model.model.layers.0.self_attn.beacon_q_proj.lora_A.weight": torch.zeros(2, 32)}
    save_file(lora, folder / "adapter_model.safetensors")
    loaded = beacon_llm.from_pretrained(str(folder), tokenizer=False)
    ids = _ids(40)
    with torch.no_grad():
        assert torch.equal(loaded.forward(ids).token_logprobs, bm.forward(ids).token_logprobs)


class _Marker:
    """Unpickling this would create a file: a stand-in for code hidden in a pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_bin(bm, folder, extra: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_config(bm)))
    torch.save({**_state(bm), **extra}, folder / "pytorch_model.bin")


def test_bin_with_a_foreign_object_is_refused_by_name_without_unsafe_advice(tmp_path):
    bm = tiny_beacon_model()
    marker = tmp_path / "executed"
    _write_bin(bm, tmp_path / "bad", {"model.layers.0.self_attn.beacon_k_proj.weight": _Marker(str(marker))})
    with pytest.raises(ValueError, match="pytorch_model.bin holds objects other than tensors and was refused") as info:
        beacon_llm.from_pretrained(str(tmp_path / "bad"), tokenizer=False)
    message = str(info.value)
    assert "Unsupported global" in message and "safetensors" in message
    assert "weights_only` set to `False" not in message and "\x1b[" not in message
    assert not marker.exists()


def test_bin_with_non_tensor_entries_names_them(tmp_path):
    bm = tiny_beacon_model()
    _write_bin(bm, tmp_path / "ckpt", {"step": 5})
    with pytest.raises(ValueError, match=r"not a plain state dict of tensors: it also holds \['step=int'\]"):
        beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False)


def _v2_model():
    cfg = BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16", era="v2", pos="append", attn="step-expansion")
    return tiny_beacon_model(cfg)


def _write_st(bm, folder, **config_extra) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**_config(bm), **config_extra}))
    save_file(_state(bm), folder / "model.safetensors", metadata={"format": "pt"})


def test_the_other_eras_attend_key_is_refused_not_dropped(tmp_path):
    v2, v3 = _v2_model(), tiny_beacon_model()
    _write_st(v2, tmp_path / "v2")
    _write_st(v3, tmp_path / "v3")
    _write_st(v2, tmp_path / "v2both", beacon_attend_prev=False)
    with pytest.raises(ValueError, match="beacon_attend_prev=False is the era-v3 key.*beacon_attend_previous"):
        beacon_llm.from_pretrained(str(tmp_path / "v2"), tokenizer=False, beacon_attend_prev=False)
    with pytest.raises(ValueError, match="beacon_attend_prev=False is the era-v3 key"):
        beacon_llm.from_pretrained(str(tmp_path / "v2both"), tokenizer=False)
    with pytest.raises(ValueError, match="beacon_attend_previous=False is the era-v2 key.*beacon_attend_prev "):
        beacon_llm.from_pretrained(str(tmp_path / "v3"), tokenizer=False, beacon_attend_previous=False)
    with pytest.raises(ValueError, match="beacon_attend_prev=False is the era-v3 key"):
        beacon_llm.from_pretrained(
            str(tmp_path / "v3"), tokenizer=False, beacon_config=v2.config, beacon_attend_prev=False
        )
    # each era's own key still applies
    loaded = beacon_llm.from_pretrained(str(tmp_path / "v2"), tokenizer=False, beacon_attend_previous=False)
    assert loaded.config.attend_previous is False
    loaded = beacon_llm.from_pretrained(str(tmp_path / "v3"), tokenizer=False, beacon_attend_prev=False)
    assert loaded.config.attend_prev is False


def test_a_local_folder_shadowing_a_hub_id_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "namespace-Pt" / "beacon-qwen-2-7b-instruct").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no config.json .a local folder of that name is used before the hub id"):
        beacon_llm.from_pretrained("namespace-Pt/beacon-qwen-2-7b-instruct", tokenizer=False)
    with pytest.raises(ValueError, match="has no config.json: give a checkpoint folder"):
        beacon_llm.from_pretrained(str(tmp_path / "namespace-Pt"), tokenizer=False)


def test_a_hub_cache_ref_to_a_missing_snapshot_is_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--beacon-gone"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    (repo / "snapshots" / ("f" * 40)).mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="refs.main points at snapshot '0123456789abcdef.*', which is missing") as info:
        beacon_llm.from_pretrained("tiny-org/beacon-gone", tokenizer=False)
    assert "f" * 40 in str(info.value) and "download it again" in str(info.value)
