"""benchmarks/gpu_train.py's argument handling (audit): checked before the data-parallel processes start."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gpu_train(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "benchmarks" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(monkeypatch, tmp_path, *flags):
    """Run main() with ``flags`` up to the start of the processes; returns the arguments they would get."""
    module = _gpu_train(monkeypatch)
    started = []
    monkeypatch.setattr(module.torch.multiprocessing, "start_processes",
                        lambda fn, args, nprocs, start_method: started.append(args))  # fmt: skip
    out = tmp_path / "gpu_train.json"
    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--fast", "--device", "cpu", "--out", str(out), *flags])
    module.main()
    return started[0][1]


def test_no_warmup_is_accepted(monkeypatch, tmp_path):
    """--warmup 0 (the paper's schedule: no warmup; FitTrainConfig takes it) used to be refused as "must be >= 1"."""
    assert _main(monkeypatch, tmp_path, "--warmup", "0").warmup == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--warmup", "-1"], r"--warmup=-1 must be >= 0 \(0: no warmup\)"),
        (["--lr", "nan"], r"--lr=nan must be a finite number > 0"),
        (["--lr", "0"], r"--lr=0.0 must be a finite number > 0"),
        (["--procs", "0"], r"--procs=0 must be >= 1"),
    ],
)
def test_bad_values_are_refused_before_the_processes_start(monkeypatch, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        _main(monkeypatch, tmp_path, *flags)
