"""Model inference, crops/s at batch 1 and batch 64 (``--batch``), for every backend and precision, side by side in one run.

The bundled models on real UTKFace faces (decoded once into uint8 crops: 128x128 for the ResNet18,
150x150 chips for the descriptor head); each timing covers what ``Classifier.logits`` does for a batch
(normalisation and the forward pass; for the descriptor head, dlib's network in PyTorch and the head),
after a warm-up. Runs: ResNet18 in torch fp32, torch bf16 (on CPUs with native bf16) and onnxruntime fp32
(the graph ``facegender export`` writes), and the default descriptor model (dlib's network and the head)
in torch fp32 and onnxruntime fp32 (``--int8 FILE``: also an int8 graph made by ``export --int8``).
Usage:
    python benchmarks/infer_throughput.py [--images 256] [--seconds 6] [--int8 descriptor-int8.onnx]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import SHARED, matmul_tflops
from facegender.images import load_faces
from facegender.inference import Classifier
from facegender.runtime import cpu_has_bf16

FORWARD_GFLOP = 1.19  # ResNet18 at 128 px: 0.595 G multiply-adds per image


def rate(clf: Classifier, faces: np.ndarray, batch: int, seconds: float) -> float:
    batches = [faces[i:i + batch] for i in range(0, len(faces) - batch + 1, batch)]
    for b in batches[:2]:
        clf.logits(b)
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for b in batches:
            clf.logits(b)
            seen += len(b)
            if time.perf_counter() - start >= seconds:
                break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=6, help="timed seconds per configuration and batch size")
    parser.add_argument("--batch", type=int, default=64, help="the large batch size")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile on the fastest torch precision")
    parser.add_argument("--int8", metavar="ONNX", help="an int8 descriptor graph (facegender export --int8) to time too")
    args = parser.parse_args()
    paths = sorted((SHARED / "utkface").glob("*.jpg"))[::50][:args.images]
    if not paths:
        raise SystemExit(f"benchmark: no UTKFace images at {SHARED / 'utkface'}")
    crops = {size: load_faces([(p, None) for p in paths], size)[0] for size in (128, 150)}
    peak = matmul_tflops(torch.bfloat16 if cpu_has_bf16() else torch.float32)
    print(f"{len(paths)} faces, torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak "
          f"{peak:.2f} TFLOP/s = {peak * 1e3 / FORWARD_GFLOP:.0f} crops/s forward ceiling", flush=True)
    configs = {"torch fp32": dict(precision="fp32")}
    if cpu_has_bf16():
        configs["torch bf16"] = dict(precision="bf16")
    if args.compile:
        configs["torch compiled"] = dict(precision="bf16" if cpu_has_bf16() else "fp32")
    configs["onnxruntime fp32"] = dict(backend="onnxruntime")
    configs["descriptor fp32"] = dict(precision="fp32")
    configs["descriptor ort fp32"] = dict(backend="onnxruntime")
    if args.int8:
        configs["descriptor ort int8"] = dict(backend="onnxruntime", model=args.int8)
    results = {}
    for name, options in configs.items():
        model = options.pop("model", "descriptor" if name.startswith("descriptor") else "resnet18")
        clf = Classifier.from_checkpoint(model, detect=False, **options)
        if name == "torch compiled":
            clf.model.network = torch.compile(clf.model.network)
        for batch in (1, args.batch):
            results[name, batch] = rate(clf, crops[150 if name.startswith("descriptor") else 128], batch, args.seconds)
            print(f"{name:18s} batch {batch:3d}: {results[name, batch]:7.1f} crops/s "
                  f"({1000 / results[name, batch]:6.2f} ms per batch-1 call)" if batch == 1 else
                  f"{name:18s} batch {batch:3d}: {results[name, batch]:7.1f} crops/s", flush=True)
    big = args.batch
    resnets = [n for n in configs if not n.startswith("descriptor")]
    descriptors = [n for n in configs if n.startswith("descriptor")]
    print("descriptor model, x torch fp32: " + ", ".join(
        f"{n} {results[n, 1] / results['descriptor fp32', 1]:.2f}x at batch 1, "
        f"{results[n, big] / results['descriptor fp32', big]:.2f}x at batch {big}" for n in descriptors[1:]))
    best = max(resnets, key=lambda n: results[n, big])
    best1 = max(resnets, key=lambda n: results[n, 1])
    fp32 = results["torch fp32", big]
    fastest = max(descriptors, key=lambda n: results[n, big])
    fastest1 = max(descriptors, key=lambda n: results[n, 1])
    print(f"inference: {results[best, big]:.0f} crops/s at batch {big} ({best}, {results[best, big] / fp32:.2f}x torch fp32), "
          f"batch-1 latency {1000 / results[best1, 1]:.1f} ms ({best1}); descriptor model "
          f"{results[fastest, big]:.0f} faces/s at batch {big} ({fastest}), batch-1 latency "
          f"{1000 / results[fastest1, 1]:.1f} ms ({fastest1})")


if __name__ == "__main__":
    main()
