"""Small faces in big photos: what ``--min-face`` finds in 4032 x 3024 group photos, at what cost.

Each photo is a blurred CelebA background at a phone camera's 12 M pixels with 16 SCUT-FBP5500 portraits
pasted in a jittered 4 x 4 grid, faces of 40-120 px (the portrait's side x 0.6), saved as JPEG. For the
default detector and each ``--min-face``, in a child process of its own (so that its peak memory is its
own): the share of faces found (a face's centre inside a pasted portrait), the faces found elsewhere per
photo, ms per photo from the file (decoding, as predict reduces it, and detection with landmarks), and the
process's peak resident memory. ``--untiled`` also runs the smallest ``--min-face`` with every pass whole
(``detect.TILE_SIDE`` lifted), side by side. Usage:
    python benchmarks/big_photos.py [--photos 8] [--min-face 64 40] [--untiled]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED
from PIL import Image, ImageFilter

SIZE = (4032, 3024)
GRID = 4
FACE_SHARE = 0.6  # of a SCUT-FBP5500 portrait's side, about


def group_photos(folder: Path, n: int) -> None:
    """``n`` photos and, beside each, the portraits' squares (x, y, side) as JSON."""
    rng = random.Random(7)
    portraits = sorted((SHARED / "scut_fbp5500" / "img").glob("*.jpg"))
    backgrounds = sorted((SHARED / "celeba" / "img").glob("1*.jpg"))
    cell_w, cell_h = SIZE[0] // GRID, SIZE[1] // GRID
    for i in range(n):
        canvas = Image.open(rng.choice(backgrounds)).convert("RGB").resize(SIZE).filter(ImageFilter.GaussianBlur(40))
        squares = []
        for cell in range(GRID * GRID):
            side = round(rng.uniform(40, 120) / FACE_SHARE)
            x = cell % GRID * cell_w + rng.randint(0, cell_w - side)
            y = cell // GRID * cell_h + rng.randint(0, cell_h - side)
            canvas.paste(Image.open(rng.choice(portraits)).convert("RGB").resize((side, side), Image.BICUBIC), (x, y))
            squares.append((x, y, side))
        canvas.save(folder / f"{i:03d}.jpg", quality=90)
        (folder / f"{i:03d}.json").write_text(json.dumps(squares))


def run_one(folder: Path, min_face: float | None, untiled: bool) -> dict:
    """In this process: every photo of ``folder`` as ``predict`` reads and detects it."""
    from facegender import detect
    from facegender.detect import MAX_SIDE, FaceDetector
    from facegender.images import open_rgb_reduced

    if untiled:
        detect.TILE_SIDE = 10 ** 9
    detector = FaceDetector(min_face=min_face)
    photos = sorted(folder.glob("*.jpg"))
    detector.detect(Image.new("RGB", (640, 480)))  # the models loaded, outside the timing
    found = sought = elsewhere = 0
    seconds = 0.0
    for photo in photos:
        start = time.perf_counter()
        image, scale = open_rgb_reduced(photo, MAX_SIDE, detector.largest_reduction())
        faces = detector.detect(image, scale=scale)
        seconds += time.perf_counter() - start
        squares = json.loads(photo.with_suffix(".json").read_text())
        centres = [((f.box[0] + f.box[2]) / 2 * scale, (f.box[1] + f.box[3]) / 2 * scale) for f in faces]
        inside = [[x < cx < x + s and y < cy < y + s for x, y, s in squares] for cx, cy in centres]
        found += sum(any(c) for c in zip(*inside)) if inside else 0
        elsewhere += sum(not any(row) for row in inside)
        sought += len(squares)
    return {"found": found / sought, "elsewhere": elsewhere / len(photos), "ms": seconds * 1000 / len(photos),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--min-face", type=float, nargs="+", default=[64, 40])
    parser.add_argument("--untiled", action="store_true", help="also the smallest --min-face with no tiles")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # folder, min_face or "default", untiled
    args = parser.parse_args()
    if args.child:
        folder, min_face, untiled = args.child
        print(json.dumps(run_one(Path(folder), None if min_face == "default" else float(min_face), untiled == "1")))
        return
    if not (SHARED / "celeba").is_dir() or not (SHARED / "scut_fbp5500").is_dir():
        raise SystemExit(f"benchmark: needs CelebA and SCUT-FBP5500 under {SHARED}")
    runs = [("default", "default", "0")] + [(f"--min-face {m:g}", str(m), "0") for m in args.min_face]
    if args.untiled:
        runs.append((f"--min-face {min(args.min_face):g}, untiled", str(min(args.min_face)), "1"))
    with tempfile.TemporaryDirectory(prefix="facegender-big-") as tmp:
        group_photos(Path(tmp), args.photos)
        print(f"{args.photos} photos of {SIZE[0]} x {SIZE[1]}, {GRID * GRID} faces of 40-120 px each")
        print(f"{'detector':<28} {'found':>7} {'elsewhere':>10} {'ms/photo':>9} {'peak MB':>8}")
        for name, min_face, untiled in runs:
            out = subprocess.run([sys.executable, __file__, "--child", tmp, min_face, untiled],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:<28} {r['found']:>6.1%} {r['elsewhere']:>10.2f} {r['ms']:>9.0f} {r['peak_mb']:>8.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
