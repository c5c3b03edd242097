"""Static int8 quantisation of the default descriptor model on onnxruntime: accuracy and speed against fp32.

Quantises the convolutions of the ONNX graph ``facegender export`` writes of the bundled descriptor model
(onnxruntime's static quantisation, QDQ, per-channel weights; calibrated on ``--calibration`` chips of the
validation splits), then, on the full test splits of the prepared corpora: accuracy of fp32 (PyTorch) and
of each int8 variant, the largest change in P(male), and answers flipped (descriptors go through the
cache of ``facegender.descriptors``, so a rerun computes nothing); and the CPU milliseconds per face
(``time.process_time``: steady on a shared machine) at batch 1 and 64 of torch fp32, onnxruntime fp32 and
int8, in turns over ``--rounds`` rounds. The issue keeps int8 only if accuracy drops by at most 0.3 points
on the test splits and it is measurably faster. Usage:
    python benchmarks/int8_study.py --data data/utkface data/celeba data/scut_fbp5500 [--calibration 256]
"""
from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common import batch_rate
from facegender.data import load_samples_many
from facegender.descriptors import _chip_of, cached_descriptors
from facegender.inference import Classifier
from facegender.onnx_export import quantize_int8, to_onnx
from facegender.onnx_model import DescriptorGraph, session

VARIANTS = {  # name -> reduce_range: 7-bit weights, against overflow on CPUs without VNNI (what export --int8 does)
    "int8 reduced range": True,
    "int8": False,  # on 64 validation chips: cosine to fp32 down to 0.94, P(male) moved by 0.29
}


def chips_of(samples, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The chips of the samples that decode, and their indices."""
    with ProcessPoolExecutor(workers) as pool:
        cut = list(pool.map(_chip_of, [(s.path, s.landmarks) for s in samples], chunksize=64))
    good = np.array([i for i, (c, _) in enumerate(cut) if c is not None])
    return np.stack([cut[i][0] for i in good]), good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="prepared datasets")
    parser.add_argument("--calibration", type=int, default=256, help="validation chips to calibrate on")
    parser.add_argument("--max-test", type=int, default=0, help="test faces to score (0: the whole split)")
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", metavar="DIR", help="write each int8 graph here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS)[:1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    clf = Classifier.from_checkpoint("descriptor", backend="torch", precision="fp32", detect=False)
    fp32 = to_onnx(clf.model, clf.meta)
    val = load_samples_many(args.data, "val")
    pick = np.random.default_rng(0).choice(len(val), min(args.calibration, len(val)), replace=False)
    calibration, _ = chips_of([val[i] for i in pick])
    test = load_samples_many(args.data, "test")
    test = test[:args.max_test] if args.max_test else test
    print(f"{len(test)} test images of {', '.join(args.data)}; calibrated on {len(calibration)} validation chips; "
          f"torch {torch.__version__}, 1 thread", flush=True)
    graphs = {}
    for name in args.variants:
        started = time.perf_counter()
        data = quantize_int8(fp32, calibration, clf.meta, reduce_range=VARIANTS[name])
        print(f"{name}: quantised in {time.perf_counter() - started:.0f} s", flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"descriptor-{name.replace(' ', '-')}.onnx").write_bytes(data)
        graphs[name] = DescriptorGraph(session(data, 1), name)

    def p_male(extractor) -> tuple[np.ndarray, np.ndarray]:
        """P(male) of every test face that decodes, through the descriptor cache (fp32's is usually filled)."""
        d = cached_descriptors(test, extractor=extractor, progress=False)
        return clf.probabilities(clf.model.head.logits(d.vectors[d.good])), d.good

    reference, good = p_male(clf.model.extractor)
    labels = np.array([test[i].label for i in good])
    sources = np.array([test[i].source for i in good])
    accuracy = lambda p, m=slice(None): 100 * ((p[m] >= clf.threshold) == labels[m]).mean()  # noqa: E731
    corpora = sorted(set(sources))
    print(f"{'':22s} {'accuracy':>9s} {'change':>7s} " + " ".join(f"{c:>12s}" for c in corpora)
          + f" {'max |dP|':>9s} {'flipped':>8s}")
    print(f"{'torch fp32':22s} {accuracy(reference):8.2f}% {'':7s} "
          + " ".join(f"{accuracy(reference, sources == c):11.2f}%" for c in corpora), flush=True)
    for name, graph in graphs.items():
        p, same = p_male(graph)
        assert np.array_equal(same, good)
        print(f"{name:22s} {accuracy(p):8.2f}% {accuracy(p) - accuracy(reference):+7.2f} "
              + " ".join(f"{accuracy(p, sources == c):11.2f}%" for c in corpora)
              + f" {np.abs(p - reference).max():9.2e} {int(((p >= 0.5) != (reference >= 0.5)).sum()):8d}", flush=True)

    graphs = {"onnxruntime fp32": DescriptorGraph(session(fp32, 1), "fp32")} | graphs
    chips = calibration[:128]
    runs = {"torch fp32": clf.model.extractor} | graphs
    sample = chips
    times = {(name, b): [] for name in runs for b in (1, 64)}
    for _ in range(args.rounds):
        for (name, b) in times:
            times[name, b].append(batch_rate(runs[name], sample, b, args.seconds)[1])
    base = {b: statistics.median(times["torch fp32", b]) for b in (1, 64)}
    print(f"\nCPU ms per face, medians of {args.rounds} rounds (x: speed against torch fp32)")
    for name in runs:
        print(f"{name:22s} " + "   ".join(
            f"batch {b:2d}: {statistics.median(times[name, b]):6.2f} ms ({base[b] / statistics.median(times[name, b]):.2f}x)"
            for b in (1, 64)))


if __name__ == "__main__":
    main()
