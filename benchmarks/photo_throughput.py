"""Photos/s end to end through ``facegender predict DIR``: decode, detect, crop, classify, write the rows.

Builds two folders of JPEG photos from the corpora (in a temporary folder, deleted afterwards):
single-face 250x250 photos made from CelebA's loose head-and-shoulder crops, and 640x480 photos with three
faces each (SCUT-FBP5500 portraits pasted at 150-190 px onto a blurred, enlarged CelebA photo). Each
folder goes through the command's own code (``facegender.cli.main``), once as it ships and once the way
it worked before (always searching small images at double size, detection in the main thread), side by
side in one run. The model's start-up is timed separately and left out of the rate. No arguments needed:
    python benchmarks/photo_throughput.py [--photos 300] [--composites 60] [--backend auto|torch|onnxruntime]
"""
from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageFilter

from common import SHARED
from facegender import inference
from facegender.cli import main as facegender
from facegender.detect import FaceDetector
from facegender.inference import Classifier


def single_face_photos(folder: Path, n: int) -> None:
    loose = sorted(p for p in (SHARED / "celeba" / "img").glob("*.jpg") if not p.name.startswith("0"))
    for i, path in enumerate(random.Random(0).sample(loose, min(n, len(loose)))):
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image.crop((left, top, left + side, top + side)).resize((250, 250), Image.BICUBIC).save(
            folder / f"{i:04d}.jpg", quality=90)


def multi_face_photos(folder: Path, n: int) -> None:
    rng = random.Random(1)
    portraits = sorted((SHARED / "scut_fbp5500" / "img").glob("*.jpg"))
    backgrounds = sorted((SHARED / "celeba" / "img").glob("1*.jpg"))
    for i in range(n):
        canvas = Image.open(rng.choice(backgrounds)).convert("RGB").resize((640, 480)).filter(ImageFilter.GaussianBlur(12))
        for x, size in ((20, 150), (230, 190), (450, 170)):
            face = Image.open(rng.choice(portraits)).convert("RGB").resize((size, size), Image.BICUBIC)
            canvas.paste(face, (x, rng.randint(20, 480 - size - 20)))
        canvas.save(folder / f"{i:04d}.jpg", quality=90)


@contextlib.contextmanager
def as_before():
    """The prediction path before this work: doubled search on every small image, detection in the main thread."""
    original_detector, original_map = inference.FaceDetector, inference._ordered_map
    inference.FaceDetector = lambda: FaceDetector(always_upsample=True)
    inference._ordered_map = lambda fn, items, workers, **_: original_map(fn, items, 0, ahead=1)
    try:
        yield
    finally:
        inference.FaceDetector, inference._ordered_map = original_detector, original_map


def photos_per_second(folder: Path, out: Path, backend: str, startup: float, model: str) -> tuple[float, int]:
    start = time.perf_counter()
    facegender(["predict", str(folder), "--output", str(out), "--backend", backend, "--model", model])
    seconds = time.perf_counter() - start - startup
    rows = out.read_text().count("\n")
    return len(list(folder.iterdir())) / seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300, help="single-face 250 px photos")
    parser.add_argument("--composites", type=int, default=60, help="three-face 640x480 photos")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                        help="as predict --backend (default auto: onnxruntime for the descriptor model)")
    parser.add_argument("--models", default="descriptor,resnet18",
                        help="bundled models (or checkpoints), comma-separated; the first is also timed as before")
    args = parser.parse_args()
    if not (SHARED / "celeba").is_dir() or not (SHARED / "scut_fbp5500").is_dir():
        raise SystemExit(f"benchmark: needs CelebA and SCUT-FBP5500 under {SHARED}")
    with tempfile.TemporaryDirectory(prefix="facegender-photos-") as tmp:
        root = Path(tmp)
        sets = {"single-face 250 px": root / "single", "multi-face 640x480": root / "multi"}
        for folder in sets.values():
            folder.mkdir()
        single_face_photos(sets["single-face 250 px"], args.photos)
        multi_face_photos(sets["multi-face 640x480"], args.composites)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        rates = {}
        for model in models:
            first = next(next(iter(sets.values())).iterdir())
            Classifier.from_checkpoint(model, backend=args.backend).predict([first])  # fills one-time caches
            start = time.perf_counter()
            Classifier.from_checkpoint(model, backend=args.backend).predict([first])
            startup = time.perf_counter() - start
            print(f"{model}: start-up {startup:.1f} s ({args.backend}), left out of the rates below", flush=True)
            for name, folder in sets.items():
                before = None
                if model == models[0]:
                    with as_before():
                        before, _ = photos_per_second(folder, root / "before.jsonl", args.backend, startup, model)
                now, rows = photos_per_second(folder, root / "now.jsonl", args.backend, startup, model)
                rates.setdefault(model, {})[name] = now
                print(f"  {name:20s} {len(list(folder.iterdir())):4d} photos, {rows:4d} rows: {now:6.1f} photos/s"
                      + (f" (before: {before:6.1f} photos/s, {now / before:.2f}x)" if before else ""), flush=True)
        if len(models) > 1:
            for name in sets:
                print(f"{name}: " + ", ".join(f"{m} {rates[m][name]:.1f}" for m in models) + " photos/s")
        rates = rates[models[0]]
    print(f"photos: {rates['single-face 250 px']:.0f} photos/s single-face 250 px, "
          f"{rates['multi-face 640x480']:.0f} photos/s multi-face 640x480")


if __name__ == "__main__":
    main()
