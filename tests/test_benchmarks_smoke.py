"""Each benchmark script's fast mode runs once (a smoke test, not a timing test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))  # _*.py: helpers


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_fast_mode(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--fast", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())


def _benchmark_module(name, monkeypatch):
    """Import ``benchmarks/<name>.py`` as the scripts run (their folder on the path, for ``_results``)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_file_written_atomically(tmp_path, monkeypatch):
    """write_json creates folders, replaces an existing file whole and leaves no temporary file behind."""
    results = _benchmark_module("_results", monkeypatch)
    out = tmp_path / "a" / "b.json"
    results.write_json(out, {"rows": [1, 2]})
    results.write_json(out, {"rows": [3]})
    assert json.loads(out.read_text()) == {"rows": [3]}
    assert [p.name for p in out.parent.iterdir()] == ["b.json"]
    with pytest.raises(TypeError):
        results.write_json(out, {"bad": object()})
    assert json.loads(out.read_text()) == {"rows": [3]}  # a failed write keeps the previous file
    assert [p.name for p in out.parent.iterdir()] == ["b.json"]


def test_flop_model_of_the_beacon_overhead(monkeypatch):
    """The efficiency script's FLOP model: W/ratio extra rows bound the ratio; a larger memory lowers it."""

    eff = _benchmark_module("efficiency", monkeypatch)
    dims = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16}
    no_memory = eff.flop_ratio(dims, 4096, 512, 8, 0)
    assert 0.8 < no_memory < 512 / 576
    assert eff.flop_ratio(dims, 4096, 512, 8, 512) < no_memory
    assert eff.flop_ratio(dims, 4096, 512, 32, 0) > no_memory


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        # beacons 1 nat/token better on one span, 1 worse on the other: mean 0, standard error 1, one span won
        ([{"beacons": 100.0, "truncation": 110.0}, {"beacons": 120.0, "truncation": 110.0}],
         {"mean_nats_per_token": 0.0, "standard_error": 1.0, "spans_won": 1, "spans": 2}),
        # the same 0.5 nats/token better on three spans: no spread
        ([{"beacons": 5.0, "truncation": 10.0}] * 3,
         {"mean_nats_per_token": -0.5, "standard_error": 0.0, "spans_won": 3, "spans": 3}),
        # a span without the baseline (a file written before it was measured): no comparison
        ([{"beacons": 5.0, "truncation": 10.0}, {"beacons": 5.0}], None),
    ],
)  # fmt: skip
def test_paired_difference(spans, expected, monkeypatch):
    """perplexity.py compares beacons with a baseline span by span, per scored token (10 tokens per span here)."""
    perplexity = _benchmark_module("perplexity", monkeypatch)
    assert perplexity.paired_difference(spans, "truncation", 10) == expected


def test_paired_against_another_results_file(monkeypatch):
    """Two adapters' files compare cell by cell on the same spans; a cell on other spans is refused, not paired."""
    perplexity = _benchmark_module("perplexity", monkeypatch)

    def row(nlls, starts=(0, 50)):
        spans = [{"start": s, "beacons": v} for s, v in zip(starts, nlls)]
        return {"book": "b", "setting": "default", "context": 100, "target": 10, "nll_sum_per_span": spans}

    mine = [row([5.0, 25.0])]
    perplexity.paired_against(mine, [row([10.0, 20.0])], "other")
    assert mine[0]["paired"]["other"] == {"mean_nats_per_token": 0.0, "standard_error": 0.5, "spans_won": 1,
                                          "spans": 2}  # fmt: skip
    with pytest.raises(ValueError, match="no cell b / default / 100 on the spans"):
        perplexity.paired_against([row([5.0, 25.0])], [row([10.0, 20.0], starts=(0, 60))], "other")


