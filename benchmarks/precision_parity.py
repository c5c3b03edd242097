"""Accuracy must not pay for speed: the same seed and split trained in fp32 and in the default precision.

Trains twice on prepared UTKFace (same seed, same subset, same epochs), once with --precision fp32 and
once with the default (bf16 where the CPU has it), and prints both validation accuracies per epoch.
Usage:
    python benchmarks/precision_parity.py --images 4000 --epochs 3
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from common import utkface_samples
from facegender.config import load_config
from facegender.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="training images (a seeded subset of the split)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", help="keep the two runs here (default: a temporary folder)")
    args = parser.parse_args()
    prepared, _ = utkface_samples(0)
    root = Path(args.out or tempfile.mkdtemp(prefix="parity-"))
    results = {}
    for precision in ("fp32", "auto"):
        config = load_config(weights="none", precision=precision, epochs=args.epochs, max_train_images=args.images,
                             early_stopping_patience=args.epochs)
        run = root / precision
        metrics = train(config, [str(prepared)], run, log=lambda *_: None)
        with open(run / "metrics.csv") as f:
            history = list(csv.DictReader(f))
        results[precision] = history
        print(f"{precision:4s} ({metrics['run']['precision']}): val acc per epoch "
              + " ".join(f"{float(r['val_acc']):.4f}" for r in history)
              + f"  | {float(history[-1]['images_per_s']):.0f} img/s", flush=True)
    # training keeps the epoch of lowest validation loss: that is the model each precision hands over
    best = {p: min(h, key=lambda r: float(r["val_loss"])) for p, h in results.items()}
    a, b = (float(best[p]["val_acc"]) for p in ("fp32", "auto"))
    last_a, last_b = (float(results[p][-1]["val_acc"]) for p in ("fp32", "auto"))
    print(f"precision parity: best epoch (by validation loss) fp32 {a:.2%} (epoch {best['fp32']['epoch']}) vs "
          f"default {b:.2%} (epoch {best['auto']['epoch']}), difference {abs(a - b) * 100:.2f} points; "
          f"last epoch {last_a:.2%} vs {last_b:.2%}, difference {abs(last_a - last_b) * 100:.2f} points")


if __name__ == "__main__":
    main()
