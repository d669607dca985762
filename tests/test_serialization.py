import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import beacon_llm
from beacon_llm import BeaconConfig
from beacon_llm.testing import tiny_base_model, tiny_beacon_model


def _ids(n, seed=0):
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(seed))


def test_adapter_holds_only_beacon_tensors_and_round_trips(tmp_path):
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16", param=("q", "k", "v", "o")))
    beacon_llm.save_adapter(bm, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "beacon_model.safetensors")
    assert set(tensors) == {"model.beacon_embed_tokens.weight"} | {
        f"model.layers.{i}.self_attn.beacon_{p}_proj.weight" for i in range(2) for p in "qkvo"
    }
    assert sorted(os.listdir(tmp_path / "adapter")) == ["beacon_config.json", "beacon_model.safetensors"]
    again = beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "adapter"))
    assert again.config == bm.config
    ids = _ids(80)
    with torch.no_grad():
        assert torch.equal(again.forward(ids).token_logprobs, bm.forward(ids).token_logprobs)


def _write_checkpoint(bm, folder):
    """An official-format checkpoint: config.json with beacon_* keys + one safetensors with every tensor."""
    os.makedirs(folder)
    config = bm.model.config.to_dict()
    config.update(bm.config.to_dict())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in bm.model.state_dict().items()}, os.path.join(folder, "model.safetensors"))


def test_official_format_checkpoint_round_trip(tmp_path):
    bm = tiny_beacon_model(model_type="qwen2")
    _write_checkpoint(bm, tmp_path / "ckpt")
    loaded = beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False)
    ids = _ids(70)
    with torch.no_grad():
        assert torch.equal(loaded.forward(ids).token_logprobs, bm.forward(ids).token_logprobs)
    over = beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False, beacon_ratio=[8])
    assert over.config.ratios == (8,)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda t: t.pop("model.layers.1.self_attn.beacon_k_proj.weight"),
            r"missing \['model.layers.1.self_attn.beacon_k",
        ),
        (
            lambda t: t.__setitem__("model.layers.0.self_attn.beacon_o_proj.weight", torch.zeros(32, 32)),
            r"unexpected \['model.layers.0.self_attn.beacon_o_proj",
        ),
    ],
)
def test_checkpoint_with_missing_or_unexpected_beacon_keys_is_an_error(tmp_path, mutate, message):
    bm = tiny_beacon_model()
    _write_checkpoint(bm, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=message):
        beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False)


def test_plain_model_folder_needs_an_adapter_or_a_config(tmp_path):
    base = tiny_base_model()
    base.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="plain model.*adapter="):
        beacon_llm.from_pretrained(str(tmp_path / "plain"), tokenizer=False)
    fresh = beacon_llm.from_pretrained(
        str(tmp_path / "plain"), tokenizer=False, beacon_config=BeaconConfig(window=16, ratios=(4,))
    )
    emb = fresh.model.model.embed_tokens.weight
    assert torch.equal(fresh.model.model.beacon_embed_tokens.weight[0], emb[2])  # eos row (docs/design.md §10)
    attn = fresh.model.model.layers[0].self_attn
    assert torch.equal(attn.beacon_q_proj.weight, attn.q_proj.weight)
    assert attn.beacon_q_proj.weight.data_ptr() != attn.q_proj.weight.data_ptr()  # a copy, not tied


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a local folder and could not be fetched"):
        beacon_llm.from_pretrained(str(tmp_path / "nope" / "x"))


