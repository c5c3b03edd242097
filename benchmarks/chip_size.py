"""Smaller chips for dlib's descriptor network: how much accuracy a cheaper network input costs.

The network takes a 150 x 150 chip (``chips.CHIP_SIZE``), but it is convolutional up to a global average,
so it runs on any side: at 136 px its maps shrink from 35 to 32 px at the first level and from 3 to 2 at
the last, about three quarters of the work. For each ``--sizes`` side (the same framing, dlib's padding
0.25, only fewer pixels), on the prepared corpora: the chips are cut by dlib's ``get_face_chip`` from each
image at its stored landmarks (``chips.chip``), described by the network in PyTorch (float32; the same descriptors as the
shipped graph's within 1e-5 at 150), and compared with the 150 px descriptors (cosine); then the bundled
head and heads refitted on each side's own descriptors (``refits.py``) are scored on the validation,
test and leave-one-corpus-out splits. Last, CPU milliseconds per face of the network exported at each side,
on onnxruntime, one thread, runs of 16 chips, the sides taking turns. About 3 minutes per side on 2 cores.
Usage:
    python benchmarks/chip_size.py --data data/utkface data/celeba data/scut_fbp5500 [--sizes 150 136]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from refits import header, refit_rows

from facegender.chips import CHIP_SIZE, chip
from facegender.data import load_samples_many
from facegender.dlibnet import DescriptorNet
from facegender.images import BadImage, open_rgb
from facegender.inference import Classifier
from facegender.onnx_export import descriptor_network_graph
from facegender.onnx_model import session

BATCH = 64


def descriptors(net: DescriptorNet, samples: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N x 128 descriptors of the samples that decode, their indices) from ``size`` px chips."""
    vectors, good, chips = [], [], []

    def flush():
        with torch.inference_mode():
            vectors.append(net(torch.as_tensor(np.stack(chips))).float().numpy())
        chips.clear()

    for i, s in enumerate(samples):
        try:
            chips.append(chip(open_rgb(s.path), s.landmarks, size))
        except BadImage:
            continue
        good.append(i)
        if len(chips) == BATCH:
            flush()
    if chips:
        flush()
    return np.concatenate(vectors), np.array(good)


def ms_per_face(sizes: list[int], rounds: int = 5, runs: int = 10) -> dict[int, float]:
    """CPU ms per face of the network exported at each side, onnxruntime, one thread, 16 chips a run."""
    rng = np.random.default_rng(0)
    sessions = {s: session(descriptor_network_graph(size=s), 1) for s in sizes}
    chips = {s: rng.integers(0, 256, (16, s, s, 3), dtype=np.uint8) for s in sizes}
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for s in sizes:
        sessions[s].run(None, {"chips": chips[s]})
    for _ in range(rounds):
        for s in sizes:
            cpu = time.process_time()
            for _ in range(runs):
                sessions[s].run(None, {"chips": chips[s]})
            times[s].append((time.process_time() - cpu) * 1000 / (runs * 16))
    return {s: statistics.median(t) for s, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="prepared datasets")
    parser.add_argument("--sizes", nargs="+", type=int, default=[CHIP_SIZE, 136], help="chip sides, px")
    args = parser.parse_args()
    if any(not 64 <= s <= 300 for s in args.sizes):
        raise SystemExit(f"--sizes {args.sizes}: each side must be 64-300 px")
    sizes = [CHIP_SIZE] + [s for s in dict.fromkeys(args.sizes) if s != CHIP_SIZE]  # 150 is the reference

    clf = Classifier.from_checkpoint("descriptor", detect=False, threads=1)
    net = DescriptorNet.from_dat(device="cpu", precision="fp32")
    splits = {name: load_samples_many(args.data, name) for name in ("train", "val", "test")}
    print(", ".join(f"{len(v)} {k}" for k, v in splits.items()) + f" images of {', '.join(args.data)}", flush=True)
    got: dict[int, dict] = {}
    for size in sizes:
        started = time.perf_counter()
        got[size] = {}
        for split, samples in splits.items():
            x, good = descriptors(net, samples, size)
            got[size][split] = (x, np.array([samples[i].label for i in good]),
                                np.array([samples[i].source for i in good]), good)
        print(f"{size} px chips described in {time.perf_counter() - started:.0f} s", flush=True)
    for size in sizes[1:]:
        a, b = got[size]["val"], got[CHIP_SIZE]["val"]
        assert np.array_equal(a[3], b[3])
        cos = (a[0] * b[0]).sum(1) / np.linalg.norm(a[0], axis=1) / np.linalg.norm(b[0], axis=1)
        print(f"{size} px against {CHIP_SIZE} px, validation descriptors: cosine median {np.median(cos):.4f}, "
              f"1st percentile {np.percentile(cos, 1):.4f}")

    header(sorted(set(got[CHIP_SIZE]["test"][2])))
    for size in sizes:
        refit_rows(f"{size} px", {k: v[:3] for k, v in got[size].items()}, clf.model.head.logits)

    timed = ms_per_face(sizes)
    print("\nCPU ms per face, onnxruntime, one thread, runs of 16 chips, medians of 5 rounds: " + ", ".join(
        f"{s} px {ms:.2f} ({timed[CHIP_SIZE] / ms:.2f}x)" for s, ms in timed.items()))


if __name__ == "__main__":
    main()
