"""int8 variants of the shipped descriptor network (dlib's ResNet as ONNX) against float32: accuracy and speed.

Each variant is onnxruntime's static quantisation (QDQ, per-channel 7-bit weights, uint8 activations) of
``weights/dlib_face_recognition_resnet_model_v1.onnx``, calibrated on ``--calibration`` chips of the
training splits (never the split scored), with one choice changed: how the activation ranges are set
(min/max, a percentile, entropy) and which convolutions stay float32. For every variant, on one split of
the prepared corpora (``--split val``, the default, is what a variant is chosen on; ``test`` only
reports): accuracy of the bundled descriptor head on its descriptors, per corpus, against float32, the
largest change in P(male) and the answers that flip; then CPU milliseconds per face on one thread at
batches of 1, 3 and 64, the variants taking turns. Descriptors go through the cache of
``facegender.descriptors`` (keyed by the graph's bytes), so a rerun computes nothing.

``--refit`` also fits a new head on each graph's own descriptors, as ``train --kind descriptor`` does (its
rule: a logistic regression, or an MLP of seed 0 where clearly better on validation) and as the mean of
five MLPs (seeds 0-4: one MLP five times as wide), and scores each on the validation split (where a choice
is made), the test split and leave-one-corpus-out (fitted on two corpora's training and validation splits,
scored on every image of the third), float32's refits beside. Usage:
    python benchmarks/int8_network.py --data data/utkface data/celeba data/scut_fbp5500 [--split val]
        [--variants minmax percentile ...] [--save DIR] [--correct] [--refit]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from refits import header, refit_rows

from facegender.data import load_samples_many
from facegender.descriptors import _chip_of, cached_descriptors
from facegender.inference import Classifier
from facegender.onnx_export import quantize_int8
from facegender.onnx_model import DESCRIPTOR_NETWORK, DescriptorGraph, _key, session

CONVS = [f"node_conv2d{'' if i == 0 else f'_{i}'}" for i in range(29)]  # the graph's 29 convolutions, in order
VARIANTS = {  # name -> (calibration method, convolutions left in float32)
    "minmax": ("MinMax", []),
    "percentile": ("Percentile", []),
    "entropy": ("Entropy", []),
    "minmax, first conv fp32": ("MinMax", CONVS[:1]),
    "minmax, first and last 4 fp32": ("MinMax", CONVS[:1] + CONVS[-4:]),
    "percentile, first and last 4 fp32": ("Percentile", CONVS[:1] + CONVS[-4:]),
}


def cpu_ms_per_face(network: DescriptorGraph, chips: np.ndarray, batch: int, seconds: float) -> float:
    network(chips[:batch])
    cpu, wall, n = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - wall < seconds:
        network(chips[:batch])
        n += batch
    return (time.process_time() - cpu) * 1000 / n


def refits(graphs: dict[str, DescriptorGraph], data: list[str], clf: Classifier) -> None:
    """Accuracy of heads refitted on each graph's descriptors (see the module's docstring), per corpus."""
    splits = {name: load_samples_many(data, name) for name in ("train", "val", "test")}
    header(sorted({s.source for s in splits["test"]}))
    for name, graph in graphs.items():
        got = {}
        for split, samples in splits.items():
            d = cached_descriptors(samples, extractor=graph, progress=False)
            got[split] = (d.vectors[d.good], np.array([samples[i].label for i in d.good]),
                          np.array([samples[i].source for i in d.good]))
        refit_rows(name, got, clf.model.head.logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="prepared datasets")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="the split scored (default val)")
    parser.add_argument("--calibration", type=int, default=512, help="training chips that set the ranges")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", metavar="DIR", help="write each int8 graph here")
    parser.add_argument("--correct", action="store_true",
                        help="also score each variant with an affine map from its descriptors to float32's, fitted "
                             "by least squares on the training split (foldable into the head's first layer)")
    parser.add_argument("--refit", action="store_true",
                        help="also refit the head on each graph's descriptors: validation, test and leave-one-corpus-out")
    args = parser.parse_args()

    clf = Classifier.from_checkpoint("descriptor", detect=False, threads=1)
    network = DESCRIPTOR_NETWORK.read_bytes()
    fp32 = DescriptorGraph(session(network, 1), _key(network))
    train = load_samples_many(args.data, "train")
    pick = np.random.default_rng(0).choice(len(train), min(args.calibration, len(train)), replace=False)
    cut = [_chip_of((train[i].path, train[i].landmarks)) for i in pick]
    chips = np.stack([c for c, _ in cut if c is not None])
    scored = load_samples_many(args.data, args.split)
    print(f"{len(scored)} {args.split} images of {', '.join(args.data)}; calibrated on {len(chips)} training chips; "
          "onnxruntime, 1 thread", flush=True)

    graphs = {"float32": fp32}
    for name in args.variants:
        method, exclude = VARIANTS[name]
        started = time.perf_counter()
        data = quantize_int8(network, chips, None, method=method, exclude=tuple(exclude))
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"descriptor-network-{name.replace(', ', '-').replace(' ', '-')}.onnx").write_bytes(data)
        graphs[name] = DescriptorGraph(session(data, 1), _key(data))
        print(f"{name}: quantised in {time.perf_counter() - started:.0f} s, {len(data) / 2**20:.1f} MiB", flush=True)

    def p_male(graph: DescriptorGraph, correction=None) -> tuple[np.ndarray, np.ndarray]:
        d = cached_descriptors(scored, extractor=graph, progress=False)
        x = d.vectors[d.good]
        if correction is not None:
            x = np.hstack([x, np.ones((len(x), 1), np.float32)]) @ correction
        return clf.probabilities(clf.model.head.logits(x)), d.good

    def correction(graph: DescriptorGraph) -> np.ndarray:
        """(129 x 128) least squares from [int8 descriptor, 1] to the float32 descriptor, on the training split."""
        a = cached_descriptors(train, extractor=graph, progress=False)
        b = cached_descriptors(train, extractor=fp32, progress=False)
        x = np.hstack([a.vectors[a.good], np.ones((len(a.good), 1), np.float32)])
        return np.linalg.lstsq(x, b.vectors[a.good], rcond=None)[0].astype(np.float32)

    reference, good = p_male(fp32)
    labels = np.array([scored[i].label for i in good])
    sources = np.array([scored[i].source for i in good])
    corpora = sorted(set(sources))
    accuracy = lambda p, m=slice(None): 100 * ((p[m] >= clf.threshold) == labels[m]).mean()
    print(f"{'':36s} {'all':>8s} " + " ".join(f"{c:>13s}" for c in corpora) + f" {'max |dP|':>9s} {'flipped':>8s}")
    print(f"{'float32':36s} {accuracy(reference):7.2f}% " + " ".join(f"{accuracy(reference, sources == c):12.2f}%"
                                                             for c in corpora), flush=True)
    rows = [(name, graph, None) for name, graph in list(graphs.items())[1:]]
    if args.correct:
        rows += [(f"{name} + affine", graph, correction(graph)) for name, graph, _ in rows]
    for name, graph, fix in rows:
        p, same = p_male(graph, fix)
        assert np.array_equal(same, good)
        print(f"{name:36s} {accuracy(p):7.2f}% " + " ".join(
            f"{accuracy(p, sources == c):6.2f} ({accuracy(p, sources == c) - accuracy(reference, sources == c):+.2f})"
            for c in corpora) + f" {np.abs(p - reference).max():9.3f} {int(((p >= 0.5) != (reference >= 0.5)).sum()):8d}",
            flush=True)

    if args.refit:
        refits(graphs, args.data, clf)

    times = {(name, b): [] for name in graphs for b in (1, 3, 64)}
    for _ in range(args.rounds):
        for (name, b), runs in times.items():
            runs.append(cpu_ms_per_face(graphs[name], chips, b, args.seconds))
    print(f"\nCPU ms per face, one thread, medians of {args.rounds} rounds (x: speed against float32)")
    for name in graphs:
        print(f"{name:36s} " + "   ".join(
            f"batch {b:2d}: {statistics.median(times[name, b]):5.2f} ms "
            f"({statistics.median(times['float32', b]) / statistics.median(times[name, b]):.2f}x)" for b in (1, 3, 64)))


if __name__ == "__main__":
    main()
