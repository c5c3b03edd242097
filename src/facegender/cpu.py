"""What this machine's CPU computes float32 with, for the choices that depend on it: which runtime runs the
descriptor network (``descriptor_runtime``), which BlazeFace graph onnxruntime runs (``blazeface``)."""
from __future__ import annotations

import functools
import platform

# /proc/cpuinfo's "cpu family" of AMD's Zen 3 and Zen 4 (Zen 5 is 26): Zen 4 is the first with AVX-512
ZEN_4_FAMILY = 25


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """``first_processor`` of /proc/cpuinfo; empty where this is not an x86-64 CPU or it cannot be read (not
    Linux: no measurement to go by)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return first_processor(f.read())
    except OSError:
        return {}


def first_processor(cpuinfo: str) -> dict[str, str]:
    """The first processor's fields in the text of /proc/cpuinfo: "flags", "vendor_id", "cpu family", ..."""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def _flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def x86_without_avx512() -> bool:
    """An x86-64 CPU with AVX2 and without AVX-512 (8 floats a vector, not 16), as Linux reports it."""
    flags = _flags()
    return "avx2" in flags and "avx512f" not in flags


def avx512_in_halves() -> bool:
    """An AMD Zen 4 CPU with AVX-512, as Linux reports it: it runs each 512-bit instruction as two 256-bit
    halves, so AVX-512 code computes no more a cycle there than AVX2 code."""
    info = _cpuinfo()
    return info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == str(ZEN_4_FAMILY) and "avx512f" in _flags()


def native_bf16() -> bool:
    """An x86-64 CPU that computes bfloat16 dot products itself (AVX-512 BF16, or AMX's tiles), as Linux reports it."""
    return bool({"avx512_bf16", "amx_bf16"} & _flags())
