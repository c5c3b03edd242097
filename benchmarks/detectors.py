"""Face detection benchmark: recall, false boxes and ms per image for every detector, side by side in one run.

Every set is built from the corpora in ../shared/data (seeded; nothing new is downloaded), and each image
knows where its faces are:

- each corpus as it is (UTKFace chips, CelebA aligned and loose crops, SCUT-FBP5500 portraits): one face,
  centred; a box counts as that face when its centre lies in the middle half of the image;
- faces rotated in-plane by +-15, +-30 and +-45 degrees (UTKFace, CelebA aligned and SCUT, canvas grown to
  hold the turned image, corners mid-grey);
- small faces: one UTKFace chip pasted at 24-64 px into a 640x480 background (a CelebA photo cut into 40 px
  tiles and shuffled: real textures, no face), reported by size band;
- profile-leaning faces: the UTKFace chips whose nose sits furthest from the middle of the eyes, as dlib's
  5-point model places them in a fixed box (the chips are aligned: no detector chooses the set), padded by
  25% on every side like HOG's own retry; a box centred anywhere on the chip finds its face;
- composites: 2-8 faces (UTKFace, CelebA aligned, SCUT) of 32-200 px on a 640x480 background like above;
- groups in small photos: 2-4 such faces of 40-64 px (the default smallest face and up) on a 240x160
  background, as in a group photo's thumbnail;
- upside down: the rotated sets' upright faces and the composites, turned 180 degrees;
- no face: the backgrounds alone, 640x480 and 240x160 (what a detector finds there is all false boxes);
- cut by the edge: one UTKFace chip of 100-400 px on a 640x480 background with 20% or 35% of its side beyond
  one of the photo's edges (a person at the side of a group photo, a close-up's chin out of the frame), and
  one of 80-240 px on a 320x240 one (an avatar, a thumbnail); a box centred in the part inside the photo finds it.

A detected box finds a face when its centre lies inside the face's square; each face is found at most once,
and every box that finds none is a false box. Times are detection alone (decoded images in memory) on one
thread. Detectors: the project's two (``FaceDetector``: landmarks included), the default without the second
look at what its larger passes doubt (as it was before it), and, for reference, BlazeFace's two networks run
alone at their own input size (no landmarks, no second pass).
Usage:
    python benchmarks/detectors.py [--images 200] [--detectors hog blazeface ...] [--sets "no face" ...]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any detector library starts its thread pool

import argparse
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import SHARED
from PIL import Image

Box = tuple[float, float, float, float]


@dataclass
class Case:
    image: Image.Image
    faces: list[Box]  # where the faces are: a box centred inside one finds it


def facegender(kind: str, **options) -> Callable[[], Callable[[Image.Image], list[Box]]]:
    def make():
        from facegender.detect import FaceDetector

        detector = FaceDetector(kind, **options)
        return lambda image: [f.box for f in detector.detect(image)]

    return make


def patched(constant: str, value) -> Callable[[], Callable[[Image.Image], list[Box]]]:
    """The default detector with ``facegender.detect``'s ``constant`` set to ``value`` (or to ``value(detect)``)
    while it runs: the detector as it was before the change that constant makes."""
    def make():
        from facegender import detect

        detector = detect.FaceDetector("blazeface")

        def run(image: Image.Image) -> list[Box]:
            kept = getattr(detect, constant)
            setattr(detect, constant, value(detect) if callable(value) else value)
            try:
                return [f.box for f in detector.detect(image)]
            finally:
                setattr(detect, constant, kept)

        return run

    return make


def network(name: str) -> Callable[[], Callable[[Image.Image], list[Box]]]:
    def make():
        from facegender.blazeface import BlazeFace

        model = BlazeFace(name)
        return lambda image: [d.box for d in model.detect(image)]

    return make


DETECTORS = {
    "hog": facegender("hog"),
    "blazeface": facegender("blazeface"),
    "blazeface min_face 32": facegender("blazeface", min_face=32),
    "blazeface min_face 48": facegender("blazeface", min_face=48),
    # before the second look: what a larger pass scores under 0.7 is dropped
    "blazeface no second look": patched("DOUBTFUL_SCORE", lambda detect: detect.LARGER_PASS_MIN_SCORE),
    # before a photo without a face was looked at turned 180 degrees
    "blazeface upright only": patched("LOOK_TURNED", False),
    # before a small photo of small faces got a pass at its own size
    "blazeface no group pass": patched("GROUP_FACE_SHARE", 0.0),
    # before what the padded retry's full-range network and the turned look find had to have its eyes where dlib's
    # landmarks put them
    "blazeface fallbacks unchecked": patched("FALLBACK_EYES_WITHIN", None),
    # before a box that reaches the photo's edge got a second look from a lower score
    "blazeface no edge look": patched("EDGE_DOUBTFUL_SCORE", None),
    # before what the full-range network finds in a small photo had to be confirmed by the short-range network's
    # second look
    "blazeface full-range unconfirmed": patched("FULL_CONFIRMED_SCORE", None),
    # before the turned look ran where only the padded retry had found faces
    "blazeface turned look after nothing only": patched("TURNED_OVER_RETRY", False),
    "net short 128": network("short"),
    "net full 192": network("full"),
}


def corpus(n: int, rng: random.Random) -> dict[str, list[Path]]:
    celeba = sorted((SHARED / "celeba" / "img").glob("*.jpg"))
    found = {
        "utkface": sorted((SHARED / "utkface").glob("*.jpg")),
        "celeba aligned": [p for p in celeba if p.name.startswith("0")],
        "celeba loose": [p for p in celeba if not p.name.startswith("0")],
        "scut": sorted((SHARED / "scut_fbp5500" / "img").glob("*.jpg")),
    }
    return {name: rng.sample(paths, min(n, len(paths))) for name, paths in found.items() if paths}


def rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def middle(image: Image.Image) -> Box:
    w, h = image.size
    return (w / 4, h / 4, 3 * w / 4, 3 * h / 4)


def as_is(paths: list[Path]) -> list[Case]:
    return [Case(im, [middle(im)]) for im in map(rgb, paths)]


def rotated(paths: list[Path], degrees: int, rng: random.Random) -> list[Case]:
    cases = []
    for im in map(rgb, paths):
        turned = im.rotate(rng.choice((-1, 1)) * degrees, Image.BILINEAR, expand=True, fillcolor=(128, 128, 128))
        # the face's middle half, turned about the image's centre, which stays the canvas's centre
        (cx, cy), half = (turned.width / 2, turned.height / 2), min(im.size) / 4
        cases.append(Case(turned, [(cx - half, cy - half, cx + half, cy + half)]))
    return cases


def background(path: Path, rng: random.Random, size=(640, 480), tile: int = 40) -> Image.Image:
    """A photo cut into tiles and shuffled: its colours and textures, and no face."""
    a = np.asarray(rgb(path).resize(size, Image.BILINEAR))
    rows, cols = size[1] // tile, size[0] // tile
    tiles = [a[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    rng.shuffle(tiles)
    out = np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1) for r in range(rows)], axis=0)
    return Image.fromarray(np.ascontiguousarray(out))


def pasted(faces: list[Path], backgrounds: list[Path], count: int, sizes: tuple[int, int],
           rng: random.Random, per_image: tuple[int, int] = (1, 1), size=(640, 480), tile: int = 40) -> list[Case]:
    """Faces of ``sizes`` px pasted where they do not overlap onto shuffled backgrounds of ``size``."""
    cases = []
    for _ in range(count):
        canvas = background(rng.choice(backgrounds), rng, size, tile)
        placed: list[Box] = []
        for _ in range(rng.randint(*per_image)):
            side = rng.randint(*sizes)
            for _ in range(50):  # a free place
                x, y = rng.randint(0, canvas.width - side), rng.randint(0, canvas.height - side)
                box = (x, y, x + side, y + side)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                    canvas.paste(rgb(rng.choice(faces)).resize((side, side), Image.BICUBIC), (x, y))
                    placed.append(box)
                    break
        cases.append(Case(canvas, placed))
    return cases


def cut_by_edge(faces: list[Path], backgrounds: list[Path], count: int, share: float, rng: random.Random,
                size=(640, 480), tile: int = 40, sides: tuple[int, int] = (100, 400)) -> list[Case]:
    """One face of ``sides`` px on a shuffled background of ``size``, ``share`` of its side beyond a random edge."""
    cases = []
    for _ in range(count):
        canvas = background(rng.choice(backgrounds), rng, size, tile)
        side = rng.randint(*sides)
        out = round(share * side)
        x, y = rng.randint(0, canvas.width - side), rng.randint(0, canvas.height - side)
        x, y = {"left": (-out, y), "right": (canvas.width - side + out, y), "top": (x, -out),
                "bottom": (x, canvas.height - side + out)}[rng.choice(("left", "right", "top", "bottom"))]
        canvas.paste(rgb(rng.choice(faces)).resize((side, side), Image.BICUBIC), (x, y))
        cases.append(Case(canvas, [(max(0, x), max(0, y), min(canvas.width, x + side), min(canvas.height, y + side))]))
    return cases


def profile_leaning(paths: list[Path], count: int) -> list[Case]:
    """The UTKFace chips whose nose is furthest (in eye distances) from the middle of the eyes, placed by
    dlib's 5-point model in the middle 70% of the chip: the chips are aligned, so no detector chooses."""
    import dlib

    from facegender.detect import LANDMARK_MODEL, RETRY_PAD, packaged_model

    predictor = dlib.shape_predictor(str(packaged_model(LANDMARK_MODEL)))
    yaw = []
    for path in paths:
        a = np.asarray(rgb(path))
        h, w = a.shape[:2]
        p = predictor(a, dlib.rectangle(round(0.15 * w), round(0.15 * h), round(0.85 * w), round(0.85 * h))).parts()
        right, left = np.mean([(q.x, q.y) for q in p[0:2]], 0), np.mean([(q.x, q.y) for q in p[2:4]], 0)
        yaw.append(abs(p[4].x - (right[0] + left[0]) / 2) / max(1.0, math.dist(right, left)))
    chosen = [paths[i] for i in np.argsort(yaw)[::-1][:count]]
    cases = []
    for im in map(rgb, chosen):
        dy, dx = round(im.height * RETRY_PAD), round(im.width * RETRY_PAD)
        big = Image.fromarray(np.pad(np.asarray(im), ((dy, dy), (dx, dx), (0, 0)), mode="edge"))
        # a profile's head sits to one side of the chip: any box centred on the chip finds it
        cases.append(Case(big, [(dx, dy, dx + im.width, dy + im.height)]))
    return cases


