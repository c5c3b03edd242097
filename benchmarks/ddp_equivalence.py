"""Does training on 2 processes reach the accuracy of 1 process? The 1-point target, on real faces.

Trains the recipe (Adam, dropout, augmentation, the configured precision) on the same N real UTKFace
training images with the same seed twice, side by side in one run: once as one process
(``facegender train``) and once as two (``torchrun --nproc-per-node 2 -m facegender.cli train``), with the
same global batch. Batch norm is synchronised across the processes, so the two runs differ only in dropout
masks and in float rounding; over many steps those still send them along different paths, as a different
seed would. So the run also trains one process with a second seed (``--spread``): the gap between two
seeds is the yardstick for the gap between one and two processes. Prints each run's validation and test
accuracy, the gaps in points, and whether the 2-process run is within the target (1 point of test
accuracy). Usage:
    python benchmarks/ddp_equivalence.py --images 3000 --epochs 4
    python benchmarks/ddp_equivalence.py --images 3000 --epochs 4 --spread   # also a second seed, 1 process
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import utkface_samples

TARGET_POINTS = 1.0


def train(launcher: list[str], data: Path, out: Path, args, seed: int, threads: int) -> dict:
    """One run of ``facegender train`` under ``launcher``; its metrics, best epoch and wall time."""
    command = [*launcher, "train", "--data", str(data), "--out", str(out), "--weights", args.weights,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(seed),
               "--max-train-images", str(args.images)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    best = json.loads((out / "best.json").read_text())
    return {"test_acc": metrics["accuracy"], "val_acc": best["val_acc"], "best_epoch": best["epoch"],
            "count": metrics["count"], "seconds": seconds, "precision": metrics["run"]["precision"],
            "world_size": best["world_size"]}


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.+)", info).group(1).strip()
        return name + (" (AVX-512 bf16)" if "avx512_bf16" in info else " (AVX2)" if "avx2" in info else "")
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="real UTKFace training images (default 3000)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch, both runs (default 64)")
    parser.add_argument("--weights", default="none", help="none (default: no download), imagenet or a file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", action="store_true", help="also train 1 process with seed + 1: the yardstick")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    data, _ = utkface_samples(0)
    cores = os.cpu_count() or 1
    single = [sys.executable, "-m", "facegender.cli"]
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "facegender.cli"]
    print(f"{cpu_name()}, {cores} cores; {args.images} UTKFace training images, "
          f"{args.epochs} epochs, global batch {args.batch_size}, weights {args.weights}, seed {args.seed}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        runs = {"1 process": train(single, data, root / "one", args, args.seed, cores),
                "2 processes": train(double, data, root / "two", args, args.seed, max(cores // 2, 1))}
        if args.spread:
            runs[f"1 process, seed {args.seed + 1}"] = train(single, data, root / "seed", args, args.seed + 1, cores)

    print(f"\n{'run':<22} {'val acc':>8} {'test acc':>9} {'best epoch':>11} {'precision':>10} {'minutes':>8}")
    for name, r in runs.items():
        print(f"{name:<22} {r['val_acc']:>8.2%} {r['test_acc']:>9.2%} {r['best_epoch']:>11} {r['precision']:>10} "
              f"{r['seconds'] / 60:>8.1f}")
    one, two = runs["1 process"], runs["2 processes"]
    gap = 100 * (two["test_acc"] - one["test_acc"])
    print(f"\n2 processes - 1 process: test {gap:+.2f} points, validation {100 * (two['val_acc'] - one['val_acc']):+.2f} "
          f"points ({one['count']} test images: one image is {100 / one['count']:.3f} points)")
    if args.spread:
        other = runs[f"1 process, seed {args.seed + 1}"]
        print(f"seed {args.seed + 1} - seed {args.seed}, 1 process: test {100 * (other['test_acc'] - one['test_acc']):+.2f} "
              f"points (the gap that chance alone makes)")
    print(f"target: within {TARGET_POINTS:.0f} point of test accuracy: {'met' if abs(gap) <= TARGET_POINTS else 'NOT met'}")


if __name__ == "__main__":
    main()
