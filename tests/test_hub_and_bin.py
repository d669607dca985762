"""Checkpoints as users get them: hub ids (from the hub cache, offline) at every entry point, and PyTorch ``.bin``
weights loaded safely (weights only, never arbitrary unpickling)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import beacon_llm
from beacon_llm.loading import is_hub_id, resolve_model
from beacon_llm.testing import tiny_beacon_model

REPO_ID = "tiny-org/beacon-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (1, n), generator=torch.Generator().manual_seed(seed))


def _official_config(bm) -> dict:
    config = bm.model.config.to_dict()
    config.update(bm.config.to_dict())
    return config


def _write_official(bm, folder, weights: str = "safetensors", shards: int = 1) -> None:
    """An official-format checkpoint (config.json with beacon_* keys, every tensor in the weight files)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_official_config(bm), f)
    if bm.tokenizer is not None:
        bm.tokenizer.save_pretrained(folder)
    state = {k: v.detach().clone().contiguous() for k, v in bm.model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, os.path.join(folder, "model.safetensors"))
        return
    keys = sorted(state)
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize(
    "name,hub",
    [
        ("namespace-Pt/beacon-qwen-2-7b-instruct", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("a/b", True),
        ("/abs/path/model", False),
        ("./rel/model", False),
        ("../up/model", False),
        ("a/b/c", False),
        ("~/model", False),
        ("org/..", False),
        ("just-a-name", False),
    ],
)
def test_hub_id_syntax(name, hub):
    assert is_hub_id(name) is hub


def test_resolve_model_passes_hub_ids_and_refuses_missing_folders(tmp_path):
    assert resolve_model("namespace-Pt/beacon-qwen-2-7b-instruct") == "namespace-Pt/beacon-qwen-2-7b-instruct"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="does not exist, and it is not a Hugging Face hub id"):
        resolve_model(str(tmp_path / "no" / "such"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(str(tmp_path / "file.txt"))


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_checkpoint_loads_like_safetensors(tmp_path, shards):
    bm = tiny_beacon_model(model_type="qwen2")
    _write_official(bm, tmp_path / "st")
    _write_official(bm, tmp_path / "bin", weights="bin", shards=shards)
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    from_st = beacon_llm.from_pretrained(str(tmp_path / "st"), tokenizer=False)
    from_bin = beacon_llm.from_pretrained(str(tmp_path / "bin"), tokenizer=False)
    ids = _ids(70)
    with torch.no_grad():
        expected = bm.forward(ids).token_logprobs
        assert torch.equal(from_st.forward(ids).token_logprobs, expected)
        assert torch.equal(from_bin.forward(ids).token_logprobs, expected)


class _Payload:
    """Unpickling this would create a marker file: a stand-in for code hidden in a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_with_code_in_the_pickle_is_refused_and_never_run(tmp_path):
    bm = tiny_beacon_model()
    _write_official(bm, tmp_path / "bad", weights="bin")
    marker = tmp_path / "executed"
    state = torch.load(tmp_path / "bad" / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.beacon_k_proj.weight"] = _Payload(str(marker))
    torch.save(state, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(Exception) as info:
        beacon_llm.from_pretrained(str(tmp_path / "bad"), tokenizer=False)
    assert "weights" in str(info.value).lower() or "unpickl" in str(info.value).lower()
    assert not marker.exists()
    from beacon_llm.serialization import _read_beacon_tensors

    with pytest.raises(ValueError, match="refused"):
        _read_beacon_tensors([str(tmp_path / "bad" / "pytorch_model.bin")])
    assert not marker.exists()


def test_capacity_from_files_reports_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot compute the context capacity"):
        beacon_llm.capacity_from_files(str(tmp_path))  # a folder without config.json
    with pytest.raises(ValueError, match=f"from {tmp_path} .config.json.: .*does not exist"):
        beacon_llm.capacity_from_files(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        beacon_llm.capacity_from_files(str(tmp_path))
    bm = tiny_beacon_model(max_position_embeddings=2048)
    _write_official(bm, tmp_path / "ok")
    assert beacon_llm.capacity_from_files(str(tmp_path / "ok")) > 2048
    # an override that is not a beacon_* key is refused by name, as loading refuses it (it was computed with)
    with pytest.raises(TypeError, match=r"unknown arguments \['ratio'\]"):
        beacon_llm.capacity_from_files(str(tmp_path / "ok"), ratio=[8])


_HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import beacon_llm
    from beacon_llm.cli import main as cli
    repo, folder, doc = sys.argv[1:4]
    out = {}
    for key, name in (("hub", repo), ("folder", folder)):
        res = {}
        bm = beacon_llm.from_pretrained(name)
        res["from_pretrained"] = bm.generate(bm.tokenizer("Dorothy lived in", return_tensors="pt").input_ids,
                                             max_new_tokens=6).tolist()
        res["load"] = beacon_llm.load(name).config.to_dict()
        res["capacity"] = beacon_llm.capacity_from_files(name)
        res["engine"] = beacon_llm.get_engine(name).capacity
        from langchain_beacon import BeaconLLM as LcLLM, ChatBeacon
        res["chat"] = ChatBeacon(model=name, max_tokens=6).invoke("Who is Toto?").content
        res["lc_llm"] = LcLLM(model=name, max_tokens=6).invoke("Toto is")
        res["lc_profile"] = ChatBeacon(model=name).profile["max_input_tokens"]
        from llama_index.llms.beacon import BeaconLLM as LiLLM
        li = LiLLM(model=name, max_new_tokens=6)
        res["li_window"] = li.metadata.context_window
        res["li_complete"] = li.complete("Toto is").text
        code = cli(["ask", doc, "Who is Toto?", "--model", name, "--max-new-tokens", "6", "--quiet"])
        res["cli_code"] = code
        out[key] = res
    try:
        beacon_llm.from_pretrained("tiny-org/not-in-the-cache")
    except ValueError as exc:
        out["missing"] = str(exc)
    print("RESULT " + json.dumps(out))
    """
)


def test_every_entry_point_takes_a_hub_id_from_the_offline_hub_cache(tmp_path):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    bm = tiny_beacon_model(max_position_embeddings=2048)
    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    _write_official(bm, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    doc = tmp_path / "doc.txt"
    doc.write_text("Dorothy lived in Kansas with Uncle Henry, Aunt Em and her dog Toto. " * 8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"),
           "BEACON_LLM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, REPO_ID, str(snapshot), str(doc)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert printed, proc.stdout[-2000:]
    result = json.loads(printed[-1][len("RESULT ") :])
    hub, folder = result["hub"], result["folder"]
    assert hub == folder  # the hub id and its snapshot folder give the same model, capacity and answers
    from llama_index.llms.beacon.base import TEMPLATE_RESERVE  # the window keeps room for the chat template

    assert hub["cli_code"] == 0 and hub["chat"] and hub["capacity"] == hub["engine"]
    assert hub["li_window"] == hub["capacity"] - TEMPLATE_RESERVE
    assert hub["lc_profile"] == hub["capacity"]
    cli_answers = [line for line in proc.stdout.splitlines() if line and not line.startswith("RESULT ")]
    assert len(cli_answers) >= 2 and cli_answers[0] == cli_answers[-1]
    assert "could not be fetched from the Hugging Face hub" in result["missing"]