def test_cache_save_load_continues_identically(tmp_path):
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4, 8), ratio_mix="step-random", sink_size=1))
    book, question = _ids(75, 1), _ids(6, 2)
    with torch.no_grad():
        cache = bm.forward(book).cache
        beacon_llm.save_cache(cache, str(tmp_path / "book.safetensors"), extra={"title": "t"})
        loaded, extra = beacon_llm.load_cache(str(tmp_path / "book.safetensors"), bm)
        assert extra == {"title": "t"}
        assert loaded.memory_size() == cache.memory_size()
        a = bm.generate(question, cache=cache, max_new_tokens=8, eos_token_id=[])
        b = bm.generate(question, cache=loaded, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(a, b)


def test_corrupt_or_foreign_cache_file_is_an_error(tmp_path):
    bm = tiny_beacon_model()
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        beacon_llm.load_cache(str(path), bm)
    with torch.no_grad():
        cache = bm.forward(_ids(20)).cache
    beacon_llm.save_cache(cache, str(path))
    other = tiny_beacon_model(BeaconConfig(window=32, ratios=(4,)))
    with pytest.raises(ValueError, match="another beacon config"):
        beacon_llm.load_cache(str(path), other)


def test_low_rank_bf16_adapter_rebuilds_the_beacons(tmp_path):
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), param=("q", "k", "v", "o")))
    full_rank = 32  # hidden size: a rank-32 delta is exact
    beacon_llm.save_adapter(bm, str(tmp_path / "exact"), rank=full_rank)
    beacon_llm.save_adapter(bm, str(tmp_path / "small"), rank=2, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "small" / "beacon_model.safetensors")
    assert "model.layers.0.self_attn.beacon_q_proj.weight.delta_a" in tensors
    assert tensors["model.layers.0.self_attn.beacon_q_proj.weight.delta_a"].shape == (32, 2)
    exact = beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "exact"))
    small = beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "small"))
    ref = dict(bm.model.named_parameters())
    for name, p in exact.model.named_parameters():
        torch.testing.assert_close(p, ref[name], atol=1e-5, rtol=0)
    err = {n: (p - ref[n]).abs().max().item() for n, p in small.model.named_parameters() if "beacon_q" in n}
    assert 0 < max(err.values()) < 1.0


def test_from_pretrained_accepts_torch_dtype_and_rejects_unknown_arguments(tmp_path):
    bm = tiny_beacon_model()
    _write_checkpoint(bm, tmp_path / "ckpt")
    loaded = beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"unknown arguments \['window'\]"):
        beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False, window=8)


def _set_state(name, value):
    return lambda tensors, meta: meta["state"].__setitem__(name, value)


def _set_tensor(name, fn):
    return lambda tensors, meta: tensors.__setitem__(name, fn(tensors[name]).contiguous())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda tensors, meta: tensors.pop("mem_k.1"), "layer 1 has mem_v without its pair"),
        (lambda tensors, meta: tensors.pop("win_v.0"), "layer 0 has win_k without its pair"),
        (_set_tensor("mem_k.0", lambda t: t[:, :, :5]), "layer 0 mem_k/mem_v shapes"),
        (_set_tensor("mem_v.1", lambda t: t[..., :4]), "layer 1 mem_k/mem_v shapes"),
        (_set_tensor("mem_k.1", lambda t: t[:, :, :5]), "layer 1 mem_k/mem_v shapes"),
        (
            lambda tensors, meta: [
                tensors.__setitem__(f"mem_{x}.1", tensors[f"mem_{x}.1"][:, :, :5].contiguous()) for x in "kv"
            ],
            "the layers' mem_k lengths differ",
        ),
        (_set_tensor("last_logits", lambda t: t[:10]), "last logits of size 10"),
        (_set_state("n_seen", "abc"), "n_seen='abc' is not a count"),
        (_set_state("n_seen", -5), "n_seen=-5 is not a count"),
        (_set_state("fixed_ratio", 1.5), "fixed_ratio=1.5 is not a ratio"),
        (_set_state("pending", ["a"]), "pending holds something other than ints"),
        (lambda tensors, meta: meta.__setitem__("fingerprint", None), "no model fingerprint"),
    ],
)
def test_an_inconsistent_cache_file_is_refused_when_loaded(tmp_path, mutate, message):
    bm = tiny_beacon_model()
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(_ids(250), cache)
    good = str(tmp_path / "good.safetensors")
    beacon_llm.save_cache(cache, good)
    beacon_llm.load_cache(good, bm)
    tensors = load_file(good)
    with safe_open(good, framework="pt") as handle:
        meta = json.loads(handle.metadata()["beacon_cache"])
    mutate(tensors, meta)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata={"beacon_cache": json.dumps(meta)})
    with pytest.raises(ValueError, match=re.escape(f"{bad} is inconsistent") + ".*" + re.escape(message)):
        beacon_llm.load_cache(bad, bm)


