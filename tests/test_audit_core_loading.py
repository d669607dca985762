"""Audit of the core: adding memory gates through the ``beacon_memory_gate`` override at load time."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import beacon_llm
from beacon_llm import BeaconConfig
from beacon_llm.testing import tiny_base_model, tiny_beacon_model


def _ids(n, seed=0):
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(seed))


def _gates(bm):
    return [layer.self_attn.beacon_gate for layer in bm.model.model.layers]


def test_memory_gate_override_adds_gates_to_an_adapter_saved_without_them(tmp_path):
    """The override was accepted and then refused as "beacon weights ... missing [...beacon_gate]" (check
    beacon_param / the base model): the gates it asks for are new, initialised at its value, like
    BeaconModel.add_memory_gates after loading."""
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-8"))
    tiny_base_model().save_pretrained(tmp_path / "base")
    beacon_llm.save_adapter(bm, tmp_path / "adapter")
    gated = beacon_llm.from_pretrained(
        str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), tokenizer=False, beacon_memory_gate=1.0
    )
    assert gated.config.memory_gate == 1.0
    assert all(torch.equal(g, torch.ones_like(g)) for g in _gates(gated))
    bm.add_memory_gates(1.0)
    ids = _ids(90)
    with torch.no_grad():
        expected = bm.forward(ids, planned_length=100).token_logprobs
        assert torch.equal(gated.forward(ids, planned_length=100).token_logprobs, expected)


def test_memory_gate_override_adds_gates_to_an_official_format_checkpoint(tmp_path):
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), ratio_mix="adapt-16", pos="append"))
    os.makedirs(tmp_path / "ckpt")
    config = {**bm.model.config.to_dict(), **bm.config.to_dict()}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in bm.model.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors")
    )
    gated = beacon_llm.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False, beacon_memory_gate=0.5)
    assert all(torch.equal(g, torch.full_like(g, 0.5)) for g in _gates(gated))


def test_gates_a_saved_config_promises_must_still_be_in_the_file(tmp_path):
    """Only gates the override adds are made fresh: an adapter saved with gates whose file lost them is refused."""
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(4,), ratio_mix="fit-8", memory_gate=0.7))
    tiny_base_model().save_pretrained(tmp_path / "base")
    beacon_llm.save_adapter(bm, tmp_path / "adapter")
    path = tmp_path / "adapter" / "beacon_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("beacon_gate")}, str(path))
    for overrides in ({}, {"beacon_memory_gate": 1.0}):
        with pytest.raises(ValueError, match="missing"):
            beacon_llm.from_pretrained(
                str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), tokenizer=False, **overrides
            )
