"""Every notebook runs top to bottom in fast mode (tiny model, small sizes); any cell error fails."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, monkeypatch):
    monkeypatch.setenv("BEACON_NOTEBOOK_FAST", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()


def test_committed_outputs_carry_no_local_paths():
    for path in NOTEBOOKS:
        text = path.read_text()
        for marker in ("/work/", "/root/", "/home/", "/tmp/"):
            assert marker not in text, f"{path.name} output mentions a local path ({marker})"
