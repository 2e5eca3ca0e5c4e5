"""The machine a benchmark ran on, as its report states it."""

from __future__ import annotations

from pathlib import Path

# The instructions the CPU runtimes' speed turns on (int8 dot products, bfloat16, AMX tiles).
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
    """The CPU's name and which of SHOWN_FLAGS it has."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines()[:40] if cpuinfo.is_file() else []
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in pairs}
    flags = fields.get("flags", "").split()
    shown = [flag for flag in SHOWN_FLAGS if flag in flags]
    return f"{fields.get('model name', 'unknown CPU')}: {' '.join(shown) or 'no AVX2'}"
