"""Native-scale detection first against the doubled search everywhere: same faces, same crops, same answers?

On ``--images`` labelled images of each corpus (UTKFace chips, CelebA loose crops, SCUT-FBP5500
portraits; all under 400 px, where the two strategies differ), side by side in one run: the share of
images with a face, ms per image, how much the canonical crops of the largest face overlap (IoU), and
the bundled model's accuracy on each strategy's crops. Usage:
    python benchmarks/upsample_study.py [--images 300]
"""
from __future__ import annotations

import argparse
import csv
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image

from common import SHARED
from facegender.detect import FaceDetector, detect_faces
from facegender.images import face_array
from facegender.inference import Classifier


def labelled(n: int) -> dict[str, list[tuple[Image.Image, int]]]:
    """label 1 = male, as the model's P(male)."""
    rng = random.Random(0)
    utk = rng.sample(sorted((SHARED / "utkface").glob("*.jpg")), n)
    attr = (SHARED / "celeba" / "list_attr_celeba.txt").read_text().splitlines()
    column = attr[1].split().index("Male") + 1
    celeba = {line.split()[0]: int(line.split()[column] == "1") for line in attr[2:]}
    loose = rng.sample(sorted(k for k in celeba if not k.startswith("0")), n)
    with open(SHARED / "scut_fbp5500" / "labels.csv") as f:
        scut = rng.sample([(r["file"], int(r["gender"] == "male")) for r in csv.DictReader(f)], n)
    load = lambda p: Image.open(p).convert("RGB")  # noqa: E731
    return {
        "utkface 200x200": [(load(p), int(p.name.split("_")[1] == "0")) for p in utk],
        "celeba loose": [(load(SHARED / "celeba" / "img" / k), celeba[k]) for k in loose],
        "scut 144x144": [(load(SHARED / "scut_fbp5500" / "img" / k), y) for k, y in scut],
    }


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images per corpus")
    args = parser.parse_args()
    clf = Classifier.from_checkpoint("resnet18", precision="fp32", detect=False)
    strategies = {"doubled always": FaceDetector(always_upsample=True), "native first": FaceDetector()}
    print(f"{'corpus':18} {'strategy':15} {'found':>6} {'ms/img':>7} {'accuracy':>8}   crops IoU median / 5th pct")
    for corpus, items in labelled(args.images).items():
        for detector in strategies.values():
            detector.detect(items[0][0])  # load the models outside the timing
        seconds = dict.fromkeys(strategies, 0.0)
        crops: dict[str, list] = {name: [] for name in strategies}
        for image, _ in items:  # interleaved, so both strategies see the same machine load
            for name, detector in strategies.items():
                start = time.perf_counter()
                found = detect_faces(image, detector)
                seconds[name] += time.perf_counter() - start
                crops[name].append(found[0][1] if found else None)
        overlaps = [iou(a, b) for a, b in zip(*crops.values()) if a and b]
        for name in strategies:
            # where no face is found the whole image is used, as `prepare` does
            arrays = np.stack([face_array(image, box, clf.model.size) for (image, _), box in zip(items, crops[name])])
            p = clf.probabilities(clf.logits(torch.from_numpy(arrays)))
            accuracy = float(np.mean((p >= 0.5) == np.array([y for _, y in items])))
            found = sum(b is not None for b in crops[name]) / len(items)
            print(f"{corpus:18} {name:15} {found:6.1%} {1000 * seconds[name] / len(items):7.1f} {accuracy:8.2%}   "
                  f"{statistics.median(overlaps):.3f} / {np.percentile(overlaps, 5):.3f}", flush=True)


if __name__ == "__main__":
    main()