def build_sets(n: int) -> dict[str, list[Case]]:
    rng = random.Random(0)
    paths = corpus(n, rng)
    if not paths:
        raise SystemExit(f"benchmark: no corpus found under {SHARED}")
    sets = {name: as_is(p) for name, p in paths.items()}
    upright = [p for name in ("utkface", "celeba aligned", "scut") for p in paths.get(name, [])]
    upright = rng.sample(upright, min(n, len(upright)))
    for degrees in (15, 30, 45):
        sets[f"rotated +-{degrees}"] = rotated(upright, degrees, rng)
    chips = paths.get("utkface", upright)
    backgrounds = paths.get("celeba loose") or upright
    for low, high in ((24, 31), (32, 47), (48, 64)):
        sets[f"small {low}-{high} px in 640"] = pasted(chips, backgrounds, max(1, n // 2), (low, high), rng)
    if "utkface" in paths:
        pool = rng.sample(sorted((SHARED / "utkface").glob("*.jpg")), min(10 * n, 23707))
        sets["profile-leaning utkface"] = profile_leaning(pool, n)
    sets["composites 2-8 faces"] = pasted(upright, backgrounds, max(1, n // 4), (32, 200), rng, per_image=(2, 8))
    # a group photo's thumbnail: in a photo under 400 px no larger pass runs, so the first finds every face
    sets["groups in 240x160"] = pasted(upright, backgrounds, max(1, n // 2), (40, 64), rng, per_image=(2, 4),
                                       size=(240, 160), tile=16)  # tiles of the photo's eyes or lips would be faces there
    # last, drawing nothing from rng: the sets above stay those of earlier runs
    sets["upside down"] = [upside_down(c) for c in as_is(upright)]
    sets["composites upside down"] = [upside_down(c) for c in sets["composites 2-8 faces"]]
    # then photos without a face, from a generator of their own (the same backgrounds as the faces are pasted on)
    empty = random.Random(7)
    sets["no face, 640x480"] = pasted(chips, backgrounds, max(1, n // 2), (0, 0), empty, per_image=(0, 0))
    sets["no face, 240x160"] = pasted(chips, backgrounds, max(1, n // 2), (0, 0), empty, per_image=(0, 0),
                                      size=(240, 160), tile=16)
    # faces the photo's edge cuts, from a generator of their own too
    cut = random.Random(8)
    for share in (0.2, 0.35):
        sets[f"cut {share:.0%} by the edge"] = cut_by_edge(chips, backgrounds, max(1, n // 2), share, cut)
    # and in small photos, where no larger pass runs (from a generator of their own as well)
    small_cut = random.Random(9)
    for share in (0.2, 0.35):
        sets[f"cut {share:.0%} by the edge, 320x240"] = cut_by_edge(chips, backgrounds, max(1, n // 2), share, small_cut,
                                                                  (320, 240), 16, (80, 240))
    return sets


def upside_down(case: Case) -> Case:
    w, h = case.image.size
    return Case(case.image.transpose(Image.Transpose.ROTATE_180), [(w - x1, h - y1, w - x0, h - y0)
                                                                   for x0, y0, x1, y1 in case.faces])


def score(found: list[Box], faces: list[Box]) -> tuple[int, int]:
    """(faces found, false boxes): each face is matched by at most one box, each box finds at most one face."""
    left = list(faces)
    hits = 0
    for x0, y0, x1, y1 in found:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        match = next((f for f in left if f[0] < cx < f[2] and f[1] < cy < f[3]), None)
        if match is not None:
            left.remove(match)
            hits += 1
    return hits, len(found) - hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images per set (half that for small faces, "
                                                               "a quarter for composites)")
    parser.add_argument("--detectors", nargs="*", default=list(DETECTORS), choices=list(DETECTORS))
    parser.add_argument("--sets", nargs="*", metavar="TEXT",
                        help="run only the sets whose names hold one of these (all are still built, so each set is "
                             "the same photos as in a run of them all)")
    args = parser.parse_args()

    sets = build_sets(args.images)
    if args.sets:
        sets = {name: cases for name, cases in sets.items() if any(text in name for text in args.sets)}
        if not sets:
            raise SystemExit(f"benchmark: no set's name holds any of {args.sets}")
    detectors = {}
    for name in args.detectors:
        detect = DETECTORS[name]()
        detect(Image.new("RGB", (64, 64)))  # warm up: the first call loads the models
        detectors[name] = detect
    width = max(map(len, sets)) + 1
    print(f"{'set':{width}} {'faces':>5}  " + "  ".join(f"{d + ': recall false/img ms':>34}" for d in detectors))
    totals = {d: [0, 0, 0, 0.0] for d in detectors}  # found, faces, false, seconds
    images = 0
    for set_name, cases in sets.items():
        faces = sum(len(c.faces) for c in cases)
        images += len(cases)
        cells = []
        for name, detect in detectors.items():
            found = false = 0
            seconds = 0.0
            for case in cases:
                start = time.perf_counter()
                boxes = detect(case.image)
                seconds += time.perf_counter() - start
                hit, wrong = score(boxes, case.faces)
                found, false = found + hit, false + wrong
            t = totals[name]
            t[0], t[1], t[2], t[3] = t[0] + found, t[1] + faces, t[2] + false, t[3] + seconds
            recall = f"{found / faces:.1%}" if faces else "-"  # a set without faces shows false boxes only
            cells.append(f"{recall:>16} {false / len(cases):6.3f} {1000 * seconds / len(cases):6.1f}")
        print(f"{set_name:{width}} {faces:5d}  " + "  ".join(f"{c:>34}" for c in cells), flush=True)
    print(f"{'all sets':{width}} {sum(len(c.faces) for cs in sets.values() for c in cs):5d}  " + "  ".join(
        f"{f'{t[0] / t[1]:.1%}' if t[1] else '-':>16} {t[2] / images:6.3f} {1000 * t[3] / images:6.1f}".rjust(34)
        for t in totals.values()))


if __name__ == "__main__":
    main()
