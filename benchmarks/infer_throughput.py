"""Inference images/s at batch 1 and at a large batch: fp32 eager against the fastest path, in one run.

Real UTKFace faces, decoded once; each timing covers normalisation and the model (what
``Classifier.logits`` does for every batch), after a warm-up. Usage:
    python benchmarks/infer_throughput.py --images 512 --seconds 10
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import matmul_tflops, utkface_samples
from facegender.images import load_faces
from facegender.inference import Classifier
from facegender.model import build_model

FORWARD_GFLOP = 1.19  # ResNet18 at 128 px: 0.595 G multiply-adds per image


def rate(clf: Classifier, faces: np.ndarray, batch: int, seconds: float) -> float:
    batches = [torch.from_numpy(faces[i:i + batch]) for i in range(0, len(faces) - batch + 1, batch)]
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
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=10, help="timed seconds per configuration")
    parser.add_argument("--batch", type=int, default=256, help="the large batch size")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile on the fastest precision")
    args = parser.parse_args()
    _, samples = utkface_samples(args.images, split="test")
    faces, _ = load_faces([(s.path, None) for s in samples], 128, workers=2)
    meta = {"classes": ["female", "male"], "preprocessing": {"image_size": 128}, "threshold": 0.5}
    model = build_model("none")
    fastest = "bf16" if Classifier(model, meta, precision="auto").precision == "bf16" else "fp32"
    peak = matmul_tflops(torch.bfloat16 if fastest == "bf16" else torch.float32)
    print(f"{len(faces)} faces, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{fastest} matmul peak {peak:.2f} TFLOP/s = {peak * 1e3 / FORWARD_GFLOP:.0f} img/s forward ceiling", flush=True)
    results = {}
    configs = [("fp32", False), (fastest, False)] + ([(fastest, True)] if args.compile else [])
    for precision, compile_ in configs:
        clf = Classifier(build_model("none"), meta, precision=precision)
        if compile_:
            clf.model = torch.compile(clf.model)
        for batch in (1, args.batch):
            r = rate(clf, faces, batch, args.seconds)
            results[(precision, compile_, batch)] = r
            print(f"{precision:4s} compile={compile_!s:5s} batch {batch:4d}: {r:7.1f} img/s", flush=True)
    best = max((k for k in results if k[2] == args.batch), key=results.get)
    best1 = max((k for k in results if k[2] == 1), key=results.get)
    print(f"inference: {results[best]:.0f} img/s batched, {results[best1]:.0f} img/s batch-1 "
          f"(fp32 eager {results[('fp32', False, args.batch)]:.0f} img/s)")


if __name__ == "__main__":
    main()
