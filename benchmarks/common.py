"""Shared set-up for the benchmarks: real UTKFace images, prepared once into data/utkface."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def utkface_samples(n: int, prepared: Path = ROOT / "data" / "utkface", split: str = "train"):
    """The first n samples of a split of prepared UTKFace; $FACEGENDER_BENCH_DATA names another prepared
    dataset instead (the packed crops of benchmarks/pack_crops.py on a machine without ../shared/data)."""
    from facegender.data import load_samples, prepare_utkface

    if os.environ.get("FACEGENDER_BENCH_DATA"):
        prepared = Path(os.environ["FACEGENDER_BENCH_DATA"])
    elif not (prepared / "manifest.csv").is_file():
        src = SHARED / "utkface"
        if not src.is_dir():
            sys.exit(f"benchmark: no prepared data at {prepared} and no UTKFace at {src}; run `make demo` first")
        print(f"preparing {src} -> {prepared}", flush=True)
        prepare_utkface(src, prepared)
    samples = load_samples(prepared, split)
    return prepared, samples[:n]


def matmul_tflops(dtype, n: int | None = None, seconds: float = 2.0, device=None) -> float:
    """The dense matrix-multiply rate of the device the model runs on (by default the one ``--device auto``
    picks: the GPU where there is one): the ceiling any convolution network can approach."""
    import time

    import torch

    from facegender.runtime import resolve_device

    device = resolve_device("auto") if device is None else torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)  # a GPU needs large products to reach its peak
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10 if device.type == "cuda" else 1):  # queue several: a GPU runs them back to back
            a @ b
            count += 1
        sync()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def batch_rate(run, chips, batch: int, seconds: float) -> tuple[float, float]:
    """``run`` on batches of ``batch`` chips for ``seconds`` after one warm-up call: (faces per wall-clock
    second, CPU milliseconds per face summed over the process's threads)."""
    import time

    batches = [chips[i:i + batch] for i in range(0, len(chips) - batch + 1, batch)]
    run(batches[0])  # warm-up
    seen, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for b in batches:
            run(b)
            seen += len(b)
            if time.perf_counter() - start >= seconds:
                break
    return seen / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / seen
