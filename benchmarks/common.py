"""Shared set-up for the benchmarks: real UTKFace images, prepared once into data/utkface."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def utkface_samples(n: int, prepared: Path = ROOT / "data" / "utkface", split: str = "train"):
    from facegender.data import load_samples, prepare_utkface

    if not (prepared / "manifest.csv").is_file():
        src = SHARED / "utkface"
        if not src.is_dir():
            sys.exit(f"benchmark: no prepared data at {prepared} and no UTKFace at {src}; run `make demo` first")
        print(f"preparing {src} -> {prepared}", flush=True)
        prepare_utkface(src, prepared)
    samples = load_samples(prepared, split)
    return prepared, samples[:n]


def matmul_tflops(dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """This machine's dense matrix-multiply rate: the ceiling any convolution network can approach."""
    import time

    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12
