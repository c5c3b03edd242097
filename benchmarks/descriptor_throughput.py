"""Face descriptors/s: dlib's own network against facegender.dlibnet and its ONNX graph, side by side in one run.

dlib computes one chip at a time (``compute_face_descriptor(chip)``, what most users call) or a list
(its batch overload); ``DescriptorNet`` runs at batch 1 and at a large batch, in fp32 and bf16, and so
does the graph ``facegender export`` writes of the default model on onnxruntime in fp32 (``--int8 FILE``:
also an int8 graph made by ``export --int8``; ``--as-exported``: also dlib's network graph as the exporter
writes it, before ``onnx_export.in_channel_blocks``), and dlib's network on MNN in fp32 and, where the ``openvino``
extra is installed, on OpenVINO (bf16 on CPUs that compute it natively, else fp32; ``descriptor_runtime``). The
chips are real faces: dlib's own 150x150 chips of UTKFace images (scikit-image's astronaut, flipped
and shifted, where UTKFace is absent). The configurations take turns for ``--rounds`` rounds and each
reports its median, so load from other processes on a shared machine falls on all of them alike; the
CPU milliseconds per face (process time, all threads) are the steadier figure there, since waiting for
a core costs wall time but no CPU time. Also prints each precision's cosine to dlib's descriptors. Usage:
    python benchmarks/descriptor_throughput.py --faces 64 --seconds 4 --rounds 3 [--threads N] [--int8 FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics

import numpy as np
import torch
from PIL import Image

from common import SHARED, batch_rate
from facegender.detect import LANDMARK_MODEL, FaceDetector, packaged_model
from facegender.chips import MODEL_FILE, face_chips, full_object_detection
from facegender.dlibnet import DescriptorNet
from facegender.inference import Classifier
from facegender.descriptor_runtime import MNNNetwork, OpenVINONetwork
from facegender.onnx_model import DESCRIPTOR_NETWORK, DescriptorGraph, session
from facegender.runtime import cpu_has_bf16


def real_chips(n: int) -> tuple[np.ndarray, str]:
    import dlib
    import skimage.data

    detector, predictor = FaceDetector(), dlib.shape_predictor(str(packaged_model(LANDMARK_MODEL)))

    def chips_of(rgb: np.ndarray) -> np.ndarray:
        faces = []
        for face in detector.detect(Image.fromarray(rgb))[:1]:
            x0, y0, x1, y1 = (int(round(v)) for v in face.box)
            shape = predictor(rgb, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
            faces.append(full_object_detection(face.box, [(p.x, p.y) for p in shape.parts()]))
        return face_chips(rgb, faces)

    folder = SHARED / "utkface"
    if folder.is_dir():
        chips = []
        for path in sorted(folder.glob("*.jpg"))[::53]:
            chips.extend(chips_of(np.asarray(Image.open(path).convert("RGB"))))
            if len(chips) == n:
                return np.stack(chips), f"UTKFace ({folder})"
    chip = chips_of(skimage.data.astronaut())[0]
    variants = [np.roll(chip[:, ::-1] if i % 2 else chip, i // 2, axis=1) for i in range(n)]
    return np.stack(variants), "scikit-image's astronaut (flipped and shifted copies; UTKFace is absent)"


def cosine_range(a: np.ndarray, b: np.ndarray) -> str:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return f"min {cos.min():.6f}, median {np.median(cos):.6f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="the large batch size")
    parser.add_argument("--seconds", type=float, default=4, help="timed seconds per configuration per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: torch's default)")
    parser.add_argument("--int8", metavar="ONNX", help="an int8 descriptor graph (facegender export --int8) to time too")
    parser.add_argument("--as-exported", action="store_true",
                        help="also time dlib's network as the exporter writes it, before onnx_export.in_channel_blocks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import dlib

    chips, origin = real_chips(args.faces)
    reference = dlib.face_recognition_model_v1(str(packaged_model(MODEL_FILE)))
    nets = {p: DescriptorNet.from_dat(device="cpu", precision=p) for p in ("fp32", "bf16")}
    shipped = Classifier.from_checkpoint("descriptor", backend="onnxruntime", detect=False).model.extractor
    # onnxruntime alone, and the same network on MNN (what descriptor_runtime's ``auto`` picks on CPUs without AVX-512)
    graphs = {"fp32": DescriptorGraph(shipped.session, shipped.key)}
    on_mnn = MNNNetwork(DESCRIPTOR_NETWORK, shipped.key)  # one thread, as descriptor_runtime runs it
    # FACEGENDER_DESCRIPTOR_RUNTIME=openvino's network, called directly: it runs every batch, single chips too
    on_openvino = OpenVINONetwork(DESCRIPTOR_NETWORK, shipped.key) if importlib.util.find_spec("openvino") else None
    if args.as_exported:
        from facegender.onnx_export import descriptor_network_graph

        exported = session(descriptor_network_graph(blocked=False), args.threads or None, "the exported graph")
        graphs["fp32 exported"] = DescriptorGraph(exported, "as-exported")
    if args.int8:
        graphs["int8"] = Classifier.from_checkpoint(args.int8, backend="onnxruntime", detect=False).model.extractor
    truth = np.array([np.array(reference.compute_face_descriptor(c)) for c in chips])
    print(f"{len(chips)} chips of {origin}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"dlib {dlib.__version__}; native CPU bf16: {'yes' if cpu_has_bf16() else 'no (bf16 is emulated here)'}")
    for precision, net in nets.items():
        print(f"cosine to dlib, {precision}: {cosine_range(net.descriptors(chips), truth)}")
    for precision, graph in graphs.items():
        print(f"cosine to dlib, onnxruntime {precision}: {cosine_range(graph(chips), truth)}")
    print(f"cosine to dlib, MNN fp32: {cosine_range(on_mnn(chips), truth)}; "
          f"to onnxruntime fp32: {cosine_range(on_mnn(chips), graphs['fp32'](chips))}")
    if on_openvino is not None:
        print(f"cosine to dlib, OpenVINO {on_openvino.precision}: {cosine_range(on_openvino(chips), truth)}; "
              f"to onnxruntime fp32: {cosine_range(on_openvino(chips), graphs['fp32'](chips))}")
    else:
        print("OpenVINO: not installed (pip install 'facegender[openvino]'), not timed")

    configs = {
        ("dlib", "one at a time", 1): lambda b: [reference.compute_face_descriptor(c) for c in b],
        ("dlib", "list", args.batch): lambda b: reference.compute_face_descriptor(list(b)),
    }
    for precision, net in nets.items():
        for batch in (1, args.batch):
            configs[("dlibnet", precision, batch)] = net.descriptors
    for precision, graph in graphs.items():
        for batch in (1, args.batch):
            configs[("onnx", precision, batch)] = graph
    for batch in (1, args.batch):
        configs[("mnn", "fp32", batch)] = on_mnn
        if on_openvino is not None:
            configs[("openvino", on_openvino.precision, batch)] = on_openvino
    rates = {key: [] for key in configs}
    for _ in range(args.rounds):
        for key, run in configs.items():
            rates[key].append(batch_rate(run, chips, key[2], args.seconds))
    def medians(key):
        return statistics.median(v[0] for v in rates[key]), statistics.median(v[1] for v in rates[key])

    base_rate, base_cpu = medians(("dlib", "one at a time", 1))
    print(f"\n{'':8s} {'mode':14s} {'batch':>5s} {'faces/s':>8s} {'x dlib':>7s} {'CPU ms/face':>12s} {'x dlib':>7s}"
          f"   (medians of {args.rounds} rounds)")
    for who, mode, batch in rates:
        r, cpu = medians((who, mode, batch))
        print(f"{who:8s} {mode:14s} {batch:5d} {r:8.1f} {r / base_rate:7.2f} {cpu:12.1f} {base_cpu / cpu:7.2f}")


if __name__ == "__main__":
    main()