@pytest.mark.parametrize(
    ("control", "beacons", "expected"),
    [
        # the own memory helps by 1 nat on one sample and 0 on the other: mean 0.5, standard error 0.5
        ([3.0, 2.0], [2.0, 2.0], {"mean_nll_diff": 0.5, "standard_error": 0.5, "control_worse": 1, "samples": 2}),
        # the control better everywhere by the same amount: negative, no spread
        ([1.0, 1.0, 1.0], [1.5, 1.5, 1.5],
         {"mean_nll_diff": -0.5, "standard_error": 0.0, "control_worse": 0, "samples": 3}),
        # one sample: no standard error
        ([2.0], [1.0], {"mean_nll_diff": 1.0, "standard_error": None, "control_worse": 1, "samples": 1}),
    ],
)  # fmt: skip
def test_recall_control_paired_with_the_beacons_sample_by_sample(control, beacons, expected, monkeypatch):
    """recall_protocol.py: a control row against the beacons' row on the same samples (control - beacons)."""
    protocol = _benchmark_module("recall_protocol", monkeypatch)
    assert protocol.paired({"value_nll_each": control}, {"value_nll_each": beacons}) == expected
    with pytest.raises(ValueError):  # rows of different samples are not paired
        protocol.paired({"value_nll_each": control + [1.0]}, {"value_nll_each": beacons})


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_swap_value_changes_every_digit_of_the_planted_fact_and_keeps_the_labels(kind, monkeypatch):
    """recall_protocol.py's control: the fact's digits d -> d + 5 mod 10 before ``upto``, the asked value unchanged."""
    import numpy as np

    from beacon_llm.tasks import IGNORE, make_condensed_recall
    from beacon_llm.testing import tiny_tokenizer

    protocol = _benchmark_module("recall_protocol", monkeypatch)
    tok = tiny_tokenizer()
    filler = tok("the lamp was lit at dusk and put out at dawn. " * 40)["input_ids"]
    sample, windows = make_condensed_recall(kind, filler, tok, window=64, windows=2, tail=10, keep_raw=0,
                                            rng=np.random.default_rng(4))  # fmt: skip
    value = tok.decode([t for t in sample.labels if t != IGNORE]).strip()
    upto = windows * 64
    swapped = protocol.swap_value(sample, tok, upto)
    shifted = "".join(str((int(c) + 5) % 10) for c in value)
    before, after = tok.decode(sample.input_ids[:upto]), tok.decode(swapped.input_ids[:upto])
    assert value in before and value not in after and after.count(shifted) == before.count(value) >= 1
    assert swapped.input_ids[upto:] == sample.input_ids[upto:] and swapped.labels == sample.labels
    with pytest.raises(ValueError, match="is not in the first 5 tokens"):
        protocol.swap_value(sample, tok, 5)


def test_gpu_train_takes_the_recipes_that_start_from_the_shipped_adapter(monkeypatch):
    names = _benchmark_module("gpu_train", monkeypatch).gpu_recipes()
    assert {"kl_r32_overlap64_8k", "recall_kl_r32_overlap64", "recall_only_r4_overlap64"} <= set(names)
    # a parent run, gates, another start or another placement need training_ablations.py itself
    assert not {"kl_r32_overlap64_8k_long", "gates_r32_overlap64_8k", "kl_r32_fresh", "ce_r32"} & set(names)


@pytest.mark.parametrize(
    ("recipe", "tasks"), [("recall_kl_r32_overlap64", {"fact"}), ("span_only_r4_overlap64", {"fact", "span"})]
)
def test_gpu_train_recall_recipe_adds_the_recall_protocol(recipe, tasks, tmp_path):
    out = tmp_path / "recall.json"
    cmd = ["benchmarks/gpu_train.py", "--fast", "--threads", "1", "--recipe", recipe, "--out"]
    proc = subprocess.run([sys.executable, *cmd, str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["recipe"] == recipe and data["tokens_this_run"] > 0
    rows = data["recall"]["rows"]
    readings = {row["reading"] for row in rows if row["task"] == "fact"}
    assert {"shipped adapter (the start)", "trained, float32 as trained", "trained, float32 as trained, value swapped",
            "truncation", "tail only", "full attention"} <= readings  # fmt: skip
    assert {row["task"] for row in rows} == tasks
    if "span" in tasks:  # the condensed text itself: no digits to swap
        spans = {row["reading"] for row in rows if row["task"] == "span"}
        assert {"trained, float32 as trained", "trained, float32 as trained, other text", "tail only",
                "full attention"} <= spans  # fmt: skip
        assert not any("swapped" in name for name in spans)
    assert (tmp_path / "recall_adapter" / "beacon_model.safetensors").is_file()


def test_other_text_control_swaps_only_what_the_beacons_alone_hold(monkeypatch):
    """recall_protocol.py's span control: the condensed tokens before the overlap come from the next sample."""
    import numpy as np

    from beacon_llm import BeaconConfig
    from beacon_llm.schedule import condensing_plan
    from beacon_llm.tasks import make_condensed_spans

    protocol = _benchmark_module("recall_protocol", monkeypatch)
    cfg = BeaconConfig(window=32, ratios=(4,), ratio_mix="fit-0", fit_overlap=8)
    samples = []
    for seed in range(3):
        sample, used = make_condensed_spans(list(range(1000, 1400)), window=32, windows=1, tail=5, keep_raw=8,
                                            pairs=2, cue=3, span=4, rng=np.random.default_rng(seed))  # fmt: skip
        samples.append((sample, condensing_plan(cfg, len(sample.input_ids), used, 4)))
    for k, (sample, _) in enumerate(samples):
        swapped = protocol.other_text(samples, k)
        nxt = samples[(k + 1) % 3][0]
        assert swapped.input_ids[:24] == nxt.input_ids[:24] != sample.input_ids[:24]
        assert swapped.input_ids[24:] == sample.input_ids[24:] and swapped.labels == sample.labels
    with pytest.raises(ValueError, match="at least 2 samples"):
        protocol.other_text(samples[:1], 0)
