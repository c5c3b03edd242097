"""Training images/s of the reference pipeline and of the default (fast) one, side by side, in one run.

Both train the same ResNet18 on the same N real UTKFace images; each is timed at steady state, after a
warm-up (DataLoader workers started, caches built, kernels chosen). On a GPU the default pipeline keeps
the uint8 cache and the augmentation there. Usage:
    python benchmarks/train_throughput.py --images 2000 --seconds 30
    python benchmarks/train_throughput.py --batch-sizes 64,128,256,512 --deterministic   # the curve; the cost of --deterministic
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from common import matmul_tflops, utkface_samples
from facegender.config import load_config
from facegender.train import Batches, new_run, train_step
from facegender.runtime import grad_scaler, resolve_device, resolve_precision

TRAIN_GFLOP = 3.6  # ResNet18 at 128 px, forward + backward, per image


def measure(pipeline: str, precision: str, samples, seconds: float, warmup_batches: int, compile_: bool = False,
            batch_size: int = 64, deterministic: bool = False) -> dict:
    config = load_config(weights="none", pipeline=pipeline, precision=precision, compile=compile_, epochs=1000,
                         batch_size=batch_size, deterministic=deterministic)
    run = new_run(config, [], None)
    started = time.perf_counter()
    batches = Batches(run, {"train": samples, "val": samples[:1], "test": samples[:1]})
    setup = time.perf_counter() - started
    loss_fn, scaler = nn.BCEWithLogitsLoss(), grad_scaler(run.device, run.precision)
    run.model.train()
    seen, step, t0 = 0, 0, None
    while True:
        for x, y, _ in batches("train", train=True):
            train_step(run, x, y, loss_fn, scaler)
            step += 1
            if step == warmup_batches:
                t0 = time.perf_counter()
            elif step > warmup_batches:
                seen += len(y)
                if time.perf_counter() - t0 >= seconds:
                    rate = seen / (time.perf_counter() - t0)
                    return {"pipeline": pipeline, "precision": run.precision, "images_per_s": rate,
                            "setup_s": setup, "compile": compile_, "batch": batch_size,
                            "deterministic": deterministic, "device": str(run.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="real UTKFace training images to cycle through")
    parser.add_argument("--seconds", type=float, default=30, help="timed seconds per pipeline, after warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--compile", action="store_true", help="also measure the fast pipeline under torch.compile")
    parser.add_argument("--batch-sizes", default="64",
                        help="comma-separated batch sizes for the default pipeline (the first one is compared)")
    parser.add_argument("--deterministic", action="store_true",
                        help="also measure the default pipeline with --deterministic (its cost in speed)")
    args = parser.parse_args()
    _, samples = utkface_samples(args.images)
    device = resolve_device("auto")
    # the ceiling in the precision the default pipeline trains in: fp32 on a CPU without native bf16
    precision = resolve_precision("auto", device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    peak = matmul_tflops(dtypes[precision], device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{len(samples)} images, torch {torch.__version__}, {name}; {precision} matmul peak on {device.type} "
          f"{peak:.2f} TFLOP/s = {peak * 1e3 / TRAIN_GFLOP:.0f} img/s training ceiling", flush=True)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    sides = [("reference", "fp32", False, sizes[0], False), ("fast", "auto", False, sizes[0], False)]
    sides += [("fast", "auto", True, sizes[0], False)] if args.compile else []
    sides += [("fast", "auto", False, sizes[0], True)] if args.deterministic else []
    sides += [("fast", "auto", False, b, False) for b in sizes[1:]]
    results = []
    for pipeline, precision, compile_, batch, deterministic in sides:
        r = measure(pipeline, precision, samples, args.seconds, args.warmup, compile_, batch, deterministic)
        results.append(r)
        print(f"{pipeline:9s} {r['precision']:4s} batch {batch:4d} compile={compile_!s:5s} "
              f"deterministic={deterministic!s:5s} {r['images_per_s']:8.1f} img/s  (set-up {r['setup_s']:.1f} s, "
              f"{r['images_per_s'] / (peak * 1e3 / TRAIN_GFLOP):.0%} of the ceiling)", flush=True)
    ref, fast = results[0]["images_per_s"], results[1]["images_per_s"]
    print(f"train speedup: {fast / ref:.2f} x (reference {ref:.0f} img/s, default {fast:.0f} img/s at batch {sizes[0]})")
    for r in results[2:]:
        what = "compile" if r["compile"] else "deterministic" if r["deterministic"] else f"batch {r['batch']}"
        print(f"  {what}: {r['images_per_s'] / fast:.2f} x the default")


if __name__ == "__main__":
    main()
