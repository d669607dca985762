"""Command-line values that gave tracebacks or were silently ignored, and benchmark plots written in place."""

import json
import sys
from pathlib import Path

import pytest

import beacon_llm
from beacon_llm.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _not_called(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was refused")


@pytest.mark.parametrize("port", ["-1", "65536", "99999", "http"])
def test_serve_port_out_of_range_exits_2_naming_it(port, monkeypatch, capsys):
    monkeypatch.setattr("beacon_llm.serve.load_model", _not_called)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", port])
    assert exit_info.value.code == 2
    assert f"argument --port: '{port}' must be a port number from 0 to 65535" in capsys.readouterr().err


def test_serve_port_0_and_65535_are_ports():
    from beacon_llm.cli import build_parser

    assert build_parser().parse_args(["serve", "--port", "0"]).port == 0
    assert build_parser().parse_args(["serve", "--port", "65535"]).port == 65535


def _train(tiny_dirs, tmp_path, *extra):
    args = ["train", "--model", str(tiny_dirs / "base"), "--data", str(tiny_dirs / "data.txt")]
    args += ["--output-dir", str(tmp_path / "run"), "--steps", "1", "--seq-len", "64", "--grad-accum", "1"]
    return main([*args, "--task-rate", "0", *extra])


@pytest.mark.parametrize("value", ["0", "-1"])
def test_train_stop_after_below_1_is_refused(value, tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(beacon_llm, "from_pretrained", _not_called)
    with pytest.raises(SystemExit) as exit_info:
        _train(tiny_dirs, tmp_path, "--stop-after", value)
    assert exit_info.value.code == 2
    assert f"argument --stop-after: '{value}' must be a whole number >= 1" in capsys.readouterr().err


def test_train_with_only_ratio_0_exits_2_before_the_model_loads(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(beacon_llm, "from_pretrained", _not_called)
    assert _train(tiny_dirs, tmp_path, "--window", "16", "--ratios", "0") == 2
    assert "beacon-llm: error: --ratios 0: training needs a ratio > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("adapter", ["adapter", "adapter_fit"])
def test_train_init_adapter_trains_with_the_given_ratios_drawn_per_window(adapter, tiny_dirs, tmp_path, monkeypatch):
    """An adapter saved with an inference mix (fit-N: a 64-token sample fits, nothing would be condensed) used to
    crash the first backward pass; --ratios next to --init-adapter used to be ignored."""
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path / "home"))
    assert _train(tiny_dirs, tmp_path, "--init-adapter", str(tiny_dirs / adapter), "--ratios", "4") == 0
    config = json.loads((tmp_path / "run" / "final" / "beacon_config.json").read_text())
    assert config["beacon_ratio"] == [4] and config["beacon_ratio_mix"] == "step-random"
    assert config["beacon_window"] == 16  # the adapter's own, not the fresh-beacon default 1024


def test_train_fresh_beacons_keep_the_documented_defaults(tiny_dirs, tmp_path, monkeypatch):
    seen = {}

    def capture(path, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(beacon_llm, "from_pretrained", capture)
    assert _train(tiny_dirs, tmp_path) == 2
    cfg = seen["beacon_config"]
    assert (cfg.window, cfg.ratios, cfg.ratio_mix, cfg.pos, cfg.attn) == (
        1024,
        (2, 4, 8, 16, 32),
        "step-random",
        "interleave",
        "full-coverage",
    )
    assert (cfg.param, cfg.sink_size, cfg.attend_prev) == (("q", "k", "v"), 0, True)


def test_prepare_into_a_folder_that_cannot_be_made_exits_2(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    assert main(["prepare", "--cache-dir", str(blocker / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("beacon-llm: error: cannot prepare the embedded model in ") and str(blocker) in err


@pytest.mark.parametrize(
    "args, message",
    [
        ({"window": "abc"}, "window='abc' must be a whole number"),
        ({"ratio": "8,x"}, "ratio='x' must be a whole number"),
        ({"max_concurrent": "two"}, "max_concurrent='two' must be a whole number"),
        ({"num_cpus": "half"}, "num_cpus='half' must be a number"),
    ],
)
def test_ray_build_app_names_a_bad_value(args, message):
    pytest.importorskip("ray")
    from beacon_llm.serve_ray import build_app

    with pytest.raises(ValueError, match=message):
        build_app(args)


def test_ray_build_app_passes_non_text_beacon_values_as_given(monkeypatch):
    """Only text is converted: a YAML config's 2.5 or 1.5 reaches the beacon config, which refuses it by name,
    instead of being truncated to 2 and 1."""
    pytest.importorskip("ray")
    from beacon_llm import serve_ray

    seen = {}
    monkeypatch.setattr(serve_ray, "application", lambda **kwargs: seen.update(kwargs))
    serve_ray.build_app({"ratio": [8, 2.5], "window": 1.5})
    assert seen["beacon_overrides"] == {"beacon_ratio": [8, 2.5], "beacon_window": 1.5}
    serve_ray.build_app({"ratio": "8,4", "window": "512"})
    assert seen["beacon_overrides"] == {"beacon_ratio": [8, 4], "beacon_window": 512}


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_benchmark_plots_are_written_under_a_temporary_name_and_renamed(benchmarks_on_path, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import plots
    from matplotlib.figure import Figure

    written = []
    real_savefig = Figure.savefig

    def recording_savefig(self, fname, *args, **kwargs):
        written.append(Path(fname))
        return real_savefig(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    png = tmp_path / "efficiency.png"
    plots.plot_efficiency(json.loads((BENCHMARKS / "results" / "efficiency.json").read_text()), png)
    assert png.is_file() and png.read_bytes().startswith(b"\x89PNG")
    assert len(written) == 1 and written[0] != png and written[0].parent == png.parent
    assert written[0].suffix == ".png" and not written[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficiency.png"]


def test_plot_training_needs_its_arguments_and_averages_short_runs(benchmarks_on_path, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import plot_training

    monkeypatch.setattr(sys, "argv", ["plot_training.py"])
    with pytest.raises(SystemExit) as exit_info:
        plot_training.main()
    assert exit_info.value.code == 2
    assert "give the run folder and the PNG to write (or --fast)" in capsys.readouterr().err

    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text(json.dumps([{"step": 1, "loss": 3.0, "tokens": 64}]))
    monkeypatch.setattr(sys, "argv", ["plot_training.py", str(run), str(tmp_path / "loss.png"), "--out", "s.json"])
    monkeypatch.chdir(tmp_path)
    plot_training.main()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["first5"] == summary["last5"] == 3.0  # one step: its own loss, not a fifth of it
    assert (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize(
    ("env", "flag", "expected"),
    [(None, None, "no"), ("bf16", None, "bf16"), ("BF16", None, "bf16"), ("bf16", "no", "no"), (None, "bf16", "bf16")],
)
def test_train_precision_defaults_to_the_launchers(env, flag, expected, tiny_dirs, tmp_path, monkeypatch, capsys):
    """`accelerate launch --config_file ddp.yaml` (mixed_precision: bf16) sets ACCELERATE_MIXED_PRECISION; the CLI's
    own default "no" used to win over it, so the run trained in float32. --mixed-precision still wins."""
    import beacon_llm.training as training

    seen = {}

    def capture(bm, stream, cfg, **kwargs):
        seen["precision"] = cfg.mixed_precision
        raise ValueError("stop here")

    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(training, "train", capture)
    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    precision = ["--mixed-precision", flag] if flag else []
    assert _train(tiny_dirs, tmp_path, "--window", "16", "--ratios", "4", *precision) == 2
    assert "beacon-llm: error: cannot train: stop here" in capsys.readouterr().err
    assert seen["precision"] == expected
