"""Does the canonical face crop help? Models trained on whole images and on crops, each tested both ways.

Every model is evaluated on the test split of each framing (the same images: prepared once with
``--no-detect`` and once with detection), overall, per corpus, and on CelebA's loose head-and-shoulder
crops alone (file numbers from 182638), the framing closest to an ordinary photo. What ``facegender
predict`` does with a photo is the "crops" column: it always detects and crops.
Usage:
    python benchmarks/crop_study.py --model raw=runs/all3 --model crops=runs/crops \\
        --framing raw=data/utkface,data/celeba,data/scut_fbp5500 \\
        --framing crops=data-crops/utkface,data-crops/celeba,data-crops/scut_fbp5500
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from facegender.data import load_samples_many
from facegender.inference import Classifier
from facegender.crops import cached_images

CELEBA_LOOSE_FROM = 182638


def named(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


def accuracies(clf: Classifier, data: list[str]) -> dict[str, tuple[float, int]]:
    samples = load_samples_many(data, "test")
    logits, labels, indices = clf.model.dataset_logits(samples)
    correct = (clf.probabilities(logits) >= clf.threshold) == labels.astype(bool)
    kept = [samples[i] for i in indices]
    subsets = {"all": [True] * len(kept)}
    for source in sorted({s.source for s in kept}):
        subsets[source] = [s.source == source for s in kept]
    subsets["celeba loose"] = [s.source == "celeba" and int(Path(s.path).stem) >= CELEBA_LOOSE_FROM for s in kept]
    return {name: (float(correct[np.array(mask)].mean()), int(sum(mask))) for name, mask in subsets.items() if any(mask)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=named, action="append", required=True, help="NAME=RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--framing", type=named, action="append", required=True, help="NAME=DATA[,DATA...]")
    args = parser.parse_args()
    for model_name, path in args.model:
        clf = Classifier.from_checkpoint(path, detect=False)
        for framing, data in args.framing:
            result = accuracies(clf, data.split(","))
            cells = "  ".join(f"{k} {v * 100:.2f}% ({n})" for k, (v, n) in result.items())
            print(f"model {model_name:<8} tested on {framing:<8} {cells}", flush=True)


if __name__ == "__main__":
    main()
