"""BlazeFace on onnxruntime, two kinds of session side by side: the one that takes every input size, and one
made for a single size (onnxruntime's free-dimension overrides), which the detector runs for the first few
large sizes it sees again (``facegender.blazeface.BlazeFace``).

For each network and input size (the passes of 640x480, 250 px, 1280x960 and portrait photos), on one
thread, the two take turns on the same real photos (SCUT-FBP5500 portraits pasted into CelebA backgrounds,
letterboxed as the detector does): ms per pass, the ratio, the largest difference between their outputs,
and what making the sized session cost. Usage:
    python benchmarks/blazeface_shapes.py [--repeats 40]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import random
import time

import numpy as np
from common import SHARED
from PIL import Image

from facegender.blazeface import BlazeFace, letterbox

SIZES = {  # network -> photo size -> the passes' input sides (the detector's own, for the default min_face)
    "short": {"640x480": (128, 384), "1280x960": (128, 320, 768), "480x640": (384,), "250x250": (128,)},
    "full": {"250x250": (192,), "350x350": (224,)},
}


def photos(n: int, size: tuple[int, int], rng: random.Random) -> list[Image.Image]:
    portraits = sorted((SHARED / "scut_fbp5500" / "img").glob("*.jpg"))
    backgrounds = sorted((SHARED / "celeba" / "img").glob("1*.jpg"))
    out = []
    for _ in range(n):
        canvas = Image.open(rng.choice(backgrounds)).convert("RGB").resize(size)
        face = Image.open(rng.choice(portraits)).convert("RGB")
        side = min(size) // 2
        canvas.paste(face.resize((side, side)), (rng.randrange(size[0] - side), rng.randrange(size[1] - side)))
        out.append(canvas)
    return out


def ms_per_run(session, tensors: list[np.ndarray], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for t in tensors:
            session.run(None, {"input": t})
    return (time.perf_counter() - start) * 1000 / (repeats * len(tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="runs of each photo per session and turn")
    args = parser.parse_args()
    if not (SHARED / "celeba").is_dir() or not (SHARED / "scut_fbp5500").is_dir():
        raise SystemExit(f"benchmark: needs CelebA and SCUT-FBP5500 under {SHARED}")
    rng = random.Random(0)
    print(f"{'network':8s} {'photo':9s} {'input':>9s}  {'any size':>9s} {'own size':>9s} {'ratio':>6s} "
          f"{'max diff':>9s} {'made in':>8s}")
    for network, formats in SIZES.items():
        for photo, sides in formats.items():
            images = photos(4, tuple(int(v) for v in photo.split("x")), rng)
            for side in sides:
                tensors = [letterbox(image, side)[0] for image in images]
                height, width = tensors[0].shape[2:]
                detector = BlazeFace(network)
                shared = detector.session()  # for every size
                start = time.perf_counter()
                own = detector.new_session((height, width))
                made = (time.perf_counter() - start) * 1000
                diff = max(float(np.abs(a - b).max()) for t in tensors
                           for a, b in zip(shared.run(None, {"input": t}), own.run(None, {"input": t})))
                any_ms = own_ms = 0.0
                for _ in range(3):  # turns, so that a slower moment of the machine falls on both
                    any_ms += ms_per_run(shared, tensors, args.repeats) / 3
                    own_ms += ms_per_run(own, tensors, args.repeats) / 3
                print(f"{network:8s} {photo:9s} {f'{width}x{height}':>9s}  {any_ms:7.2f}ms {own_ms:7.2f}ms "
                      f"{any_ms / own_ms:5.2f}x {diff:9.1e} {made:6.1f}ms", flush=True)


if __name__ == "__main__":
    main()
