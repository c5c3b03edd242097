"""Pack prepared face crops into a small split-folder dataset that travels where ../shared/data does not.

benchmarks/gpu_check.sh trains and infers on it (FACEGENDER_BENCH_DATA); any command that takes a dataset
reads it too (train/val/test x female/male class folders of 128 px JPEG crops). Usage:
    python benchmarks/pack_crops.py --out gpu-check-data --train 3000 --test 512
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from common import ROOT, utkface_samples
from facegender.config import CLASSES
from facegender.images import load_faces
from facegender.io import atomic_path

LIMIT_MB = 50


def pack(samples, out: Path, split: str, size: int, quality: int) -> int:
    faces, bad = load_faces([(s.path, s.box) for s in samples], size, workers=2)
    skipped = {i for i, _ in bad}
    written = 0
    for i, (sample, face) in enumerate(zip(samples, faces)):
        if i in skipped:
            continue
        target = out / split / CLASSES[sample.label] / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.fromarray(face).save(tmp, format="JPEG", quality=quality)
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check-data")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "utkface",
                        help="a prepared UTKFace folder (made from ../shared/data/utkface when absent)")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"pack_crops: {args.out} is not empty; remove it or choose another --out")
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        _, samples = utkface_samples(n, args.prepared, split)
        print(f"{split}: {pack(samples, args.out, split, args.size, args.quality)} crops", flush=True)
    mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    print(f"{args.out}: {mb:.1f} MiB")
    if mb > LIMIT_MB:
        sys.exit(f"pack_crops: {mb:.1f} MiB is over {LIMIT_MB} MiB; pack fewer images or a lower --quality")


if __name__ == "__main__":
    main()
