"""Each benchmark script's fast mode runs once (a smoke test, not a timing test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


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


def test_flop_model_of_the_beacon_overhead():
    """The efficiency script's FLOP model: W/ratio extra rows bound the ratio; a larger memory lowers it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("efficiency", ROOT / "benchmarks" / "efficiency.py")
    eff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eff)
    dims = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16}
    no_memory = eff.flop_ratio(dims, 4096, 512, 8, 0)
    assert 0.8 < no_memory < 512 / 576
    assert eff.flop_ratio(dims, 4096, 512, 8, 512) < no_memory
    assert eff.flop_ratio(dims, 4096, 512, 32, 0) > no_memory
