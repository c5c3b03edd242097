"""What this machine's CPU computes float32 with, for the choices that depend on it: which runtime runs the
descriptor network (``mnn_runtime``), which BlazeFace graph onnxruntime runs (``blazeface``)."""
from __future__ import annotations

import functools
import platform


@functools.cache
def x86_without_avx512() -> bool:
    """An x86-64 CPU with AVX2 and without AVX-512 (8 floats a vector, not 16), as Linux reports it; False
    where that cannot be read (not Linux: no measurement to go by)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and "avx2" in flags and "avx512f" not in flags