def _other_weights(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("k_proj.weight")).add_(0.01)
    return model


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (lambda: _other_weights(tiny_base_model()), "low-rank deltas over the weights of"),
        (lambda: tiny_base_model("mistral"), "was trained on a llama model"),
        (lambda: tiny_base_model(hidden_size=64), "the adapter was made for a model of another size"),
    ],
)
def test_a_low_rank_adapter_is_refused_by_another_base(tmp_path, base, message):
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), param=("q", "k", "v", "o")))
    beacon_llm.save_adapter(bm, str(tmp_path / "adapter"), rank=4)
    beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "adapter"))  # its own base, in either dtype
    beacon_llm.load_adapter(tiny_base_model().to(torch.bfloat16), str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=message):
        beacon_llm.load_adapter(base(), str(tmp_path / "adapter"))


def test_beacon_config_takes_overrides_and_is_refused_next_to_an_adapter(tmp_path):
    tiny_base_model().save_pretrained(tmp_path / "base")
    config = BeaconConfig(window=16, ratios=(2, 4), ratio_mix="adapt-16")
    loaded = beacon_llm.from_pretrained(
        str(tmp_path / "base"), beacon_config=config, tokenizer=False, beacon_ratio=[4], beacon_ratio_mix="fit-8"
    )
    assert (loaded.config.ratios, loaded.config.ratio_mix) == ((4,), "fit-8")
    assert beacon_llm.from_pretrained(str(tmp_path / "base"), beacon_config=config, tokenizer=False).config == config
    beacon_llm.save_adapter(tiny_beacon_model(), str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="adapter= and beacon_config= were both given"):
        beacon_llm.from_pretrained(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), beacon_config=config)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [(torch.bfloat16, "bfloat16"), ("float32", torch.float32)])
def test_dtype_and_torch_dtype_naming_one_type_agree(tmp_path, dtype, torch_dtype):
    bm = tiny_beacon_model()
    _write_checkpoint(bm, tmp_path / "ckpt")
    loaded = beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False, dtype=dtype, torch_dtype=torch_dtype)
    assert loaded.dtype == (torch_dtype if isinstance(torch_dtype, torch.dtype) else getattr(torch, torch_dtype))


@pytest.mark.parametrize("device", [None, "cpu", "cpu:0", torch.device("cpu"), torch.device("cpu", 0)])
def test_auto_dtype_on_the_cpu_does_not_depend_on_how_the_cpu_is_named(device):
    from beacon_llm.serialization import resolve_dtype

    assert resolve_dtype("auto", device) == resolve_dtype("auto", None) != "auto"
    assert resolve_dtype("auto", "balanced") == "auto"  # a placement mode, not the CPU


def test_overlapping_loads_restore_the_transformers_log_level():
    import threading

    from transformers.utils import logging as hf_logging

    from beacon_llm import _compat

    before = hf_logging.get_verbosity()
    first_in, second_out = threading.Event(), threading.Event()

    def first():
        with _compat._quiet_transformers():
            first_in.set()
            second_out.wait(5)

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with _compat._quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    second_out.set()
    thread.join()
    assert hf_logging.get_verbosity() == before


def test_an_adapter_whose_two_files_come_from_different_saves_is_refused(tmp_path, tiny_dirs):
    """Each save marks its weights file and its config with the digest of its tensors: a save cut between its two
    renames (or two saves of different weights into one folder at once) leaves a weights file and a config of
    different saves, refused instead of run together. A hand-edited config keeps the mark; files without it load as
    before; concurrent saves of the same weights agree (tests/test_cache_files.py)."""
    import shutil

    first = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), param=("q", "k", "v")))
    second = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), param=("q", "k", "v", "o")))
    beacon_llm.save_adapter(first, tmp_path / "first")
    beacon_llm.save_adapter(second, tmp_path / "mixed")
    shutil.copy(tmp_path / "first" / "beacon_model.safetensors", tmp_path / "mixed" / "beacon_model.safetensors")
    with pytest.raises(ValueError, match="two different saves.*save the adapter again"):
        beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="two different saves"):
        beacon_llm.from_pretrained(str(tiny_dirs / "base"), adapter=str(tmp_path / "mixed"))
    # the config edited by hand, or without the mark: read as it is
    config_path = tmp_path / "first" / "beacon_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "beacon_ratio": [4]}))
    assert beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "first")).config.ratios == (4,)
    config.pop("adapter_weights_sha256")
    config_path.write_text(json.dumps(config))
    assert beacon_llm.load_adapter(tiny_base_model(), str(tmp_path / "first")).config == first.config
