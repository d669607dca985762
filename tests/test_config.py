import json
from pathlib import Path

import pytest
from conftest import FIXTURES

from beacon_llm import BeaconConfig

BUNDLED = Path(__file__).parent / "fixtures" / "beacon_parity"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"window": 64, "stride": 100, "era": "v2", "pos": "append", "attn": "step-expansion"},
            "beacon_stride=100 exceeds beacon_window=64",
        ),
        (
            {"window": 128, "stride": 100, "ratios": (8,), "era": "v2", "pos": "append", "attn": "step-expansion"},
            "beacon_stride=100 is not divisible by ratio 8",
        ),
        ({"window": 64, "ratios": (3,)}, "beacon_stride=64 is not divisible by ratio 3"),
        ({"window": 64, "stride": 32}, "only supported in era v2"),
        ({"attn": "sliding"}, "beacon_attn='sliding' is not one of"),
        ({"pos": "prepend"}, "beacon_pos='prepend' is not one of"),
        ({"ratio_mix": "adapt-x"}, "beacon_ratio_mix='adapt-x' is not one of"),
        ({"ratio_mix": "bm25"}, "beacon_ratio_mix='bm25'"),
        ({"param": ("q", "mlp")}, "beacon_param"),
        ({"ratios": ()}, "at least one ratio"),
        ({"ratios": (-2,)}, "must be an int >= 0"),
        ({"ratios": (2048,), "window": 1024}, "exceeds beacon_stride=1024"),
        ({"window": 0}, "beacon_window=0 must be positive"),
        ({"window": 1.5}, "must be an int"),
        ({"pos": "interleave", "attn": "segmentation"}, "cannot be combined"),
        ({"pos": "interleave", "attn": "step-expansion", "attend_prev": True}, "requires beacon_attend_prev=False"),
        ({"era": "v2", "pos": "interleave"}, "era v2 only appends"),
        ({"era": "v2", "pos": "append", "attend_prev": True}, "era-v3 key"),
        ({"era": "v3", "attend_previous": True}, "era-v2 key"),
        ({"era": "v2", "pos": "append", "sink_size": 1}, "no attention sink"),
        ({"sink_size": -1}, "beacon_sink_size=-1"),
        ({"window": 16, "ratios": (2,), "sink_size": 17}, "beacon_sink_size=17 must be at most beacon_window=16"),
        ({"era": "v4"}, "era='v4'"),
        ({"embed_init": "pad"}, "beacon_embed_init='pad'"),
    ],
)
def test_invalid_configs_name_value_and_rule(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BeaconConfig(**kwargs)


@pytest.mark.parametrize(
    "config",
    [
        BeaconConfig(),
        BeaconConfig(window=2048, ratios=(2, 4, 8, 16, 32), ratio_mix="adapt-1024", param=("q", "k", "v")),
        BeaconConfig(
            era="v2",
            pos="append",
            attn="segmentation",
            window=64,
            stride=32,
            ratios=(0, 2, 4),
            ratio_mix="sequence",
            attend_previous=False,
            param=("q", "k", "v", "o"),
        ),
        BeaconConfig(pos="append", attn="step-expansion", attend_prev=False, sink_size=1, embed_init="bos"),
    ],
)
def test_json_round_trip(config, tmp_path):
    path = tmp_path / "beacon_config.json"
    config.to_json_file(path)
    assert BeaconConfig.from_json_file(path) == config
    assert BeaconConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "folder,expected",
    [
        (
            "v2_llama",
            dict(
                era="v2",
                window=32,
                stride=32,
                attn="step-expansion",
                pos="append",
                attend_previous=True,
                ratios=(2,),
                param=("q", "k", "v", "o"),
            ),
        ),
        (
            "v3_llama",
            dict(
                era="v3",
                window=32,
                attn="full-coverage",
                pos="interleave",
                attend_prev=True,
                sink_size=0,
                param=("q", "k", "v"),
            ),
        ),
        ("v3_qwen2", dict(era="v3", pos="interleave", param=("q", "k", "v"))),
    ],
)
def test_reads_official_config_json(folder, expected):
    """The bundled fixture set's configs (another set given by BEACON_PARITY_DIR is checked by the test below)."""
    if Path(FIXTURES).resolve() != BUNDLED.resolve():
        pytest.skip("BEACON_PARITY_DIR is another fixture set: its configs are checked against their own files")
    with open(f"{FIXTURES}/{folder}/config.json") as f:
        config = BeaconConfig.from_dict(json.load(f))
    for key, value in expected.items():
        assert getattr(config, key) == value


