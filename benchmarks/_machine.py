"""The machine a benchmark ran on, recorded in its results file: CPU model, the flags that decide the kernels
(native bf16, AMX), threads and versions. Results measured on different CPUs are kept in different files."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
# instruction-set limits given to torch / MKL / oneDNN (e.g. to emulate an AVX2-only CPU)
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (``/proc/cpuinfo``, else ``lscpu``)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if not name or not flags:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and not name:
                name = value.strip()
            elif key.strip() == "Flags" and not flags:
                flags = set(value.split())
    return name or platform.processor() or "unknown", flags


def native_bf16(flags: set[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def machine_info(threads: int) -> dict[str, Any]:
    name, flags = cpu_info()
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {
        "cpu": name,
        "flags": {f: f in flags for f in CPU_FLAGS},
        "native_bf16": native_bf16(flags),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch_version,
        "python": platform.python_version(),
        # instruction-set limits given to torch / MKL / oneDNN (e.g. to emulate an AVX2-only CPU); empty: none
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
    }
