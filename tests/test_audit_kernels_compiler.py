"""The compiler of the native kernels (``beacon_llm.native_kernels``): ``$CC`` with a wrapper or flags (``ccache gcc``,
``gcc -march=...``) is used as given, not passed over for ``cc``; a ``$CC`` whose program is missing says so."""

import logging
import shutil

import pytest

from beacon_llm import native_kernels

needs_native = pytest.mark.skipif(
    native_kernels.unavailable() is not None, reason=f"native bf16 kernels: {native_kernels.unavailable()}"
)
GCC = shutil.which("gcc")


@needs_native
@pytest.mark.skipif(GCC is None, reason="no gcc on the path")
def test_cc_with_arguments_builds_with_them(monkeypatch, tmp_path):
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path))  # a fresh kernel folder: built here
    monkeypatch.setenv("CC", f"{GCC} -DBEACON_AUDIT_FLAG=1")
    commands = []
    run = native_kernels._run

    def recorded(command):
        commands.append(command)
        run(command)

    monkeypatch.setattr(native_kernels, "_run", recorded)
    kernel = native_kernels.kernels()
    assert kernel is not None and kernel.path.is_relative_to(tmp_path / "kernels")
    assert len(commands) == len(native_kernels.SOURCES) + 1  # each source compiled, then linked
    assert all(c[:2] == [GCC, "-DBEACON_AUDIT_FLAG=1"] for c in commands)


def test_a_cc_whose_program_is_missing_is_named_and_passed_over(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc") + " -O2")
    with caplog.at_level(logging.WARNING, logger=native_kernels.__name__):
        try:
            compiler = native_kernels._compiler()
        except RuntimeError as exc:  # neither cc nor gcc here either
            assert "no C compiler found" in str(exc)
        else:
            assert compiler[0] == shutil.which("cc") or compiler[0] == shutil.which("gcc")
    assert "no-such-cc" in caplog.text and "not on the path" in caplog.text


def test_a_cc_that_is_not_a_command_is_refused_with_it(monkeypatch):
    monkeypatch.setenv("CC", 'gcc "-O2')
    with pytest.raises(RuntimeError, match=r"CC='gcc \"-O2' is not a command"):
        native_kernels._compiler()
