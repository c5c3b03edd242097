"""Face detectors compared on the three corpora: detection rate and ms/image on one thread.

Runs every detector importable in the current environment (the project's own ``facegender.detect`` and,
for comparison, OpenCV's Haar cascades, dlib's HOG detector and MediaPipe's legacy face detector), on
``--images`` images of each corpus framing, as they are and padded by 25% on every side (tight chips
such as UTKFace leave a detector no margin). Also prints where the largest face sits (median box centre
and size as fractions of the image width) and how many faces are found on composed multi-face images.
Usage:
    python benchmarks/detectors.py --images 200
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any detector library starts its thread pool

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAD = 0.25

Boxes = list[tuple[float, float, float, float]]


def facegender_detector() -> Callable[[np.ndarray], Boxes]:
    from facegender.detect import FaceDetector

    detector = FaceDetector()
    return lambda rgb: [f.box for f in detector.detect(Image.fromarray(rgb))]


def opencv_haar(cascade: str) -> Callable[[], Callable[[np.ndarray], Boxes]]:
    def make():
        import cv2

        cv2.setNumThreads(1)
        model = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, cascade))
        if model.empty():
            raise ImportError(f"{cascade} is not shipped by opencv {cv2.__version__}")

        def detect(rgb):
            grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            found = model.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
            return [(x, y, x + w, y + h) for x, y, w, h in found]

        return detect

    return make


def dlib_hog() -> Callable[[np.ndarray], Boxes]:
    import dlib

    model = dlib.get_frontal_face_detector()

    def detect(rgb):
        upsample = 1 if max(rgb.shape[:2]) < 400 else 0  # its window is 80 px: small images need doubling
        return [(r.left(), r.top(), r.right(), r.bottom()) for r in model(rgb, upsample)]

    return detect


def mediapipe_legacy(model_selection: int) -> Callable[[], Callable[[np.ndarray], Boxes]]:
    def make():
        import mediapipe as mp

        model = mp.solutions.face_detection.FaceDetection(model_selection=model_selection, min_detection_confidence=0.5)

        def detect(rgb):
            h, w = rgb.shape[:2]
            found = model.process(rgb).detections or []
            boxes = []
            for d in found:
                b = d.location_data.relative_bounding_box
                boxes.append((b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h))
            return boxes

        return detect

    return make


DETECTORS = {
    "facegender.detect": facegender_detector,
    "opencv-haar-default": opencv_haar("haarcascade_frontalface_default.xml"),
    "opencv-haar-alt2": opencv_haar("haarcascade_frontalface_alt2.xml"),
    "dlib-hog": dlib_hog,
    "mediapipe-short": mediapipe_legacy(0),
    "mediapipe-full": mediapipe_legacy(1),
}


def corpora(n: int) -> dict[str, list[Path]]:
    def pick(paths):
        paths = sorted(paths)
        return random.Random(0).sample(paths, min(n, len(paths)))

    celeba = SHARED / "celeba" / "img"
    found = {
        "utkface 200x200": pick((SHARED / "utkface").glob("*.jpg")),
        "celeba aligned 89x109": pick(celeba.glob("0*.jpg")),
        "celeba loose": pick(p for p in celeba.glob("*.jpg") if not p.name.startswith("0")),
        "scut 144x144": pick((SHARED / "scut_fbp5500" / "img").glob("*.jpg")),
    }
    return {name: paths for name, paths in found.items() if paths}


def astronaut() -> list[np.ndarray]:
    try:
        from skimage.data import astronaut
    except ImportError:
        return []
    return [astronaut()]


def composed(faces: list[Path], count: int = 10) -> list[tuple[np.ndarray, Boxes]]:
    """Mid-grey 640x480 canvases with three faces pasted at known places and sizes."""
    rng = random.Random(1)
    out = []
    for i in range(count):
        canvas = Image.new("RGB", (640, 480), (128, 128, 128))
        placed = []
        for j, (x, size) in enumerate([(20, 150), (230, 190), (450, 170)]):
            face = Image.open(faces[(3 * i + j) % len(faces)]).convert("RGB").resize((size, size))
            y = rng.randint(20, 480 - size - 20)
            canvas.paste(face, (x, y))
            placed.append((x, y, x + size, y + size))
        out.append((np.asarray(canvas), placed))
    return out


def padded(rgb: np.ndarray) -> tuple[np.ndarray, int, int]:
    h, w = rgb.shape[:2]
    dy, dx = round(h * PAD), round(w * PAD)
    return np.pad(rgb, ((dy, dy), (dx, dx), (0, 0)), mode="edge"), dx, dy


def run(detect, images: list[np.ndarray], pad: bool) -> tuple[float, float, list[Boxes]]:
    """(share of images with a face, ms per image, boxes per image in the unpadded image's pixels)."""
    found, seconds = [], 0.0
    for rgb in images:
        dx = dy = 0
        if pad:
            rgb, dx, dy = padded(rgb)
        start = time.perf_counter()
        boxes = detect(rgb)
        seconds += time.perf_counter() - start
        found.append([(x0 - dx, y0 - dy, x1 - dx, y1 - dy) for x0, y0, x1, y1 in boxes])
    rate = sum(bool(b) for b in found) / max(1, len(images))
    return rate, 1000 * seconds / max(1, len(images)), found


def framing(images: list[np.ndarray], found: list[Boxes]) -> str:
    """Median centre and side of the largest box, as fractions of the image width."""
    rows = []
    for rgb, boxes in zip(images, found):
        if boxes:
            x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
            w = rgb.shape[1]
            rows.append(((x0 + x1) / 2 / w, (y0 + y1) / 2 / w, (x1 - x0) / w, (y1 - y0) / w))
    if not rows:
        return ""
    cx, cy, bw, bh = (statistics.median(c) for c in zip(*rows))
    return f"centre ({cx:.2f},{cy:.2f}) size {bw:.2f}x{bh:.2f}"


def hits(found: Boxes, placed: Boxes) -> int:
    """Pasted faces with a detected box centred inside them."""
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in found]
    return sum(any(p[0] < cx < p[2] and p[1] < cy < p[3] for cx, cy in centres) for p in placed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images per corpus framing")
    parser.add_argument("--detectors", nargs="*", default=list(DETECTORS), choices=list(DETECTORS))
    args = parser.parse_args()

    sets = {name: [np.asarray(Image.open(p).convert("RGB")) for p in paths] for name, paths in corpora(args.images).items()}
    if not sets:
        raise SystemExit(f"benchmark: no corpus found under {SHARED}")
    sets["astronaut (skimage)"] = astronaut()
    scut = sorted((SHARED / "scut_fbp5500" / "img").glob("*.jpg"))[::50] or sorted((SHARED / "utkface").glob("*.jpg"))[::500]
    multi = composed(scut)

    print(f"{'detector':22} {'images':24} {'n':>4} {'rate':>6} {'ms/img':>7} {'rate+pad':>8} {'ms/img':>7}  largest box (no pad)")
    for name in args.detectors:
        try:
            detect = DETECTORS[name]()
        except (ImportError, AttributeError) as e:  # AttributeError: a MediaPipe without the legacy solutions
            print(f"{name:22} not available here: {e}")
            continue
        detect(np.zeros((64, 64, 3), np.uint8))  # warm up: first calls load models
        for set_name, images in sets.items():
            if not images:
                continue
            rate, ms, found = run(detect, images, pad=False)
            prate, pms, _ = run(detect, images, pad=True)
            print(f"{name:22} {set_name:24} {len(images):4d} {rate:6.1%} {ms:7.1f} {prate:8.1%} {pms:7.1f}  {framing(images, found)}")
        rate, ms, found = run(detect, [rgb for rgb, _ in multi], pad=False)
        pasted = sum(len(p) for _, p in multi)
        got = sum(hits(f, p) for f, (_, p) in zip(found, multi))
        extra = sum(len(f) for f in found) - got
        print(f"{name:22} {'composed 3-face 640x480':24} {len(multi):4d} faces found {got}/{pasted}, {extra} extra boxes, {ms:.1f} ms/img")


if __name__ == "__main__":
    main()
