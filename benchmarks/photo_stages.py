"""Where the time of ``facegender predict DIR`` goes, stage by stage, on one thread.

The same photos as benchmarks/photo_throughput.py (250 px single-face and 640x480 three-face), each stage
timed alone: decoding, dlib's HOG search (on the RGB image and on its greyscale version, with the faces each
finds), the default BlazeFace detector whole (its networks' passes and the 5 landmarks of every face it
finds: ``FaceDetector("blazeface").detect``), the 5 landmarks and the chip per face (on HOG's faces), and the default model per face at batch 64
(CPU time over its threads). Also what a detecting thread's first image costs: building dlib's HOG detector
against unpickling a copy of one. Usage:
    python benchmarks/photo_stages.py [--photos 200] [--composites 40]
"""
from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import dlib
import numpy as np
from common import SHARED
from photo_throughput import multi_face_photos, single_face_photos

from facegender.detect import LANDMARK_MODEL, FaceDetector, packaged_model
from facegender.images import open_rgb_reduced
from facegender.inference import Classifier


def timed(fn, items) -> tuple[float, list]:
    """(ms per item, results)."""
    start = time.perf_counter()
    out = [fn(x) for x in items]
    return (time.perf_counter() - start) * 1000 / max(1, len(items)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--composites", type=int, default=40)
    args = parser.parse_args()
    if not (SHARED / "celeba").is_dir() or not (SHARED / "scut_fbp5500").is_dir():
        raise SystemExit(f"benchmark: needs CelebA and SCUT-FBP5500 under {SHARED}")
    start = time.perf_counter()
    hog = dlib.get_frontal_face_detector()
    built = time.perf_counter() - start
    data = pickle.dumps(hog)
    start = time.perf_counter()
    pickle.loads(data)
    copied = time.perf_counter() - start
    print(f"HOG detector: built in {built * 1000:.0f} ms, a pickled copy in {copied * 1000:.1f} ms")
    landmarks = dlib.shape_predictor(str(packaged_model(LANDMARK_MODEL)))
    clf = Classifier.from_checkpoint(None, backend="auto", detect=False)
    print(f"model: the bundled default on {type(clf.model.extractor).__name__}")
    with tempfile.TemporaryDirectory(prefix="facegender-stages-") as tmp:
        sets = {"single-face 250 px": (single_face_photos, args.photos), "multi-face 640x480": (multi_face_photos, args.composites)}
        for name, (make, n) in sets.items():
            folder = Path(tmp) / name.split()[0]
            folder.mkdir()
            make(folder, n)
            files = sorted(folder.iterdir())
            decode_ms, decoded = timed(lambda f: open_rgb_reduced(f, 1280)[0], files)
            rgb = [np.asarray(im) for im in decoded]
            grey = [np.asarray(im.convert("L")) for im in decoded]
            hog_ms, found = timed(lambda a: hog.run(a, 0, 0.0)[0], rgb)
            grey_ms, grey_found = timed(lambda a: hog.run(a, 0, 0.0)[0], grey)
            blazeface = FaceDetector("blazeface")
            blazeface.detect(decoded[0])  # loads the networks
            blaze_ms, blaze_found = timed(blazeface.detect, decoded)
            faces = [(a, r) for a, rects in zip(rgb, found) for r in rects]
            lm_ms, shapes = timed(lambda job: landmarks(*job), faces)
            chip_ms, chips = timed(lambda job: dlib.get_face_chip(job[0][0], job[1], size=150, padding=0.25),
                                   list(zip(faces, shapes)))
            chips = np.stack(chips)
            clf.logits(chips[:64])  # warm-up
            cpu = time.process_time()
            for i in range(0, len(chips), 64):
                clf.logits(chips[i:i + 64])
            model_ms = (time.process_time() - cpu) * 1000 / len(chips)
            print(f"{name}: {len(files)} photos, {len(faces)} faces")
            print(f"  decode {decode_ms:.1f} ms/photo; HOG search {hog_ms:.1f} ms/photo "
                  f"({sum(map(len, found))} faces), greyscale {grey_ms:.1f} ms/photo ({sum(map(len, grey_found))} faces, "
                  f"{grey_ms / hog_ms:.2f}x the time); BlazeFace with landmarks {blaze_ms:.1f} ms/photo "
                  f"({sum(map(len, blaze_found))} faces)")
            print(f"  landmarks {lm_ms:.2f} ms/face; chip {chip_ms:.2f} ms/face; model {model_ms:.1f} ms of CPU per face "
                  f"at batch 64")


if __name__ == "__main__":
    main()
