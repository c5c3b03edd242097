"""Cold start of the paths a user touches first: `facegender predict PHOTO` (a new process, one photo, the
default model) and `facegender serve` until /healthz answers.

    python benchmarks/startup.py                       # this checkout
    python benchmarks/startup.py --before /tmp/old     # and a checkout of an earlier commit, interleaved

Each figure is the median of --runs cold runs (a new process each time; the OS file cache is warm, as it is
for a user's second command). Run it on an idle machine. Its last line:
    startup: A s to label one photo (median of 5 cold runs), B s to the first /healthz
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_photo() -> Path:
    try:
        import skimage.data
    except ImportError:
        sys.exit("give --photo PATH (scikit-image's astronaut photo is the default, and it is not installed)")
    return Path(skimage.data.__file__).parent / "astronaut.png"


def environment(tree: Path) -> dict:
    """Run the facegender of ``tree`` (its src/ first on the path) with this interpreter."""
    return os.environ | {"PYTHONPATH": str(tree / "src"), "PYTHONWARNINGS": "ignore"}


def predict_seconds(tree: Path, photo: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "facegender.cli", "predict", str(photo)], env=environment(tree),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"predict failed in {tree}: {done.stderr.strip()[-500:]}")
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz_seconds(tree: Path) -> float:
    port = _free_port()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "facegender.cli", "serve", "--port", str(port)],
                              env=environment(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"serve exited with {server.returncode} in {tree}")
                time.sleep(0.005)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo", type=Path, help="the photo to label (default: scikit-image's astronaut)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", type=Path, help="a checkout of an earlier commit, measured interleaved")
    args = parser.parse_args()
    photo = args.photo or default_photo()
    trees = {"this checkout": ROOT} | ({"before": args.before} if args.before else {})
    for tree in trees.values():  # one untimed run each: compiled bytecode and converted caches in place
        predict_seconds(tree, photo)
    timings = {name: {"predict": [], "healthz": []} for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            timings[name]["predict"].append(predict_seconds(tree, photo))
            timings[name]["healthz"].append(healthz_seconds(tree))
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}
    for name, t in timings.items():
        print(f"{name:>14}: predict {min(t['predict']):.2f} / {medians[name]['predict']:.2f} / "
              f"{max(t['predict']):.2f} s, /healthz {min(t['healthz']):.2f} / {medians[name]['healthz']:.2f} / "
              f"{max(t['healthz']):.2f} s (min / median / max of {args.runs})")
    if args.before:
        print(f"{'ratio':>14}: predict {medians['before']['predict'] / medians['this checkout']['predict']:.1f}x "
              f"faster, /healthz {medians['before']['healthz'] / medians['this checkout']['healthz']:.1f}x faster")
    now = medians["this checkout"]
    print(f"startup: {now['predict']:.2f} s to label one photo (median of {args.runs} cold runs), "
          f"{now['healthz']:.2f} s to the first /healthz")


if __name__ == "__main__":
    main()