def _fixture_folders():
    return sorted(p for p in Path(FIXTURES).iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("folder", _fixture_folders(), ids=lambda p: p.name)
def test_every_fixture_config_is_read_as_its_file_says(folder):
    """Whatever fixture set BEACON_PARITY_DIR names: each folder's config.json, key by key."""
    raw = json.loads((folder / "config.json").read_text())
    config = BeaconConfig.from_dict(raw)
    stride = raw.get("beacon_stride", raw["beacon_window"])
    v2 = "beacon_attend_previous" in raw or isinstance(stride, list)
    assert config.era == ("v2" if v2 else "v3")
    assert config.window == raw["beacon_window"]
    assert config.stride == (stride[0] if isinstance(stride, list) else stride)
    assert config.ratios == tuple(raw["beacon_ratio"])
    if "beacon_param" in raw:
        assert config.param == tuple(raw["beacon_param"])
    for key, attr in (("beacon_attn", "attn"), ("beacon_pos", "pos"), ("beacon_ratio_mix", "ratio_mix")):
        if key in raw:
            assert getattr(config, attr) == raw[key]
    if v2:
        assert config.attend_previous == raw.get("beacon_attend_previous", True)
    else:
        assert config.attend_prev == raw.get("beacon_attend_prev", True)
        assert config.sink_size == raw.get("beacon_sink_size", 0)


def test_official_mistral_style_config_without_beacon_pos_is_append():
    cfg = BeaconConfig.from_dict(
        {
            "beacon_window": 2048,
            "beacon_stride": 2048,
            "beacon_attn": "step-expansion",
            "beacon_attend_prev": False,
            "beacon_sink_size": 1,
            "beacon_ratio": [2, 4, 8],
            "beacon_ratio_mix": "adapt-1024",
            "beacon_param": ["q", "k", "v", "o"],
        }
    )
    assert (cfg.era, cfg.pos, cfg.sink_size, cfg.attend_prev) == ("v3", "append", 1, False)


@pytest.mark.parametrize(
    "d,message",
    [
        ({"hidden_size": 8}, "no beacon_\\* keys"),
        ({"beacon_window": 32, "beacon_frobnicate": 1, "beacon_param": []}, "unknown beacon config keys"),
        ({"beacon_window": 32, "retrieval_method": "bm25", "beacon_param": ["q"]}, "experimental mode"),
        ({"beacon_window": 32, "beacon_parallel_window": 2, "beacon_param": ["q"]}, "experimental mode"),
        ({"beacon_window": 32, "beacon_stride": [16, 32]}, "only a single stride"),
        ({"beacon_window": 32, "beacon_pos": "interleave"}, "no beacon_param"),
    ],
)
def test_from_dict_errors(d, message):
    with pytest.raises(ValueError, match=message):
        BeaconConfig.from_dict(d)


V3_SAVED = {"beacon_window": 512, "beacon_stride": 512, "beacon_ratio": [32], "beacon_param": ["q", "k", "v"]}
V2_SAVED = {"beacon_window": 32, "beacon_stride": [32], "beacon_ratio": [2], "beacon_attend_previous": True}
V2_SHORT_STRIDE = {**V2_SAVED, "beacon_stride": [16]}


@pytest.mark.parametrize(
    ("saved", "overrides", "era", "window", "stride"),
    [
        (V3_SAVED, {"beacon_window": 1024}, "v3", 1024, 1024),  # a stride equal to the window follows it
        (V3_SAVED, {"beacon_window": 256}, "v3", 256, 256),
        (V2_SAVED, {"beacon_window": 64}, "v2", 64, 64),
        ({k: v for k, v in V2_SAVED.items() if k != "beacon_attend_previous"}, {"beacon_window": 64}, "v2", 64, 64),
        (V2_SHORT_STRIDE, {"beacon_window": 64}, "v2", 64, 16),  # a stride chosen below the window stays
        (V3_SAVED, {"beacon_window": 1024, "beacon_stride": 1024}, "v3", 1024, 1024),
        (V3_SAVED, {"beacon_ratio": [8]}, "v3", 512, 512),
    ],
)
def test_a_new_window_takes_a_stride_equal_to_the_saved_window_along(saved, overrides, era, window, stride):
    config = BeaconConfig.from_dict(saved, **overrides)
    assert (config.era, config.window, config.stride) == (era, window, stride)
